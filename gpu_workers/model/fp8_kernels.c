/* Fused KV-cache kernels for CPUs (built and loaded by fp8_kernels.py): decode attention over fp32 blocks
 * and over fp8 blocks, each in one pass per (KV head, sequence) - scores, softmax and the weighted sum of V -
 * reading each K and V row once for the head's G queries and only up to the sequence's length.
 *
 * fp8 codes are converted as they are read (in a block-sized scratch), so no fp32 copy of the cache is ever
 * written: torch's fp8 -> fp32 cast is a scalar loop on CPUs, and even a vectorized dequantize-then-matmul
 * writes and reads 4 bytes per value for each 1 byte of cache.
 *
 * Layouts (all contiguous):
 *   pools   [heads, num_blocks, BS, DIM] float (fp32 cache) or uint8 codes (fp8 cache), one layer's K or V
 *   scales  scale of (head h, block b) at scales[h * scale_head_stride + b * scale_block_stride]
 *           (strides 0, 0: one scale for the whole layer)
 *   tables  [batch, width] int64                     each sequence's blocks, padded with valid ids
 *   lens    [batch] int64                            each sequence's context length, 1..width * BS
 *   q, out  [heads, batch, groups, DIM] float        queries (scaled), grouped by their KV head
 *
 * DIM (head_dim) and BS (block size) are compile-time constants: fp8_kernels.py compiles one library
 * per pair. Every function returns 0, -1 when a block id or a length is out of range (nothing is read
 * then), or -2 when scratch memory cannot be had.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* K/V rows (of all heads) below which a kernel runs on one thread: waking the others costs more
 * (2 threads on 8 heads x 129 tokens: ~55 us a call against ~10 us on one, OMP_WAIT_POLICY=PASSIVE). */
#define SERIAL_ROWS 4096

#if !defined(DIM) || !defined(BS)
#error "compile with -DDIM=<head_dim> -DBS=<block_size>"
#endif

enum { E4M3 = 0, E5M2 = 1, F32 = 2 };

/* Exact value of an fp8 code (e4m3fn or e5m2), subnormals included. Normal codes are rebiased into
 * an fp32 exponent and subnormal ones computed from their mantissa, so no fp32 subnormal appears
 * (CPUs take a slow microcode path on those). NaN/inf codes are never written to the cache. */
static inline float fp8_value(uint32_t u, int fmt) {
    uint32_t bits;
    float normal, mag;
    if (fmt == E4M3) {
        bits = ((u & 0x7f) << 20) + (120u << 23);
        memcpy(&normal, &bits, sizeof normal);
        mag = (u & 0x78) ? normal : (float)(u & 7) * 0x1p-9f;
    } else {
        bits = ((u & 0x7f) << 21) + (112u << 23);
        memcpy(&normal, &bits, sizeof normal);
        mag = (u & 0x7c) ? normal : (float)(u & 3) * 0x1p-16f;
    }
    return (u & 0x80) ? -mag : mag;
}

static inline void convert(const uint8_t *restrict src, float *restrict dst, int64_t n, float scale, int fmt) {
    if (fmt == E4M3) {
        for (int64_t i = 0; i < n; i++) dst[i] = fp8_value(src[i], E4M3) * scale;
    } else {
        for (int64_t i = 0; i < n; i++) dst[i] = fp8_value(src[i], E5M2) * scale;
    }
}

static inline int tables_valid(const int64_t *tables, int64_t n, int64_t num_blocks) {
    for (int64_t i = 0; i < n; i++)
        if (tables[i] < 0 || tables[i] >= num_blocks) return 0;
    return 1;
}

/* out[r] = codes[r] * scales[r] for rows of DIM codes (a gathered context, or blocks being rescaled) */
int fp8_dequantize_rows(const uint8_t *codes, const float *scales, float *out, int64_t rows, int fmt, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= SERIAL_ROWS)
    for (int64_t r = 0; r < rows; r++) convert(codes + r * DIM, out + r * DIM, DIM, scales[r], fmt);
    return 0;
}

/* Rows [0, n) of block blk of head h: an fp32 pool's rows where they lie; an fp8 pool's converted (times
 * their scale) into scratch. */
static inline const float *block_rows(const void *pool, const float *scales, int64_t scale_head_stride,
                                      int64_t scale_block_stride, int64_t h, int64_t blk, int64_t num_blocks, int n,
                                      int fmt, float *scratch) {
    const int64_t first = (h * num_blocks + blk) * BS * DIM;
    if (fmt == F32) return (const float *)pool + first;
    convert((const uint8_t *)pool + first, scratch, n * DIM, scales[h * scale_head_stride + blk * scale_block_stride],
            fmt);
    return scratch;
}

/* e^x for x <= 0 (softmax numerators), in a form the compiler vectorizes: x = n ln2 + r with |r| <= ln2/2,
 * e^r by Cephes' degree-6 polynomial (relative error ~2e-7, as expf), 2^n put into the exponent bits. Below
 * -87 (where e^x nears fp32's smallest normal) it returns e^-87 ~ 1.6e-38, nothing next to the maximum's 1. */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Dot products and weighted sums of one block's rows. With DIM a multiple of 8 they are written with 8-float
 * vectors (GCC's vector extensions, one AVX2 register): 8 rows' dot products with one query run as 8
 * independent FMA chains, and their horizontal sums come out together from one transpose-and-add, instead of
 * one dependent chain and one horizontal sum per dot product; a weighted sum keeps its output row in registers
 * across the block. */
#if DIM % 8 == 0 && defined(__GNUC__) && !defined(__clang__) /* GCC's vector extensions; elsewhere plain loops */
#define VEC8 1
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf8u __attribute__((vector_size(32), aligned(4)));
typedef int vi8 __attribute__((vector_size(32)));
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (vi8){__VA_ARGS__})

/* lane i: the sum of a[i]'s 8 lanes */
static inline vf8 sum8x8(const vf8 *a) {
    vf8 b[4], c[2];
    for (int i = 0; i < 4; i++)
        b[i] = SHUF(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) + SHUF(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; i++)
        c[i] = SHUF(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) + SHUF(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUF(c[0], c[1], 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(c[0], c[1], 4, 5, 6, 7, 12, 13, 14, 15);
}
#endif

/* s[t] = q . rows[t] for t < n */
static inline void block_scores(const float *restrict q, const float *restrict rows, int n, float *restrict s) {
    int t = 0;
#ifdef VEC8
    for (; t + 8 <= n; t += 8) {
        vf8 acc[8] = {{0}};
        for (int c = 0; c < DIM; c += 8) {
            const vf8 qc = *(const vf8u *)(q + c);
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++) acc[i] += qc * *(const vf8u *)(rows + (t + i) * DIM + c);
        }
        *(vf8u *)(s + t) = sum8x8(acc);
    }
#endif
    for (; t < n; t++) {
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int d = 0; d < DIM; d++) acc += q[d] * rows[t * DIM + d];
        s[t] = acc;
    }
}

/* o += sum_t w[t] rows[t] over t < n */
static inline void block_weighted_sum(const float *restrict w, const float *restrict rows, int n, float *restrict o) {
#ifdef VEC8
    vf8 acc[DIM / 8];
#pragma GCC unroll 16
    for (int c = 0; c < DIM / 8; c++) acc[c] = *(const vf8u *)(o + 8 * c);
    for (int t = 0; t < n; t++) {
        const vf8 wt = {w[t], w[t], w[t], w[t], w[t], w[t], w[t], w[t]};
#pragma GCC unroll 16
        for (int c = 0; c < DIM / 8; c++) acc[c] += wt * *(const vf8u *)(rows + t * DIM + 8 * c);
    }
#pragma GCC unroll 16
    for (int c = 0; c < DIM / 8; c++) *(vf8u *)(o + 8 * c) = acc[c];
#else
    float acc[DIM];
    for (int d = 0; d < DIM; d++) acc[d] = o[d];
    for (int t = 0; t < n; t++)
#pragma omp simd
        for (int d = 0; d < DIM; d++) acc[d] += w[t] * rows[t * DIM + d];
    for (int d = 0; d < DIM; d++) o[d] = acc[d];
#endif
}

/* Start fetching the next block's rows while this one is computed on: blocks lie anywhere in the pool, and the
 * hardware prefetcher does not follow a jump to another block. (Into L2 instead was faster for blocks scattered
 * over the pool but slower in the engine, whose sequences mostly hold runs of adjacent blocks.) */
static inline void prefetch_block(const void *pool, int64_t h, int64_t blk, int64_t num_blocks, int fmt) {
    const int64_t row_bytes = fmt == F32 ? (int64_t)sizeof(float) : 1;
    const char *first = (const char *)pool + (h * num_blocks + blk) * BS * DIM * row_bytes;
    for (int64_t c = 0; c < BS * DIM * row_bytes; c += 64) __builtin_prefetch(first + c);
}

/* Each of the groups' score rows s[g * span + t], t < len, replaced by exp(score - its max), and inv[g] set
 * to 1 / their sum: the softmax's weights before the division, which scale_outputs applies to the output. */
static inline void softmax_weights(float *s, int64_t groups, int64_t span, int64_t len, float *inv) {
    for (int64_t g = 0; g < groups; g++) {
        float *sg = s + g * span, top = sg[0], sum = 0.0f;
#pragma omp simd reduction(max : top)
        for (int64_t t = 1; t < len; t++) top = sg[t] > top ? sg[t] : top;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; t++) sum += (sg[t] = exp_neg(sg[t] - top));
        inv[g] = 1.0f / sum;
    }
}

/* o[g] *= inv[g] for the groups' DIM-wide output rows. */
static inline void scale_outputs(float *o, int64_t groups, const float *inv) {
    for (int64_t g = 0; g < groups; g++)
#pragma omp simd
        for (int d = 0; d < DIM; d++) o[g * DIM + d] *= inv[g];
}

/* Decode attention: out[h, b, g] = sum_t softmax_t(q[h, b, g] . K[h, t]) V[h, t] over the lens[b] tokens of
 * sequence b, which lie in the blocks tables[b, :]. K and V pools are fp32 (fmt F32; scales unused) or fp8
 * codes (E4M3, E5M2) with their scales; each block's rows serve all G queries of the head. The softmax's
 * division is applied to the G output rows at the end instead of to every weight. */
int decode_attention(const void *k_pool, const void *v_pool, const float *k_scales, const float *v_scales,
                     int64_t scale_head_stride, int64_t scale_block_stride, const int64_t *tables, const int64_t *lens,
                     const float *q, float *out, int64_t heads, int64_t batch, int64_t width, int64_t groups,
                     int64_t num_blocks, int fmt, int threads) {
    if (!tables_valid(tables, batch * width, num_blocks)) return -1;
    for (int64_t b = 0; b < batch; b++)
        if (lens[b] < 1 || lens[b] > width * BS) return -1;
    const int64_t n = heads * batch, span = width * BS;
    int64_t rows = 0; /* K rows read, all heads: below SERIAL_ROWS one thread beats waking the others */
    for (int64_t b = 0; b < batch; b++) rows += lens[b] * heads;
    if (rows < SERIAL_ROWS) threads = 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *s = malloc(sizeof(float) * (size_t)(groups * span + groups)); /* scores, then 1 / sums */
        float scratch[BS * DIM];
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t i = 0; i < n; i++) {
            if (!s) continue;
            const int64_t h = i / batch, b = i % batch, len = lens[b];
            const int64_t *table = tables + b * width;
            const float *qh = q + i * groups * DIM;
            float *o = out + i * groups * DIM, *inv = s + groups * span;
            for (int64_t j = 0; j * BS < len; j++) {
                const int tn = len - j * BS < BS ? (int)(len - j * BS) : BS;
                if ((j + 1) * BS < len) prefetch_block(k_pool, h, table[j + 1], num_blocks, fmt);
                const float *rows = block_rows(k_pool, k_scales, scale_head_stride, scale_block_stride, h, table[j],
                                               num_blocks, tn, fmt, scratch);
                for (int64_t g = 0; g < groups; g++) block_scores(qh + g * DIM, rows, tn, s + g * span + j * BS);
            }
            softmax_weights(s, groups, span, len, inv);
            memset(o, 0, sizeof(float) * groups * DIM);
            for (int64_t j = 0; j * BS < len; j++) {
                const int tn = len - j * BS < BS ? (int)(len - j * BS) : BS;
                if ((j + 1) * BS < len) prefetch_block(v_pool, h, table[j + 1], num_blocks, fmt);
                const float *rows = block_rows(v_pool, v_scales, scale_head_stride, scale_block_stride, h, table[j],
                                               num_blocks, tn, fmt, scratch);
                for (int64_t g = 0; g < groups; g++) block_weighted_sum(s + g * span + j * BS, rows, tn, o + g * DIM);
            }
            scale_outputs(o, groups, inv);
        }
        free(s);
    }
    return failed ? -2 : 0;
}

/* --- one layer's attention in a decode-only step, for the fused decoder (fused_decoder.py) --------------------
 *
 * The fused decoder hands each layer's attention to its cache's library through one function of the type
 * attend_fn (panel_matmul.c calls it by address between decoder_attention_in and decoder_mlp): store the step's
 * new K and V, then attend. Its operands:
 *   qkv      [B, (heads + 2 kv_heads) DIM] float   the layer's QKV rows after RoPE (queries unscaled), one per sequence
 *   context  [B, heads DIM] float                  the attention output, as PagedAttention returns it
 * and two structs: the layer's cache (attention_layer, fixed for the cache's life) and the step (attention_step,
 * shared by every layer of a KV cache group). Queries are scaled (q * scale, one rounding) and laid out [Hkv, B,
 * G, DIM] as PagedAttention._decode_group lays them, then the same kernel as the module path reads the cache, so
 * the results are the same bits. Returns 0, -1 (a slot, block id or length out of range: nothing written for a
 * slot), -2 (no scratch memory). */
struct attention_layer {
    void *k, *v;                               /* fp32 pools [kv_heads, num_blocks * BS, DIM] */
    uint8_t *codes, *centre;                   /* a staged cache's layer (kv_staged_kernels.c) */
    float *centre_scale;
    uint16_t *k_scale, *v_scale, *dense;
    int64_t num_blocks, num_dense, heads, kv_heads;
    float scale;                               /* of the query-key products */
};
struct attention_step {
    const int64_t *tables, *lens, *slots;      /* [B, width], [B], [B] (each new token's cache slot) */
    int64_t batch, width;
    /* a staged cache's writes (kv_staged.StagedWrites): completed blocks and their sources, dense rows */
    const int64_t *complete, *complete_src, *staged_slots, *dense_rows, *dense_slots;
    int64_t nc, ns, nd;
};

/* q [Hkv, B, G, DIM] <- each sequence's query heads of qkv times scale */
static void gather_queries(const struct attention_layer *L, int64_t batch, const float *qkv, float *q) {
    const int64_t groups = L->heads / L->kv_heads, nqkv = (L->heads + 2 * L->kv_heads) * DIM;
    for (int64_t h = 0; h < L->kv_heads; h++)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t g = 0; g < groups; g++) {
                const float *src = qkv + b * nqkv + (h * groups + g) * DIM;
                float *dst = q + ((h * batch + b) * groups + g) * DIM;
                for (int d = 0; d < DIM; d++) dst[d] = src[d] * L->scale;
            }
}

/* context [B, heads DIM] <- out [Hkv, B, G, DIM] */
static void scatter_outputs(const struct attention_layer *L, int64_t batch, const float *out, float *context) {
    const int64_t groups = L->heads / L->kv_heads;
    for (int64_t h = 0; h < L->kv_heads; h++)
        for (int64_t b = 0; b < batch; b++)
            memcpy(context + (b * L->heads + h * groups) * DIM, out + (h * batch + b) * groups * DIM,
                   sizeof(float) * groups * DIM);
}

/* attend_fn of an fp32 cache (KVCache.write's stores, then decode_attention with fmt F32). */
int attend_fp32(const struct attention_layer *L, const struct attention_step *S, const float *qkv, float *context,
                int threads) {
    const int64_t batch = S->batch, slots = L->num_blocks * BS, nqkv = (L->heads + 2 * L->kv_heads) * DIM;
    if (L->kv_heads < 1 || L->heads % L->kv_heads) return -1;
    for (int64_t b = 0; b < batch; b++)
        if (S->slots[b] < 0 || S->slots[b] >= slots) return -1;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < L->kv_heads; h++) {
            const float *k = qkv + b * nqkv + (L->heads + h) * DIM, *v = k + L->kv_heads * DIM;
            memcpy((float *)L->k + (h * slots + S->slots[b]) * DIM, k, sizeof(float) * DIM);
            memcpy((float *)L->v + (h * slots + S->slots[b]) * DIM, v, sizeof(float) * DIM);
        }
    float *q = malloc(sizeof(float) * (size_t)(2 * batch * L->heads * DIM));
    if (!q) return -2;
    gather_queries(L, batch, qkv, q);
    const float none = 0.0f;
    int rc = decode_attention(L->k, L->v, &none, &none, 0, 0, S->tables, S->lens, q, q + batch * L->heads * DIM,
                              L->kv_heads, batch, S->width, L->heads / L->kv_heads, L->num_blocks, F32, threads);
    if (rc == 0) scatter_outputs(L, batch, q + batch * L->heads * DIM, context);
    free(q);
    return rc;
}
