/* A pool of worker threads that share a job's chunks by claiming them (panel_matmul.c).
 *
 * OpenMP's parallel regions end at a barrier: every thread of the team must arrive, so when another
 * process holds the core of one of them (the gateway, Redis, a client: a serving host is never
 * quiet), the caller waits out that process's time slice. Measured on the 2-core VM, a SmolLM2 decode
 * step in the serving stack took 45 ms on 2 OpenMP threads and 33 ms on 1. Here the caller never
 * waits for a thread that has not started: it claims chunks itself, and waits only for chunks that
 * another thread has claimed and is running. A late thread finds nothing left and goes back to wait.
 *
 * Between jobs a worker spins for POOL_SPIN_NS (a decode step's matmuls come microseconds apart),
 * then sleeps on a condition variable: an idle worker costs nothing, a busy host loses at most that
 * much spinning per job.
 *
 * Claims carry the job's generation: ``next`` is (generation << 32 | next chunk), taken by
 * compare-and-swap, so a worker that read one job cannot claim a chunk of the next. A job's fields sit
 * in one of two slots by generation parity, which the caller writes only after the job before last
 * has ended.
 */
#ifndef WORK_POOL_H
#define WORK_POOL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#define POOL_MAX_WORKERS 63
#define POOL_SPIN_NS 200000

typedef void (*pool_fn)(const void *arg, int64_t chunk);

struct pool_job {
    pool_fn fn;
    const void *arg;
    int64_t chunks;
    int helpers; /* workers 0 .. helpers-1 take part */
};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    struct pool_job slots[2];
    _Atomic uint64_t next; /* generation << 32 | next unclaimed chunk */
    _Atomic int64_t done;  /* chunks of the current job finished */
    _Atomic int sleepers;
    int started;
    int atfork;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
static pthread_mutex_t pool_caller = PTHREAD_MUTEX_INITIALIZER; /* held by the thread running a job */

static inline uint64_t pool_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static inline void pool_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claim and run chunks of generation gen (its job: job) until none is left. */
static void pool_work(uint64_t gen, const struct pool_job *job) {
    for (;;) {
        uint64_t v = atomic_load_explicit(&pool.next, memory_order_acquire);
        if ((v >> 32) != gen || (int64_t)(v & 0xffffffffu) >= job->chunks)
            return;
        if (!atomic_compare_exchange_weak_explicit(&pool.next, &v, v + 1, memory_order_acq_rel, memory_order_acquire))
            continue;
        job->fn(job->arg, (int64_t)(v & 0xffffffffu));
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *pool_worker(void *arg) {
    int index = (int)(intptr_t)arg;
    uint64_t seen = atomic_load(&pool.next) >> 32;
    for (;;) {
        uint64_t gen, start = pool_now_ns();
        int spins = 0;
        while ((gen = atomic_load_explicit(&pool.next, memory_order_acquire) >> 32) == seen) {
            pool_relax();
            if (++spins % 256 == 0 && pool_now_ns() - start > POOL_SPIN_NS) {
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add(&pool.sleepers, 1);
                while ((gen = atomic_load(&pool.next) >> 32) == seen)
                    pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.lock);
                break;
            }
        }
        seen = gen;
        const struct pool_job *job = &pool.slots[gen & 1];
        if (index < job->helpers)
            pool_work(gen, job);
    }
    return 0;
}

static void pool_after_fork(void) { /* a forked child has none of the parent's threads */
    pthread_mutex_init(&pool_caller, 0);
    pthread_mutex_init(&pool.lock, 0);
    pthread_cond_init(&pool.wake, 0);
    atomic_store(&pool.sleepers, 0);
    pool.started = 0;
}

/* Run fn(arg, c) for c in 0 .. chunks-1 on the calling thread and up to threads-1 workers; returns
 * when all have run. One caller uses the pool at a time (a worker process's main thread); another
 * thread calling meanwhile runs its chunks alone rather than wait. */
static void pool_run(pool_fn fn, const void *arg, int64_t chunks, int threads) {
    int helpers = threads - 1 < POOL_MAX_WORKERS ? threads - 1 : POOL_MAX_WORKERS;
    if (helpers > chunks - 1)
        helpers = (int)(chunks - 1);
    if (helpers <= 0 || pthread_mutex_trylock(&pool_caller) != 0) {
        for (int64_t c = 0; c < chunks; c++)
            fn(arg, c);
        return;
    }
    if (!pool.atfork) {
        pthread_atfork(0, 0, pool_after_fork);
        pool.atfork = 1;
    }
    while (pool.started < helpers) {
        pthread_t t;
        if (pthread_create(&t, 0, pool_worker, (void *)(intptr_t)pool.started) != 0)
            break;
        pthread_detach(t);
        pool.started++;
    }
    uint64_t gen = ((atomic_load(&pool.next) >> 32) + 1) & 0xffffffffu; /* wraps within the 32 bits it has */
    struct pool_job *job = &pool.slots[gen & 1];
    job->fn = fn;
    job->arg = arg;
    job->chunks = chunks;
    job->helpers = helpers;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.next, gen << 32); /* publishes the job (seq_cst: ordered before reading sleepers) */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    pool_work(gen, job);
    for (int spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < chunks;)
        if (++spins % 1024 == 0)
            sched_yield(); /* the chunk's thread lost its core: let it have ours */
        else
            pool_relax();
    pthread_mutex_unlock(&pool_caller);
}

#endif
