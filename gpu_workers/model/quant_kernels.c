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

/* tileNT_MT: NT outputs (rows of codes, ldc bytes apart) for MT rows of x. Each output y[m, n] is one
 * chain of 16-lane fused multiply-adds over k = 0, 16, 32, ... in order, then sum16: the same
 * operations whatever the tile, so a row's result does not depend on the rows beside it (batch
 * invariance) nor on how the outputs are split between threads. Weights: code * scale (+ zero),
 * a multiply then an add, as the gguf package rounds them; scale index k >> shift (group 2^shift). */
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

/* Chunks of about CHUNKS_PER_THREAD per thread over `items` outputs: (items per chunk, chunks). */
static void split(int64_t items, int threads, int64_t *per_chunk, int64_t *chunks) {
    int64_t per = threads > 1 ? items / (threads * CHUNKS_PER_THREAD) : items;
    *per_chunk = per < 1 ? 1 : per;
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
    split(n_len, threads, &a.per_chunk, &chunks);
    a.per_chunk = (a.per_chunk + INT8_OUTPUTS - 1) / INT8_OUTPUTS * INT8_OUTPUTS; /* whole output tiles */
    chunks = (n_len + a.per_chunk - 1) / a.per_chunk;
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
 * 32-bit lanes, lane i holding code[k0 + i + 8 j] in bits 4j..4j+3 (j = 0..7), so that one shift and one
 * mask give 8 consecutive codes in 32-bit lanes, ready to convert (no shuffles); a trailing 32-weight block
 * (K an odd number of blocks) in 16 bytes, 8 16-bit lanes of 4 codes. K / 2 bytes per output row in all.
 * Block constants fp32 [N, K / 32]: w = code * scale + zero, a multiply then an add (-ffp-contract=off),
 * as the gguf package rounds, then fp32 fused multiply-adds with fp32 activations. Where the compiler
 * targets AVX-512VL (-march=native on such a CPU), each block's 16 possible weights are computed once and
 * looked up (vpermt2ps on 256-bit vectors: 3 instructions per 8 weights instead of 6); the values are
 * the same. Rows of x in tiles of 8, 4, 2, 1 as int8_matmul; threads split the outputs. */

/* A block's constants in the form its weights are made from: with AVX-512VL, the 16 weights its codes
 * can stand for (code c -> c * scale + zero, rounded as below), looked up by one two-table permute per
 * 8 codes; with AVX2 alone, the scale and zero broadcast, each weight converted, multiplied and added. */
typedef struct { __m256 a, b; } block4;

static inline block4 block_of(float scale, float zero) {
    __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero);
#if defined(__AVX512F__) && defined(__AVX512VL__)
    __m256 lo = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), hi = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
    return (block4){_mm256_add_ps(_mm256_mul_ps(lo, s), z), _mm256_add_ps(_mm256_mul_ps(hi, s), z)};
#else
    return (block4){s, z};
#endif
}

/* The 8 weights of nibble j (codes of inputs i + 8 j) of 8 lanes. */
static inline __m256 weights4(__m256i lanes, int j, block4 b) {
    __m256i c = _mm256_srli_epi32(lanes, 4 * j);
#if defined(__AVX512F__) && defined(__AVX512VL__)
    return _mm256_permutex2var_ps(b.a, c, b.b);  /* index bits 0-3: the permute ignores the others */
#else
    c = _mm256_and_si256(c, _mm256_set1_epi32(0x0F));
    return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(c), b.a), b.b);
#endif
}

/* q4rowsMT: one output n for MT rows of x over k_len inputs (rows ldx floats apart); CH accumulator
 * chains per row, as rowsMT. The sums are stored in y, or added to it (add: a later slice of K). */
#define Q4ROWS(MT, CH)                                                                                    \
    static void q4rows##MT(const float *x, int64_t ldx, int64_t k_len, const uint8_t *codes,              \
                           const float *scale, const float *zero, float *y, int64_t n_len, int add) {     \
        __m256 acc[MT * CH];                                                                              \
        for (int i = 0; i < MT * CH; i++) acc[i] = _mm256_setzero_ps();                                   \
        int64_t k = 0, g = 0;                                                                             \
        for (; k + 64 <= k_len; k += 64, g += 2, codes += 32) {                                           \
            __m256i lanes = _mm256_loadu_si256((const __m256i *)codes);                                   \
            block4 b[2] = {block_of(scale[g], zero[g]), block_of(scale[g + 1], zero[g + 1])};            \
            _Pragma("GCC unroll 8")                                                                     \
            for (int j = 0; j < 8; j++) {                                                                 \
                __m256 w = weights4(lanes, j, b[j / 4]);                                                  \
                for (int i = 0; i < MT; i++)                                                              \
                    acc[i * CH + j % CH] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i * ldx + k + 8 * j)    , \
                                                           acc[i * CH + j % CH]);                         \
            }                                                                                             \
        }                                                                                                 \
        if (k < k_len) {                                                                                  \
            __m256i lanes = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)codes));               \
            block4 b = block_of(scale[g], zero[g]);                                                       \
            _Pragma("GCC unroll 4")                                                                     \
            for (int j = 0; j < 4; j++) {                                                                 \
                __m256 w = weights4(lanes, j, b);                                                         \
                for (int i = 0; i < MT; i++)                                                              \
                    acc[i * CH + j % CH] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i * ldx + k + 8 * j)    , \
                                                           acc[i * CH + j % CH]);                         \
            }                                                                                             \
        }                                                                                                 \
        for (int i = 0; i < MT; i++) {                                                                    \
            __m256 sum = acc[i * CH];                                                                     \
            for (int c = 1; c < CH; c++) sum = _mm256_add_ps(sum, acc[i * CH + c]);                       \
            y[i * n_len] = add ? y[i * n_len] + hsum(sum) : hsum(sum);                                    \
        }                                                                                                 \
    }
Q4ROWS(1, 4)
Q4ROWS(2, 4)
Q4ROWS(4, 2)
Q4ROWS(8, 1)

/* Outputs per thread's block, and inputs per slice of K from 8 rows on: each row tile of x (8 rows of at
 * most 512 floats, 16 KiB) meets the block's slice of weights while both are in L1, so that tiles of 8
 * rows neither stream x from L2 (8 rows of K = 1536 are 48 KiB) nor, past 8 rows, read the weights from
 * memory once per tile. */
#define Q4_OUTPUTS 16
#define Q4_INPUTS 512

struct int4_args {
    const float *x, *scale, *zero;
    const uint8_t *codes;
    float *y;
    int64_t m_len, k_len, n_len, per_chunk;
};

static void int4_chunk(const void *arg, int64_t chunk) {
    const struct int4_args *a = arg;
    const float *x = a->x, *scale = a->scale, *zero = a->zero;
    const uint8_t *codes = a->codes;
    float *y = a->y;
    int64_t m_len = a->m_len, k_len = a->k_len, n_len = a->n_len, groups = k_len / 32;
    int64_t blocks = (n_len + Q4_OUTPUTS - 1) / Q4_OUTPUTS;
    int64_t slice = m_len >= 8 ? Q4_INPUTS : k_len;  /* fewer rows: x fits L1, and whole rows stream best */
    int64_t b1 = (chunk + 1) * a->per_chunk < blocks ? (chunk + 1) * a->per_chunk : blocks;
    for (int64_t b = chunk * a->per_chunk; b < b1; b++) {
        int64_t n0 = b * Q4_OUTPUTS, n1 = n0 + Q4_OUTPUTS < n_len ? n0 + Q4_OUTPUTS : n_len;
        for (int64_t k0 = 0; k0 < k_len; k0 += slice) {
            int64_t kn = k_len - k0 < slice ? k_len - k0 : slice;
#define Q4_TILE(MT)                                                                                       \
            for (int64_t n = n0; n < n1; n++)                                                             \
                q4rows##MT(x + m * k_len + k0, k_len, kn, codes + n * (k_len / 2) + k0 / 2,              \
                           scale + n * groups + k0 / 32, zero + n * groups + k0 / 32, y + m * n_len + n,  \
                           n_len, k0 > 0);
            int64_t m = 0;
            for (; m + 8 <= m_len; m += 8) { Q4_TILE(8) }
            if (m_len - m >= 4) { Q4_TILE(4) m += 4; }
            if (m_len - m >= 2) { Q4_TILE(2) m += 2; }
            if (m_len - m >= 1) { Q4_TILE(1) }
#undef Q4_TILE
        }
    }
}

/* x [M, K] fp32, codes [N, K / 2] packed as above, scale and zero [N, K / 32] fp32, y [M, N] fp32.
 * Returns 0, or -1 unless K is a multiple of 32. threads: as int8_matmul's. */
int int4_matmul(const float *x, int64_t m_len, int64_t k_len, const uint8_t *codes, const float *scale,
                const float *zero, int64_t n_len, float *y, int threads) {
    if (k_len <= 0 || k_len % 32) return -1;
    struct int4_args a = {x, scale, zero, codes, y, m_len, k_len, n_len};
    int64_t chunks;
    split((n_len + Q4_OUTPUTS - 1) / Q4_OUTPUTS, threads, &a.per_chunk, &chunks);
    pool_run(int4_chunk, &a, chunks, threads);
    return 0;
}

/* The fp32 weight [N, K] of int4_matmul's operands: code * scale + zero, as the kernel rounds it. */
int int4_dequantize(const uint8_t *codes, const float *scale, const float *zero, int64_t n_len, int64_t k_len,
                    float *out, int threads) {
    if (k_len <= 0 || k_len % 32) return -1;
    int64_t groups = k_len / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < n_len; n++) {
        const uint8_t *c = codes + n * (k_len / 2);
        const float *s = scale + n * groups, *z = zero + n * groups;
        float *o = out + n * k_len;
        int64_t k = 0, g = 0;
        for (; k + 64 <= k_len; k += 64, g += 2, c += 32) {
            __m256i lanes = _mm256_loadu_si256((const __m256i *)c);
            block4 b[2] = {block_of(s[g], z[g]), block_of(s[g + 1], z[g + 1])};
            for (int j = 0; j < 8; j++) _mm256_storeu_ps(o + k + 8 * j, weights4(lanes, j, b[j / 4]));
        }
        if (k < k_len) {
            __m256i lanes = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)c));
            block4 b = block_of(s[g], z[g]);
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(o + k + 8 * j, weights4(lanes, j, b));
        }
    }
    return 0;
}

/* int4_matmul with int8_matmul's signature (group: 32, implied), as panel_matmul.c's decoder halves call a
 * linear's kernel. */
int int4_linear(const float *x, int64_t m_len, int64_t k_len, const uint8_t *codes, const float *scale,
                const float *zero, int64_t n_len, int64_t group, float *y, int threads) {
    (void)group;
    return int4_matmul(x, m_len, k_len, codes, scale, zero, n_len, y, threads);
}
