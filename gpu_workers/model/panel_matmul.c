/* fp32 matrix multiply on weights packed in panels of 16 output features (gpu_workers/model/panel_matmul.py).
 *
 * A weight W [N, K] (a linear layer's [out, in]) is stored as ceil(N / 16) panels, each [K, 16]: panel p
 * holds W[16p .. 16p + 15, k] for k = 0 .. K-1, the 16 values of one k contiguous (64 bytes), a partial
 * last panel padded with zeros. y = x @ W^T + bias then streams each panel once, front to back, whatever
 * the number of rows of x: at decode batch sizes the multiply is a read of the weights, and this layout
 * reads them as one forward stream per panel (the classic packed-B layout of BLIS/GotoBLAS GEMMs, with
 * the whole K depth in one panel).
 *
 * Each output y[m, n] is one thread's sum over k = 0, 1, ..., K-1 in that order, one fused
 * multiply-add at a time (then + bias[n]): the same operations whatever M is, whichever rows share the
 * call, however many threads run. A row's result is therefore independent of its batch neighbours,
 * bit for bit (what batch-invariant kernels aim at: Thinking Machines, "Defeating Nondeterminism in LLM
 * Inference", 2025).
 *
 * Tiles of up to TILE_ROWS rows of x by TILE_PANELS panels keep their accumulators in registers (GCC
 * vector extensions: a 16-float vector is one zmm with AVX-512, two ymm with AVX2); threads claim
 * chunks of panels (work_pool.h), and rows are taken in blocks whose slice of x stays in a core's L2
 * cache while the panels stream past it.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h> /* vdpbf16ps, for bf16_screen */
#endif

#include "work_pool.h"

/* The row operations of the decoder-layer halves below, rounded as layer_kernels.c rounds them. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#include "layer_ops.h"
#pragma GCC pop_options

#define PANEL 16
#ifdef __AVX512F__ /* 32 vector registers: 8 rows by 2 panels = 16 accumulators of one zmm */
#define TILE_ROWS 8
#define TILE_PANELS 2
#else /* 16 (AVX2): 6 rows by 1 panel = 12 accumulator ymm */
#define TILE_ROWS 6
#define TILE_PANELS 1
#endif
#define X_BLOCK_BYTES (512 * 1024) /* a row block's slice of x, read again for every panel pair */
#define CHUNKS_PER_THREAD 4        /* a late or preempted thread leaves the others little to wait for */

typedef float v16 __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx, const float *w0, const float *w1,
                                                       int64_t K, const float *bias, float *y, int64_t ldy,
                                                       int rows, int panels, int cols) {
    v16 acc[TILE_ROWS][2];
    for (int r = 0; r < rows; r++) {
        acc[r][0] = (v16){0};
        acc[r][1] = (v16){0};
    }
    for (int64_t k = 0; k < K; k++) {
        v16 a = *(const v16 *)(w0 + k * PANEL);
        v16 b = panels == 2 ? *(const v16 *)(w1 + k * PANEL) : (v16){0};
        for (int r = 0; r < rows; r++) {
            float s = x[r * ldx + k];
            acc[r][0] += a * s;
            if (panels == 2) acc[r][1] += b * s;
        }
    }
    for (int r = 0; r < rows; r++) {
        float out[2 * PANEL];
        memcpy(out, &acc[r][0], sizeof(v16));
        memcpy(out + PANEL, &acc[r][1], sizeof(v16));
        if (bias)
            for (int j = 0; j < cols; j++) out[j] += bias[j];
        memcpy(y + r * ldy, out, (size_t)cols * sizeof(float));
    }
}

/* tile() with rows and panels as constants, so that the accumulators live in registers. */
#define TILE_CASE(R)                                                                                           \
    case R:                                                                                                    \
        if (panels == 2)                                                                                       \
            tile(x, ldx, w0, w1, K, bias, y, ldy, R, 2, cols);                                                 \
        else                                                                                                   \
            tile(x, ldx, w0, w1, K, bias, y, ldy, R, 1, cols);                                                 \
        break;

static void tile_any(const float *x, int64_t ldx, const float *w0, const float *w1, int64_t K, const float *bias,
                     float *y, int64_t ldy, int rows, int panels, int cols) {
    switch (rows) {
        TILE_CASE(1)
        TILE_CASE(2)
        TILE_CASE(3)
        TILE_CASE(4)
        TILE_CASE(5)
        TILE_CASE(6)
#if TILE_ROWS > 6
        TILE_CASE(7)
        TILE_CASE(8)
#endif
    }
}

struct matmul_args {
    const float *x, *packed, *bias;
    float *y;
    int64_t M, K, ldx, N, ldy, panels, units, block, groups, group_units;
};

/* Rows m0 .. m1 - 1 (m0 a multiple of TILE_ROWS) of x by panel unit u (TILE_PANELS panels: outputs
 * TILE_PANELS * PANEL * u on). */
static void matmul_unit(const struct matmul_args *a, int64_t u, int64_t m0, int64_t m1) {
    int64_t p = TILE_PANELS * u;
    int np = p + 1 < a->panels ? TILE_PANELS : 1;
    int64_t n0 = p * PANEL;
    int cols = (int)(a->N - n0 < np * PANEL ? a->N - n0 : np * PANEL);
    const float *w0 = a->packed + p * a->K * PANEL;
    const float *w1 = np == 2 ? w0 + a->K * PANEL : w0;
    for (int64_t m = m0; m < m1; m += TILE_ROWS) {
        int rows = (int)(m1 - m < TILE_ROWS ? m1 - m : TILE_ROWS);
        tile_any(a->x + m * a->ldx, a->ldx, w0, w1, a->K, a->bias ? a->bias + n0 : 0, a->y + m * a->ldy + n0,
                 a->ldy, rows, np, cols);
    }
}

/* One chunk: one row block of x by one group of panel units. */
static void matmul_chunk(const void *arg, int64_t chunk) {
    const struct matmul_args *a = arg;
    int64_t m0 = chunk / a->groups * a->block, g = chunk % a->groups;
    int64_t m1 = m0 + a->block < a->M ? m0 + a->block : a->M;
    int64_t u1 = (g + 1) * a->group_units < a->units ? (g + 1) * a->group_units : a->units;
    for (int64_t u = g * a->group_units; u < u1; u++) matmul_unit(a, u, m0, m1);
}

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ W^T + bias, W packed as above (ceil(N / 16)
 * panels of [K, 16], 64-byte aligned); bias [N] or NULL. threads: the calling thread and threads-1 of the work pool
 * (work_pool.h) share the chunks, about CHUNKS_PER_THREAD each per row block. */
void panel_matmul(const float *x, int64_t M, int64_t K, int64_t ldx, const float *packed, int64_t N,
                  const float *bias, float *y, int64_t ldy, int threads) {
    struct matmul_args a = {x, packed, bias, y, M, K, ldx, N, ldy};
    a.panels = (N + PANEL - 1) / PANEL;
    a.units = (a.panels + TILE_PANELS - 1) / TILE_PANELS;
    a.block = K > 0 ? X_BLOCK_BYTES / (K * (int64_t)sizeof(float)) : TILE_ROWS; /* K = 0: y = bias */
    a.block = a.block < TILE_ROWS ? TILE_ROWS : a.block - a.block % TILE_ROWS;
    a.group_units = threads > 1 ? a.units / (threads * CHUNKS_PER_THREAD) : a.units;
    a.group_units = a.group_units < 1 ? 1 : a.group_units;
    a.groups = (a.units + a.group_units - 1) / a.group_units;
    pool_run(matmul_chunk, &a, (M + a.block - 1) / a.block * a.groups, threads);
}

/* Outputs per panel unit: panel_matmul_units computes whole units. */
int panel_unit_outputs(void) { return TILE_PANELS * PANEL; }

/* panel_matmul's y for the `count` panel units listed (unit u: outputs panel_unit_outputs() * u on, as
 * many as there are), every row of x, on the calling thread: the same tiles, so the same bits as
 * panel_matmul gives those outputs. The other outputs of y are not written. */
void panel_matmul_units(const float *x, int64_t M, int64_t K, int64_t ldx, const float *packed, int64_t N,
                        const float *bias, const int64_t *units, int64_t count, float *y, int64_t ldy) {
    struct matmul_args a = {x, packed, bias, y, M, K, ldx, N, ldy};
    a.panels = (N + PANEL - 1) / PANEL;
    a.units = (a.panels + TILE_PANELS - 1) / TILE_PANELS;
    for (int64_t i = 0; i < count; i++)
        if (units[i] >= 0 && units[i] < a.units) matmul_unit(&a, units[i], 0, M);
}

/* Greedy decoding's screen of an LM head (gpu_workers/model/greedy_head.py): y[m, n] ~ sum over k of
 * w[n, k] * x[m, k] on a bf16 copy of the weight, in panels of 16 outputs whose inputs go in pairs:
 * [ceil(N / 16), K / 2, 16, 2] (K even), one 32-bit lane per output holding inputs 2i (low half) and
 * 2i + 1. With AVX512-BF16, each pair of products is one vdpbf16ps lane on the inputs rounded to bf16
 * (xb: [M, K / 2] such pairs); without, each bf16 weight is widened (a shift, or a mask) and multiplied
 * by the fp32 input. fp32 sums either way. Half the bytes of the fp32 head; how far it can be from
 * panel_matmul's sums is bounded by the caller (for the bf16 inputs, the larger bound). Four panels at
 * a time for up to four rows of x. threads: as panel_matmul's. */
typedef uint32_t u32x16 __attribute__((vector_size(64)));
#define SCREEN_PANELS 4
#define SCREEN_ROWS 4

struct screen_args {
    const float *x;
    const uint32_t *xb;
    const uint32_t *w;
    float *y;
    int64_t M, K, N, panels, per_chunk;
};

static inline __attribute__((always_inline)) void screen_tile(const struct screen_args *a, int64_t p, int np,
                                                              int64_t m0, int rows) {
    v16 acc[SCREEN_PANELS][SCREEN_ROWS];
    for (int j = 0; j < SCREEN_PANELS; j++)
        for (int r = 0; r < SCREEN_ROWS; r++) acc[j][r] = (v16){0};
    int64_t pairs = a->K / 2;
    const uint32_t *w = a->w + p * pairs * PANEL;
    for (int64_t i = 0; i < pairs; i++) {
        for (int j = 0; j < np; j++) {
            u32x16 h;
            memcpy(&h, w + (j * pairs + i) * PANEL, sizeof h);
#ifdef __AVX512BF16__
            for (int r = 0; r < rows; r++)
                acc[j][r] = (v16)_mm512_dpbf16_ps((__m512)acc[j][r], (__m512bh)(__m512i)h,
                                                  (__m512bh)_mm512_set1_epi32((int)a->xb[(m0 + r) * pairs + i]));
#else
            v16 even = (v16)(h << 16), odd = (v16)(h & 0xFFFF0000u);
            for (int r = 0; r < rows; r++) {
                const float *x = a->x + (m0 + r) * a->K + 2 * i;
                acc[j][r] += even * x[0];
                acc[j][r] += odd * x[1];
            }
#endif
        }
    }
    for (int j = 0; j < np; j++) {
        int64_t n0 = (p + j) * PANEL;
        int cols = (int)(a->N - n0 < PANEL ? a->N - n0 : PANEL);
        for (int r = 0; r < rows; r++) {
            float out[PANEL];
            memcpy(out, &acc[j][r], sizeof out);
            memcpy(a->y + (m0 + r) * a->N + n0, out, (size_t)cols * sizeof(float));
        }
    }
}

static void screen_chunk(const void *arg, int64_t chunk) {
    const struct screen_args *a = arg;
    int64_t p0 = chunk * a->per_chunk, p1 = p0 + a->per_chunk < a->panels ? p0 + a->per_chunk : a->panels;
    for (int64_t p = p0; p < p1; p += SCREEN_PANELS) {
        int np = (int)(p1 - p < SCREEN_PANELS ? p1 - p : SCREEN_PANELS);
        for (int64_t m0 = 0; m0 < a->M; m0 += SCREEN_ROWS) {
            int rows = (int)(a->M - m0 < SCREEN_ROWS ? a->M - m0 : SCREEN_ROWS);
            if (np == SCREEN_PANELS && rows == 1)
                screen_tile(a, p, SCREEN_PANELS, m0, 1);
            else
                screen_tile(a, p, np, m0, rows);
        }
    }
}

/* Whether bf16_screen multiplies bf16-rounded inputs (AVX512-BF16) rather than the fp32 ones. */
int bf16_screen_rounds_inputs(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

/* x [M, K] fp32, xb [M, K / 2] its bf16 pairs, w the pair panels above, y [M, N]. Returns 0, or -1 on
 * bad sizes. */
int bf16_screen(const float *x, const uint32_t *xb, int64_t M, int64_t K, const uint32_t *w, int64_t N, float *y,
                int threads) {
    if (K <= 0 || K % 2 || N <= 0 || M <= 0) return -1;
    struct screen_args a = {x, xb, w, y, M, K, N, (N + PANEL - 1) / PANEL, 0};
    int64_t groups = (a.panels + SCREEN_PANELS - 1) / SCREEN_PANELS;
    int64_t per = threads > 1 ? groups / (threads * CHUNKS_PER_THREAD) : groups;
    a.per_chunk = (per < 1 ? 1 : per) * SCREEN_PANELS;
    pool_run(screen_chunk, &a, (a.panels + a.per_chunk - 1) / a.per_chunk, threads);
    return 0;
}

/* The candidates of a screen (greedy_head.py): for each row m of y [M, N] (screened logits), the
 * outputs n with y + b >= max over n' of (y - b), b = (sa[m] * ea[n] + sb[m] * eb[n]) * margin + floor_err, in
 * float64, written in increasing n to ids[m * cap ..] (counts[m] of them). Returns 0; -1 where a row has
 * more than cap candidates or a value is not finite (the caller then computes every logit). */
int greedy_candidates(const float *y, int64_t M, int64_t N, const double *ea, const double *eb, const double *sa,
                      const double *sb, double margin, double floor_err, int64_t *ids, int64_t cap, int64_t *counts) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = y + m * N;
        double floor = -__builtin_inf();
        for (int64_t n = 0; n < N; n++) {
            double v = (double)row[n];
            if (!__builtin_isfinite(v)) return -1;
            double lo = v - ((sa[m] * ea[n] + sb[m] * eb[n]) * margin + floor_err);
            floor = lo > floor ? lo : floor;
        }
        int64_t c = 0;
        for (int64_t n = 0; n < N; n++)
            if ((double)row[n] + (sa[m] * ea[n] + sb[m] * eb[n]) * margin + floor_err >= floor) {
                if (c == cap) return -1;
                ids[m * cap + c++] = n;
            }
        counts[m] = c;
    }
    return 0;
}

/* packed (ceil(N / 16) panels of [K, 16]) from w [N, K] row-major (row stride ldw); the padding of a
 * partial last panel is zero. */
void panel_pack(const float *w, int64_t N, int64_t K, int64_t ldw, float *packed) {
    int64_t panels = (N + PANEL - 1) / PANEL;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t k = 0; k < K; k++)
            for (int j = 0; j < PANEL; j++) {
                int64_t n = p * PANEL + j;
                packed[(p * K + k) * PANEL + j] = n < N ? w[n * ldw + k] : 0.0f;
            }
}

/* A linear layer's weight as the decoder halves below take it: fp32 panels (fn NULL: panel_matmul),
 * or another library's kernel fn with its operands (quant_kernels.c's int8_matmul and int4_linear,
 * which keep GGUF weights quantized), called as fn(x, M, k, w, scale, zero, n, group, y, threads) on
 * contiguous rows; bias [n] or NULL, added after the sum as panel_matmul adds it. */
typedef int (*linear_fn)(const float *x, int64_t m, int64_t k, const void *w, const float *scale, const float *zero,
                         int64_t n, int64_t group, float *y, int threads);
struct linear {
    const void *w;
    const float *scale, *zero, *bias;
    linear_fn fn;
    int64_t k, n, group;
};

/* y [T, L->n] = x [T, L->k] (contiguous) through L. */
static void linear_apply(const struct linear *L, const float *x, int64_t T, float *y, int threads) {
    if (!L->fn) {
        panel_matmul(x, T, L->k, L->k, L->w, L->n, L->bias, y, L->n, threads);
        return;
    }
    L->fn(x, T, L->k, L->w, L->scale, L->zero, L->n, L->group, y, threads);
    if (L->bias)
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < L->n; j++) y[t * L->n + j] += L->bias[j];
}

/* A decoder layer in C calls around its attention, for T rows (tokens) of hidden size H (llama.py's
 * LlamaDecoderLayer, gemma3.py's Gemma3DecoderLayer, and fused_decoder.py): the operations, their
 * order and their rounding are those of the layer's one-operation-a-call form (layer_kernels.c, the
 * linears' own kernels), so the results are the same bits. The small operations run on the calling
 * thread (at decode batch sizes they cost less than a hand-off); the matmuls split over their
 * kernel's pool.
 *
 * Attention in: s = x + residual (s = x where residual is NULL), n = RMSNorm(s) * norm_w (1 + norm_w:
 * offset), qkv = n @ Wqkv^T + bqkv [T, qkv->n]; then each of the heads query and kv_heads key heads of
 * d (the first heads + kv_heads of each qkv row) RMS-normalized by q_norm_w or k_norm_w [d] where
 * these are given (Qwen3's and Gemma 3's q/k norms, with qk_eps and the same offset), and rotated in
 * place by cos, sin [T, d / 2]. s_out, n [T, H] scratch-or-output. */
void decoder_attention_in(const float *x, const float *residual, const float *norm_w, float eps, int offset,
                          int64_t T, int64_t H, const struct linear *wqkv, const float *q_norm_w,
                          const float *k_norm_w, float qk_eps, int64_t heads, int64_t kv_heads, const float *cos,
                          const float *sin, int64_t d, float *s_out, float *n, float *qkv, int threads) {
    for (int64_t t = 0; t < T; t++) {
        if (residual)
            add_norm_row(x + t * H, residual + t * H, norm_w, eps, offset, H, n + t * H, s_out + t * H);
        else
            norm_row(x + t * H, norm_w, eps, offset, H, n + t * H);
    }
    linear_apply(wqkv, n, T, qkv, threads);
    int64_t nqkv = wqkv->n;
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < heads + kv_heads; h++) {
            float *head = qkv + t * nqkv + h * d;
            const float *w = h < heads ? q_norm_w : k_norm_w;
            if (w)
                norm_row(head, w, qk_eps, offset, d, head); /* in place: each value is read before it is written */
            rope_head(head, cos + t * (d / 2), sin + t * (d / 2), d / 2, head);
        }
}

/* Gemma 3's layer after attention, up to its activation: o = attn @ Wo^T (attn [T, wo->k]),
 * p = RMSNorm(o) * (1 + post_attn_w), s2 = p + s, n2 = RMSNorm(s2) * (1 + pre_ff_w), gu = n2 @ Wgu^T
 * [T, wgu->n]. o, p, n2: scratch. The activation (GeLU, tanh form) stays torch's, then gemma_mlp_out. */
void gemma_mlp_in(const float *attn, const float *s, const struct linear *wo, const float *post_attn_w,
                  const float *pre_ff_w, float eps, const struct linear *wgu, int64_t T, int64_t H, float *o,
                  float *p, float *s2, float *n2, float *gu, int threads) {
    linear_apply(wo, attn, T, o, threads);
    for (int64_t t = 0; t < T; t++) {
        norm_row(o + t * H, post_attn_w, eps, 1, H, p + t * H);
        add_norm_row(p + t * H, s + t * H, pre_ff_w, eps, 1, H, n2 + t * H, s2 + t * H);
    }
    linear_apply(wgu, n2, T, gu, threads);
}

/* Gemma 3's layer after its activation a [T, wd->k]: dn = a @ Wd^T, out = s2 + RMSNorm(dn) * (1 +
 * post_ff_w) [T, H], the layer's output. dn, q: scratch. */
void gemma_mlp_out(const float *a, const float *s2, const struct linear *wd, const float *post_ff_w, float eps,
                   int64_t T, int64_t H, float *dn, float *q, float *out, int threads) {
    linear_apply(wd, a, T, dn, threads);
    for (int64_t t = 0; t < T; t++) {
        norm_row(dn + t * H, post_ff_w, eps, 1, H, q + t * H);
        for (int64_t i = 0; i < H; i++) out[t * H + i] = s2[t * H + i] + q[t * H + i];
    }
}

/* The MLP half: h = attn @ Wo^T + bo (attn [T, wo->k]), s2 = h + s, n2 = RMSNorm(s2) * post_w,
 * gu = n2 @ Wgu^T + bgu [T, 2 inter] (inter = wgu->n / 2), a = silu(gate) * up [T, inter],
 * out = a @ Wd^T + bd [T, H]. The layer's output is out + s2 (added by the next layer's
 * decoder_attention_in, or before the final norm). h, n2, gu, a: scratch. */
void decoder_mlp(const float *attn, const float *s, const struct linear *wo, const float *post_w, float eps,
                 int offset, const struct linear *wgu, const struct linear *wd, int64_t T, int64_t H, float *h,
                 float *s2, float *n2, float *gu, float *a, float *out, int threads) {
    int64_t inter = wgu->n / 2;
    linear_apply(wo, attn, T, h, threads);
    for (int64_t t = 0; t < T; t++)
        add_norm_row(h + t * H, s + t * H, post_w, eps, offset, H, n2 + t * H, s2 + t * H);
    linear_apply(wgu, n2, T, gu, threads);
    for (int64_t t = 0; t < T; t++) silu_mul_row(gu + t * 2 * inter, inter, a + t * inter);
    linear_apply(wd, a, T, out, threads);
}

/* One layer's attention in a decode-only step, done by the KV cache's library (fp8_kernels.c's attend_fp32,
 * kv_staged_kernels.c's attend_staged): store the step's K and V from qkv [B, (heads + 2 kv_heads) d] (after
 * RoPE), attend, write context [B, heads d]. layer and step are that library's structs. Returns 0 or < 0. */
typedef int (*attend_fn)(const void *layer, const void *step, const float *qkv, float *context, int threads);

/* A Llama-family decoder layer as decoder_layers runs it (fused_decoder.py builds them): its norms (q_norm_w,
 * k_norm_w NULL where it has none), linears, heads, and its attention (attend with its cache layer operand, for
 * the step of its KV cache group). */
struct decoder_layer {
    const float *norm_w, *post_w, *q_norm_w, *k_norm_w;
    float eps, post_eps, qk_eps;
    int offset;
    int64_t heads, kv_heads, d, group;
    const struct linear *qkv, *o, *gate_up, *down;
    attend_fn attend;
    const void *attention;
};

/* A decode-only step through n Llama-family layers, each decoder_attention_in, its attend, decoder_mlp: what
 * fused_decoder.py's loop of those calls computes, the same bits, with no return to Python between layers.
 * x [T, H]: the input embeddings; cos, sin [T, d / 2]; steps[g]: KV cache group g's attention step. Buffers as
 * that loop's: the last layer's output is out + mlp_stream [T, H]. Returns 0, or the first failing attend's
 * code (the layers after it are not run). */
int decoder_layers(const struct decoder_layer *layers, int64_t n, const float *x, int64_t T, int64_t H,
                   const float *cos, const float *sin, const void *const *steps, float *stream, float *mlp_stream,
                   float *out, float *normed, float *qkv, float *context, float *h, float *n2, float *gu, float *a,
                   int threads) {
    const float *in = x, *residual = NULL;
    for (int64_t i = 0; i < n; i++) {
        const struct decoder_layer *L = layers + i;
        decoder_attention_in(in, residual, L->norm_w, L->eps, L->offset, T, H, L->qkv, L->q_norm_w, L->k_norm_w,
                             L->qk_eps, L->heads, L->kv_heads, cos, sin, L->d, stream, normed, qkv, threads);
        int rc = L->attend(L->attention, steps[L->group], qkv, context, threads);
        if (rc) return rc;
        decoder_mlp(context, residual ? stream : in, L->o, L->post_w, L->post_eps, L->offset, L->gate_up, L->down,
                    T, H, h, mlp_stream, n2, gu, a, out, threads);
        in = out, residual = mlp_stream;
    }
    return 0;
}
