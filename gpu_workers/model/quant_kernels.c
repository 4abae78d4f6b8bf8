/* Weight-only 8-bit and 4-bit matmuls for GGUF blocks kept quantized (gpu_workers/model/quant_kernels.py).
 *
 * 8-bit:
 * y[m, n] = sum_k x[m, k] * w[n, k] with w[n, k] = code[n, k] * scale[n, k / G] (+ zero[n, k / G]),
 * codes int8, block constants fp32, G the block width (16 or 32). Each weight is dequantized in
 * registers exactly as the gguf package rounds it (a multiply, then an add: this file is built with
 * -ffp-contract=off) and multiplied by fp32 activations with fp32 accumulation: the products are the
 * fp32 matmul's of the dequantized weight, only the order of the sum differs. 16 weights at a time
 * (one zmm, or two ymm), for tiles of up to 4 outputs by 4 rows of x, so that each converted weight
 * vector feeds several fused multiply-adds; each output's sum has the same order in every tile, so a
 * row's result does not depend on its batch. Threads claim chunks of the outputs (work_pool.h: no
 * thread waits for one that has not started).
 */
#include <immintrin.h>
#include <stdint.h>

#include "work_pool.h"

#define CHUNKS_PER_THREAD 4 /* a late or preempted thread leaves the others little to wait for */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 fp32 lanes: one zmm with AVX-512, two ymm (lanes 0-7, 8-15) with AVX2. The operations are the
 * same lane by lane, and sum16 adds the lanes in the same tree (8 + 8, then hsum's), so both builds
 * give the same bits. */
#ifdef __AVX512F__
typedef __m512 f16;
static inline f16 zero16(void) { return _mm512_setzero_ps(); }
static inline f16 set16(float v) { return _mm512_set1_ps(v); }
static inline f16 load16(const float *p) { return _mm512_loadu_ps(p); }
static inline void store16(float *p, f16 v) { _mm512_storeu_ps(p, v); }
static inline f16 codes16(const int8_t *c) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)c)));
}
static inline f16 mul16(f16 a, f16 b) { return _mm512_mul_ps(a, b); }
static inline f16 add16(f16 a, f16 b) { return _mm512_add_ps(a, b); }
static inline f16 fma16(f16 a, f16 b, f16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline float sum16(f16 v) {
    return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}
#else
typedef struct { __m256 lo, hi; } f16;
static inline f16 zero16(void) { return (f16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline f16 set16(float v) { return (f16){_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
static inline f16 load16(const float *p) { return (f16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void store16(float *p, f16 v) { _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }
static inline f16 codes16(const int8_t *c) {
    __m128i v = _mm_loadu_si128((const __m128i *)c);
    return (f16){_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
                 _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)))};
}
static inline f16 mul16(f16 a, f16 b) { return (f16){_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
static inline f16 add16(f16 a, f16 b) { return (f16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline f16 fma16(f16 a, f16 b, f16 c) {
    return (f16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline float sum16(f16 v) { return hsum(_mm256_add_ps(v.lo, v.hi)); }
#endif

/* tileNT_MT: NT outputs (rows of codes, k_len bytes apart) for MT rows of x. Each output y[m, n] is one
 * chain of 16-lane fused multiply-adds over k = 0, 16, 32, ... in order, then sum16: the same
 * operations whatever the tile, so a row's result does not depend on the rows beside it (batch
 * invariance) nor on how the outputs are split between threads. Weights: code * scale (+ zero),
 * a multiply then an add, as the gguf package rounds them; scale index k >> shift (group 2^shift). */
#define INT8_AHEAD 2048 /* codes prefetched this many bytes on (as Q4_AHEAD below) */
#define TILE8(NT, MT)                                                                                     \
    static void tile##NT##_##MT(const float *x, int64_t k_len, const int8_t *codes, const float *scale,  \
                                const float *zero, int shift, float *y, int64_t n_len) {                 \
        int64_t groups = k_len >> shift;                                                                  \
        f16 acc[NT][MT];                                                                                  \
        for (int j = 0; j < NT; j++)                                                                      \
            for (int i = 0; i < MT; i++) acc[j][i] = zero16();                                            \
        for (int64_t k = 0; k < k_len; k += 16) {                                                         \
            int64_t g = k >> shift;                                                                       \
            f16 xs[MT];                                                                                   \
            for (int i = 0; i < MT; i++) xs[i] = load16(x + i * k_len + k);                               \
            for (int j = 0; j < NT; j++) {                                                                \
                if ((k & 63) == 0) /* once a cache line */                                                \
                    _mm_prefetch((const char *)(codes + j * k_len + k + INT8_AHEAD), _MM_HINT_T0);       \
                f16 w = mul16(codes16(codes + j * k_len + k), set16(scale[j * groups + g]));              \
                if (zero) w = add16(w, set16(zero[j * groups + g]));                                      \
                for (int i = 0; i < MT; i++) acc[j][i] = fma16(w, xs[i], acc[j][i]);                      \
            }                                                                                             \
        }                                                                                                 \
        for (int j = 0; j < NT; j++)                                                                      \
            for (int i = 0; i < MT; i++) y[i * n_len + j] = sum16(acc[j][i]);                             \
    }
#ifdef __AVX512F__ /* 32 registers: up to 16 accumulators */
#define INT8_OUTPUTS 4
TILE8(4, 1) TILE8(4, 2) TILE8(4, 4) TILE8(1, 1) TILE8(1, 2) TILE8(1, 4)
#else /* 16 ymm, two per f16: up to 4 accumulators */
#define INT8_OUTPUTS 2
TILE8(2, 1) TILE8(2, 2) TILE8(1, 1) TILE8(1, 2) TILE8(1, 4)
#endif

struct int8_args {
    const float *x, *scale, *zero;
    const int8_t *codes;
    float *y;
    int64_t m_len, k_len, n_len, per_chunk;
    int shift;
};

/* Rows m0.. of x by outputs n0 .. n0 + nt - 1 (nt = INT8_OUTPUTS or 1), in row tiles of 4, 2, 1. */
static void int8_outputs(const struct int8_args *a, int64_t n0, int nt) {
    int64_t k_len = a->k_len, n_len = a->n_len, groups = k_len >> a->shift;
    const int8_t *c = a->codes + n0 * k_len;
    const float *s = a->scale + n0 * groups, *z = a->zero ? a->zero + n0 * groups : 0;
    int64_t m = 0;
#define INT8_CALL(NT, MT) tile##NT##_##MT(a->x + m * k_len, k_len, c, s, z, a->shift, a->y + m * n_len + n0, n_len)
#ifdef __AVX512F__
    if (nt == INT8_OUTPUTS) {
        for (; m + 4 <= a->m_len; m += 4) INT8_CALL(4, 4);
        if (a->m_len - m >= 2) { INT8_CALL(4, 2); m += 2; }
        if (a->m_len - m >= 1) INT8_CALL(4, 1);
        return;
    }
#else
    if (nt == INT8_OUTPUTS) {
        for (; m + 2 <= a->m_len; m += 2) INT8_CALL(2, 2);
        if (a->m_len - m >= 1) INT8_CALL(2, 1);
        return;
    }
#endif
    for (; m + 4 <= a->m_len; m += 4) INT8_CALL(1, 4);
    if (a->m_len - m >= 2) { INT8_CALL(1, 2); m += 2; }
    if (a->m_len - m >= 1) INT8_CALL(1, 1);
#undef INT8_CALL
}

static void int8_chunk(const void *arg, int64_t chunk) {
    const struct int8_args *a = arg;
    int64_t n = chunk * a->per_chunk, n1 = n + a->per_chunk < a->n_len ? n + a->per_chunk : a->n_len;
    for (; n + INT8_OUTPUTS <= n1; n += INT8_OUTPUTS) int8_outputs(a, n, INT8_OUTPUTS);
    for (; n < n1; n++) int8_outputs(a, n, 1);
}

/* Chunks of about CHUNKS_PER_THREAD per thread over `items` outputs, each whole tiles of `tile` outputs:
 * (items per chunk, chunks). */
static void split(int64_t items, int threads, int tile, int64_t *per_chunk, int64_t *chunks) {
    int64_t per = threads > 1 ? items / (threads * CHUNKS_PER_THREAD) : items;
    per = per < 1 ? 1 : per;
    *per_chunk = (per + tile - 1) / tile * tile;
    *chunks = (items + *per_chunk - 1) / *per_chunk;
}

/* x [M, K] fp32, codes [N, K] int8, scale and zero [N, K / group] fp32 (zero may be NULL),
 * y [M, N] fp32. K a multiple of 32, group 16 or 32. Returns 0, or -1 on bad sizes.
 * threads: the caller and threads-1 of the work pool (work_pool.h) share the outputs. */
int int8_matmul(const float *x, int64_t m_len, int64_t k_len, const int8_t *codes, const float *scale,
                const float *zero, int64_t n_len, int64_t group, float *y, int threads) {
    if ((group != 16 && group != 32) || k_len <= 0 || k_len % 32) return -1;
    struct int8_args a = {x, scale, zero, codes, y, m_len, k_len, n_len, 0, group == 16 ? 4 : 5};
    int64_t chunks;
    split(n_len, threads, INT8_OUTPUTS, &a.per_chunk, &chunks);
    pool_run(int8_chunk, &a, chunks, threads);
    return 0;
}

/* The fp32 weight [N, K]: code * scale (+ zero), rounded as the kernel and the gguf package round. */
void int8_dequantize(const int8_t *codes, const float *scale, const float *zero, int64_t n_len, int64_t k_len,
                     int64_t group, float *out, int threads) {
    int64_t groups = k_len / group;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < n_len; n++) {
        for (int64_t k = 0; k < k_len; k++) {
            int64_t g = n * groups + k / group;
            float w = (float)codes[n * k_len + k] * scale[g];
            out[n * k_len + k] = zero ? w + zero[g] : w;
        }
    }
}

/* 4-bit codes (0..15), packed for the kernel: per 64 inputs (two 32-weight blocks) 32 bytes read as 8
 * 32-bit lanes, lane i holding code[k0 + i + 8 j] in bits 4j..4j+3 (j = 0..7), so that one shift gives
 * 16 consecutive codes in 32-bit lanes (nibbles 2s and 2s + 1: inputs k0 + 16 s .. k0 + 16 s + 15), no
 * shuffles; a trailing 32-weight block (K an odd number of blocks) in 16 bytes, 8 16-bit lanes of 4
 * codes. K / 2 bytes per output row in all. Block constants fp32 [N, K / 32]: w = code * scale + zero,
 * a multiply then an add (-ffp-contract=off), as the gguf package rounds, then fp32 fused multiply-adds
 * with fp32 activations, 16 weights a step, in tiles of outputs by rows of x as int8_matmul's (and with
 * its guarantee: each output one in-order chain, the same bits whatever the batch, the threads, or the
 * build). With AVX-512, each block's 16 possible weights are computed once and looked up, one permute
 * per 16 codes; with AVX2 alone, each weight is converted, multiplied and added. The values are the
 * same. */

/* 64 inputs' codes, or a trailing 32's, ready for weights16; a block's constants in the form its weights
 * are made from. AVX-512: the 8 lanes, and beside them (lanes 8-15) the same shifted by 4, so that step s
 * shifts all 16 by 8 s; the table of the 16 weights the codes can stand for (c -> c * scale + zero,
 * a multiply then an add), read by a permute that looks only at each index's low 4 bits. AVX2: the 8 lanes;
 * the scale and the zero broadcast. */
#ifdef __AVX512F__
typedef __m512i codes4;
typedef __m512 block4;
static inline codes4 spread4(__m256i lanes) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(lanes), _mm256_srli_epi32(lanes, 4), 1);
}
static inline block4 block_of(float scale, float zero) {
    __m512 c = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_add_ps(_mm512_mul_ps(c, _mm512_set1_ps(scale)), _mm512_set1_ps(zero));
}
/* The 16 weights of inputs k0 + 16 s .. k0 + 16 s + 15. */
static inline f16 weights16(codes4 v, int s, block4 b) {
    return _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * s), b);
}
#else
typedef __m256i codes4;
typedef struct { __m256 s, z; } block4;
static inline codes4 spread4(__m256i lanes) { return lanes; }
static inline block4 block_of(float scale, float zero) {
    return (block4){_mm256_set1_ps(scale), _mm256_set1_ps(zero)};
}
static inline __m256 weights8(codes4 v, int j, block4 b) {
    __m256i c = _mm256_and_si256(_mm256_srli_epi32(v, 4 * j), _mm256_set1_epi32(0x0F));
    return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(c), b.s), b.z);
}
static inline f16 weights16(codes4 v, int s, block4 b) {
    return (f16){weights8(v, 2 * s, b), weights8(v, 2 * s + 1, b)};
}
#endif
static inline codes4 codes64(const uint8_t *c) { return spread4(_mm256_loadu_si256((const __m256i *)c)); }
static inline codes4 codes32(const uint8_t *c) {
    return spread4(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)c)));
}

/* q4tileNT_MT: NT outputs (rows of packed codes, K / 2 bytes apart) for MT rows of x, as tileNT_MT: each
 * output one chain of 16-lane fused multiply-adds over k = 0, 16, 32, ... in order, then sum16. Per block
 * of 32 inputs, its NT tables (or constants), then its two steps. The codes Q4_AHEAD bytes on are
 * prefetched: at one row the kernel waits on memory, and the hardware prefetcher alone left ~20% of the
 * time there (SmolLM2's layers, 2 threads). */
#define Q4_AHEAD 2048
#define Q4_STEPS(NT, MT, STEPS, G)                                                                        \
    for (int h = 0; h < (STEPS) / 2; h++) {                                                               \
        block4 b[NT];                                                                                     \
        for (int j = 0; j < NT; j++) b[j] = block_of(scale[j * groups + G + h], zero[j * groups + G + h]);\
        for (int s = 2 * h; s < 2 * h + 2; s++) {                                                         \
            f16 xs[MT];                                                                                   \
            for (int i = 0; i < MT; i++) xs[i] = load16(x + i * k_len + k + 16 * s);                      \
            for (int j = 0; j < NT; j++) {                                                                \
                f16 w = weights16(v[j], s, b[j]);                                                         \
                for (int i = 0; i < MT; i++) acc[j][i] = fma16(w, xs[i], acc[j][i]);                      \
            }                                                                                             \
        }                                                                                                 \
    }
#define TILE4(NT, MT)                                                                                     \
    static void q4tile##NT##_##MT(const float *x, int64_t k_len, const uint8_t *codes, const float *scale, \
                                  const float *zero, float *y, int64_t n_len) {                           \
        int64_t groups = k_len / 32, bytes = k_len / 2, k = 0, g = 0;                                     \
        f16 acc[NT][MT];                                                                                  \
        for (int j = 0; j < NT; j++)                                                                      \
            for (int i = 0; i < MT; i++) acc[j][i] = zero16();                                            \
        for (; k + 64 <= k_len; k += 64, g += 2) {                                                        \
            codes4 v[NT];                                                                                 \
            for (int j = 0; j < NT; j++) {                                                                \
                v[j] = codes64(codes + j * bytes + k / 2);                                                \
                _mm_prefetch((const char *)(codes + j * bytes + k / 2 + Q4_AHEAD), _MM_HINT_T0);          \
            }                                                                                             \
            _Pragma("GCC unroll 4") Q4_STEPS(NT, MT, 4, g)                                                \
        }                                                                                                 \
        if (k < k_len) {                                                                                  \
            codes4 v[NT];                                                                                 \
            for (int j = 0; j < NT; j++) v[j] = codes32(codes + j * bytes + k / 2);                       \
            Q4_STEPS(NT, MT, 2, g)                                                                        \
        }                                                                                                 \
        for (int j = 0; j < NT; j++)                                                                      \
            for (int i = 0; i < MT; i++) y[i * n_len + j] = sum16(acc[j][i]);                             \
    }
#ifdef __AVX512F__
#define INT4_OUTPUTS 4
TILE4(4, 1) TILE4(4, 2) TILE4(4, 4) TILE4(1, 1) TILE4(1, 2) TILE4(1, 4)
#else
#define INT4_OUTPUTS 2
TILE4(2, 1) TILE4(2, 2) TILE4(1, 1) TILE4(1, 2) TILE4(1, 4)
#endif

#ifdef __AVX512F__
/* q4tile4_4 on the 4 outputs' weights already dequantized (fp32 [4, K], by dequantize_row): the same
 * chains, the same bits, without dequantizing them again for each tile of rows. */
static void wtile4_4(const float *x, int64_t k_len, const float *w, float *y, int64_t n_len) {
    f16 acc[4][4];
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++) acc[j][i] = zero16();
    for (int64_t k = 0; k < k_len; k += 16) {
        f16 xs[4];
        for (int i = 0; i < 4; i++) xs[i] = load16(x + i * k_len + k);
        for (int j = 0; j < 4; j++) {
            f16 wj = load16(w + j * k_len + k);
            for (int i = 0; i < 4; i++) acc[j][i] = fma16(wj, xs[i], acc[j][i]);
        }
    }
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++) y[i * n_len + j] = sum16(acc[j][i]);
}
#endif
static void dequantize_row(const uint8_t *c, const float *s, const float *z, int64_t k_len, float *o);

/* Rows from which, and inputs up to which, a tile of outputs is dequantized once into an L1 buffer
 * (AVX-512) for all its tiles of rows: at 16 rows of SmolLM2's layers ~20% faster, at 8 ~5%. */
#define INT4_BUFFER_ROWS 8
#define INT4_BUFFER_INPUTS 2048

struct int4_args {
    const float *x, *scale, *zero;
    const uint8_t *codes;
    float *y;
    int64_t m_len, k_len, n_len, per_chunk;
};

/* Rows of x by outputs n0 .. n0 + nt - 1 (nt = INT4_OUTPUTS or 1), in row tiles of 4, 2, 1: the
 * weights' tile (or, from INT4_BUFFER_ROWS rows, its dequantized copy) stays in L1 while every row
 * tile reads it. */
static void int4_outputs(const struct int4_args *a, int64_t n0, int nt) {
    int64_t k_len = a->k_len, n_len = a->n_len, groups = k_len / 32;
    const uint8_t *c = a->codes + n0 * (k_len / 2);
    const float *s = a->scale + n0 * groups, *z = a->zero + n0 * groups;
    int64_t m = 0;
#define INT4_CALL(NT, MT) q4tile##NT##_##MT(a->x + m * k_len, k_len, c, s, z, a->y + m * n_len + n0, n_len)
#ifdef __AVX512F__
    if (nt == INT4_OUTPUTS) {
        if (a->m_len >= INT4_BUFFER_ROWS && k_len <= INT4_BUFFER_INPUTS) {
            float w[INT4_OUTPUTS * INT4_BUFFER_INPUTS] __attribute__((aligned(64)));
            for (int j = 0; j < INT4_OUTPUTS; j++)
                dequantize_row(c + j * (k_len / 2), s + j * groups, z + j * groups, k_len, w + j * k_len);
            for (; m + 4 <= a->m_len; m += 4)
                wtile4_4(a->x + m * k_len, k_len, w, a->y + m * n_len + n0, n_len);
        }
        for (; m + 4 <= a->m_len; m += 4) INT4_CALL(4, 4);
        if (a->m_len - m >= 2) { INT4_CALL(4, 2); m += 2; }
        if (a->m_len - m >= 1) INT4_CALL(4, 1);
        return;
    }
#else
    if (nt == INT4_OUTPUTS) {
        for (; m + 2 <= a->m_len; m += 2) INT4_CALL(2, 2);
        if (a->m_len - m >= 1) INT4_CALL(2, 1);
        return;
    }
#endif
    for (; m + 4 <= a->m_len; m += 4) INT4_CALL(1, 4);
    if (a->m_len - m >= 2) { INT4_CALL(1, 2); m += 2; }
    if (a->m_len - m >= 1) INT4_CALL(1, 1);
#undef INT4_CALL
}

static void int4_chunk(const void *arg, int64_t chunk) {
    const struct int4_args *a = arg;
    int64_t n = chunk * a->per_chunk, n1 = n + a->per_chunk < a->n_len ? n + a->per_chunk : a->n_len;
    for (; n + INT4_OUTPUTS <= n1; n += INT4_OUTPUTS) int4_outputs(a, n, INT4_OUTPUTS);
    for (; n < n1; n++) int4_outputs(a, n, 1);
}

/* x [M, K] fp32, codes [N, K / 2] packed as above, scale and zero [N, K / 32] fp32, y [M, N] fp32.
 * Returns 0, or -1 unless K is a positive multiple of 32. threads: as int8_matmul's. */
int int4_matmul(const float *x, int64_t m_len, int64_t k_len, const uint8_t *codes, const float *scale,
                const float *zero, int64_t n_len, float *y, int threads) {
    if (k_len <= 0 || k_len % 32) return -1;
    struct int4_args a = {x, scale, zero, codes, y, m_len, k_len, n_len, 0};
    int64_t chunks;
    split(n_len, threads, INT4_OUTPUTS, &a.per_chunk, &chunks);
    pool_run(int4_chunk, &a, chunks, threads);
    return 0;
}

/* One output's K weights, fp32: code * scale + zero, as the kernel rounds them. */
static void dequantize_row(const uint8_t *c, const float *s, const float *z, int64_t k_len, float *o) {
    for (int64_t k = 0; k < k_len; k += 64) {
        int64_t g = k / 32;
        codes4 v = k + 64 <= k_len ? codes64(c + k / 2) : codes32(c + k / 2);
        for (int s16 = 0; s16 < (k + 64 <= k_len ? 4 : 2); s16++)
            store16(o + k + 16 * s16, weights16(v, s16, block_of(s[g + s16 / 2], z[g + s16 / 2])));
    }
}

/* The fp32 weight [N, K] of int4_matmul's operands: code * scale + zero, as the kernel rounds it. */
int int4_dequantize(const uint8_t *codes, const float *scale, const float *zero, int64_t n_len, int64_t k_len,
                    float *out, int threads) {
    if (k_len <= 0 || k_len % 32) return -1;
    int64_t groups = k_len / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < n_len; n++)
        dequantize_row(codes + n * (k_len / 2), scale + n * groups, zero + n * groups, k_len,
                       out + n * k_len);
    return 0;
}

/* int4_matmul with int8_matmul's signature (group: 32, implied), as panel_matmul.c's decoder halves call a
 * linear's kernel. */
int int4_linear(const float *x, int64_t m_len, int64_t k_len, const uint8_t *codes, const float *scale,
                const float *zero, int64_t n_len, int64_t group, float *y, int threads) {
    (void)group;
    return int4_matmul(x, m_len, k_len, codes, scale, zero, n_len, y, threads);
}
