/* Fused KV-cache kernels for CPUs (built and loaded by fp8_kernels.py): decode attention over fp8 blocks,
 * and over fp32 blocks (f32_decode_attention, at the end).
 *
 * Decode attention reads the cache's fp8 codes where they lie and converts them in registers, so no
 * fp32 copy of K or V is ever written: torch's fp8 -> fp32 cast is a scalar loop on CPUs, and even a
 * vectorized dequantize-then-matmul writes and reads 4 bytes per value for each 1 byte of cache.
 *
 * Layouts (all contiguous):
 *   codes   [heads, num_blocks, BS, DIM] uint8       one layer's K (or V) pool
 *   scales  scale of (head h, block b) at scales[h * scale_head_stride + b * scale_block_stride]
 *           (strides 0, 0: one scale for the whole layer)
 *   tables  [batch, width] int64                     each sequence's blocks, padded with valid ids
 *   q       [heads, batch, groups, DIM] float        queries, grouped by their KV head
 *   scores  [heads, batch, groups, width * BS] float
 *   probs   like scores; out [heads, batch, groups, DIM] float
 *
 * DIM (head_dim) and BS (block size) are compile-time constants: fp8_kernels.py compiles one library
 * per pair. Every function returns 0, or -1 when a block id is out of range (nothing is read then).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if !defined(DIM) || !defined(BS)
#error "compile with -DDIM=<head_dim> -DBS=<block_size>"
#endif

enum { E4M3 = 0, E5M2 = 1 };

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

#if defined(__AVX512F__) && BS == 16 && DIM % 16 == 0
#define SCORES_AVX512 1

/* 16 fp8 codes -> 16 floats through fp16 bit patterns (the hardware converts fp16 subnormals):
 * e5m2 is the top byte of an fp16; e4m3 lands 2^-8 of its value (the caller folds 256 into the scale). */
static inline __m512 fp8x16(__m128i bytes, int fmt) {
    __m256i u = _mm256_cvtepu8_epi16(bytes);
    __m256i h;
    if (fmt == E4M3)
        h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x80)), 8),
                            _mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x7f)), 7));
    else
        h = _mm256_slli_epi16(u, 8);
    return _mm512_cvtph_ps(h);
}

/* Lane i of the result is the sum of the 16 lanes of v[SLOT[i]]: a transposing tree of shuffles,
 * 15 adds for 16 dot products instead of a horizontal reduction per product. */
static const int SLOT[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

static inline __m512 sum16(__m512 v[16]) {
    for (int i = 0; i < 8; i++)
        v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)
        v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 4], 0x88), _mm512_shuffle_f32x4(v[i], v[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)
        v[i] = _mm512_add_ps(_mm512_shuffle_ps(v[i], v[i + 2], 0x44), _mm512_shuffle_ps(v[i], v[i + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD));
}
#endif

/* scores[h, b, g, j * BS + t] = scale(h, blk) * q[h, b, g] . K[h, blk, t] with blk = tables[b, j] */
int fp8_decode_scores(const uint8_t *codes, const float *scales, int64_t scale_head_stride,
                      int64_t scale_block_stride, const int64_t *tables, const float *q, float *scores,
                      int64_t heads, int64_t batch, int64_t width, int64_t groups, int64_t num_blocks, int fmt,
                      int threads) {
    if (!tables_valid(tables, batch * width, num_blocks)) return -1;
    const int64_t len = width * BS;
    const int64_t n = heads * batch * width;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const int64_t h = i / (batch * width), b = (i / width) % batch, j = i % width;
        const int64_t blk = tables[b * width + j];
        const uint8_t *src = codes + (h * num_blocks + blk) * BS * DIM;
        const float scale = scales[h * scale_head_stride + blk * scale_block_stride];
        const float *qh = q + (h * batch + b) * groups * DIM;
        float *dst = scores + (h * batch + b) * groups * len + j * BS;
#ifdef SCORES_AVX512
        __m512 rows[BS][DIM / 16];
        for (int t = 0; t < BS; t++)
            for (int c = 0; c < DIM / 16; c++)
                rows[t][c] = fp8x16(_mm_loadu_si128((const __m128i *)(src + t * DIM + c * 16)), fmt);
        const __m512 s = _mm512_set1_ps(fmt == E4M3 ? scale * 256.0f : scale);
        for (int64_t g = 0; g < groups; g++) {
            __m512 acc[16];
            for (int t = 0; t < BS; t++) {
                __m512 a = _mm512_setzero_ps();
                for (int c = 0; c < DIM / 16; c++)
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + g * DIM + c * 16), rows[t][c], a);
                acc[SLOT[t]] = a;
            }
            _mm512_storeu_ps(dst + g * len, _mm512_mul_ps(sum16(acc), s));
        }
#else
        float block[BS * DIM];
        convert(src, block, BS * DIM, 1.0f, fmt);
        for (int64_t g = 0; g < groups; g++) {
            const float *qg = qh + g * DIM;
            for (int t = 0; t < BS; t++) {
                float acc = 0.0f;
                for (int d = 0; d < DIM; d++) acc += qg[d] * block[t * DIM + d];
                dst[g * len + t] = acc * scale;
            }
        }
#endif
    }
    return 0;
}

/* out[h, b, g] = sum over j, t of probs[h, b, g, j * BS + t] * scale(h, blk) * V[h, blk, t] */
int fp8_decode_weighted_sum(const uint8_t *codes, const float *scales, int64_t scale_head_stride,
                            int64_t scale_block_stride, const int64_t *tables, const float *probs, float *out,
                            int64_t heads, int64_t batch, int64_t width, int64_t groups, int64_t num_blocks,
                            int fmt, int threads) {
    if (!tables_valid(tables, batch * width, num_blocks)) return -1;
    const int64_t len = width * BS;
    const int64_t n = heads * batch;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const int64_t h = i / batch, b = i % batch;
        float *acc = out + i * groups * DIM;
        const float *p = probs + i * groups * len;
        float block[BS * DIM];
        memset(acc, 0, sizeof(float) * groups * DIM);
        for (int64_t j = 0; j < width; j++) {
            const int64_t blk = tables[b * width + j];
            const float scale = scales[h * scale_head_stride + blk * scale_block_stride];
            int used = 0;
            for (int64_t g = 0; g < groups && !used; g++)
                for (int t = 0; t < BS; t++) used |= p[g * len + j * BS + t] != 0.0f;
            if (!used) continue; /* padding past the sequence's end: probabilities are exactly 0 */
            convert(codes + (h * num_blocks + blk) * BS * DIM, block, BS * DIM, 1.0f, fmt);
            for (int64_t g = 0; g < groups; g++) {
                float *a = acc + g * DIM;
                for (int t = 0; t < BS; t++) {
                    const float w = p[g * len + j * BS + t] * scale;
                    for (int d = 0; d < DIM; d++) a[d] += w * block[t * DIM + d];
                }
            }
        }
    }
    return 0;
}

/* out[r] = codes[r] * scales[r] for rows of DIM codes (a gathered context, or blocks being rescaled) */
int fp8_dequantize_rows(const uint8_t *codes, const float *scales, float *out, int64_t rows, int fmt, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) convert(codes + r * DIM, out + r * DIM, DIM, scales[r], fmt);
    return 0;
}

/* Decode attention over an fp32 cache, fused (scores, softmax, weighted sum of V) per (KV head, sequence):
 * out[h, b, g] = sum_t softmax_t(q[h, b, g] . K[h, t]) V[h, t] over the lens[b] tokens of sequence b, which lie
 * in the blocks tables[b, :]. q comes scaled. Each K and V row is read once for all the head's G queries, only up
 * to the sequence's length (no padding). Pools: [heads, num_blocks, BS, DIM] float. Returns -1 for a bad block id
 * or length, -2 when scratch memory cannot be had. */
int f32_decode_attention(const float *k_pool, const float *v_pool, const int64_t *tables, const int64_t *lens,
                         const float *q, float *out, int64_t heads, int64_t batch, int64_t width, int64_t groups,
                         int64_t num_blocks, int threads) {
    if (!tables_valid(tables, batch * width, num_blocks)) return -1;
    for (int64_t b = 0; b < batch; b++)
        if (lens[b] < 1 || lens[b] > width * BS) return -1;
    const int64_t n = heads * batch, span = width * BS;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *s = malloc(sizeof(float) * (size_t)(groups * span));
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t i = 0; i < n; i++) {
            if (!s) continue;
            const int64_t h = i / batch, b = i % batch, len = lens[b];
            const float *qh = q + i * groups * DIM;
            float *o = out + i * groups * DIM;
            for (int64_t j = 0; j * BS < len; j++) {
                const float *kb = k_pool + (h * num_blocks + tables[b * width + j]) * BS * DIM;
                const int tn = len - j * BS < BS ? (int)(len - j * BS) : BS;
                for (int t = 0; t < tn; t++)
                    for (int64_t g = 0; g < groups; g++) {
                        float acc = 0.0f;
                        for (int d = 0; d < DIM; d++) acc += qh[g * DIM + d] * kb[t * DIM + d];
                        s[g * span + j * BS + t] = acc;
                    }
            }
            for (int64_t g = 0; g < groups; g++) {
                float *sg = s + g * span, top = sg[0], sum = 0.0f;
                for (int64_t t = 1; t < len; t++) top = sg[t] > top ? sg[t] : top;
                for (int64_t t = 0; t < len; t++) sum += (sg[t] = expf(sg[t] - top));
                const float inv = 1.0f / sum;
                for (int64_t t = 0; t < len; t++) sg[t] *= inv;
            }
            memset(o, 0, sizeof(float) * groups * DIM);
            for (int64_t j = 0; j * BS < len; j++) {
                const float *vb = v_pool + (h * num_blocks + tables[b * width + j]) * BS * DIM;
                const int tn = len - j * BS < BS ? (int)(len - j * BS) : BS;
                for (int t = 0; t < tn; t++)
                    for (int64_t g = 0; g < groups; g++) {
                        const float w = s[g * span + j * BS + t];
                        for (int d = 0; d < DIM; d++) o[g * DIM + d] += w * vb[t * DIM + d];
                    }
            }
        }
        free(s);
    }
    return failed ? -2 : 0;
}
