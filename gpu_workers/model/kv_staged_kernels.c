/* Kernels of the staged fp8 KV cache (gpu_workers/model/kv_staged.py; numerics in kv_quant.py), built and
 * loaded by kv_staged_kernels.py: decode attention over a block table that mixes fp8 blocks with bf16 (sink
 * and staging) ones, reads of K and V by slot in one pass, and a step's writes (completed blocks quantized,
 * new tokens stored in bf16) in one call per layer.
 *
 * The decode loop, the fp8 code values, exp and the vectorized dot products and weighted sums are
 * fp8_kernels.c's (included: one library). DIM and BS are compile-time constants as there.
 */
#include "fp8_kernels.c"

/* ---- the staged fp8 cache (gpu_workers/model/kv_staged.py, kv_quant.py) ------------------------------------
 * One layer's tensors (all contiguous):
 *   codes         [2, heads, num_blocks * BS, DIM] uint8   K residual codes, V codes
 *   centre        [heads, num_blocks, DIM] uint8           K's per-channel centre codes
 *   centre_scale  [heads, num_blocks] float                their scale
 *   k_scale       [heads, num_blocks, DIM] bf16            K's per-channel residual scales
 *   v_scale       [heads, num_blocks * BS] bf16            V's per-token scales
 *   dense         [2, heads, num_dense * BS, DIM] bf16     the sink and staging blocks
 * Block ids < num_blocks are fp8 blocks; ids num_blocks .. num_blocks + num_dense - 1 are dense blocks, and
 * slot s >= num_blocks * BS is dense slot s - num_blocks * BS. Read back (kv_quant.dequantize_keys/values):
 *   K[t, d] = code(k[t, d]) * k_scale[d] + code(centre[d]) * centre_scale,   V[t, d] = code(v[t, d]) * v_scale[t]. */

/* SERIAL_ROWS (fp8_kernels.c): K/V rows below which a staged kernel runs on one thread */

typedef struct {
    const uint8_t *codes, *centre;
    const float *centre_scale;
    const uint16_t *k_scale, *v_scale, *dense;
    int64_t heads, num_blocks, num_dense;
    int fmt;
} staged_layer;

static inline float bf16_value(uint16_t x) {
    const uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline void bf16_rows(const uint16_t *restrict src, float *restrict dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_value(src[i]);
}

/* fp8 code values of n elements, scales not applied */
static inline void code_rows(const uint8_t *restrict src, float *restrict dst, int64_t n, int fmt) {
    convert(src, dst, n, 1.0f, fmt);
}

/* First of head h's rows of K (kv 0) or V (kv 1) of dense block id blk (>= num_blocks). */
static inline const uint16_t *dense_rows(const staged_layer *c, int kv, int64_t h, int64_t blk) {
    return c->dense + ((kv * c->heads + h) * c->num_dense + (blk - c->num_blocks)) * BS * DIM;
}

static inline const uint8_t *code_block(const staged_layer *c, int kv, int64_t h, int64_t blk) {
    return c->codes + ((kv * c->heads + h) * c->num_blocks + blk) * BS * DIM;
}

/* s[g * span + t] = q[g] . K[t] for the tn rows of head h's block blk, each of the G queries. */
static void staged_block_scores(const staged_layer *c, int64_t h, int64_t blk, int tn, const float *q, int64_t groups,
                                float *s, int64_t span, float *scratch) {
    if (blk >= c->num_blocks) {
        bf16_rows(dense_rows(c, 0, h, blk), scratch, tn * DIM);
        for (int64_t g = 0; g < groups; g++) block_scores(q + g * DIM, scratch, tn, s + g * span);
        return;
    }
    /* q . (r * scale + centre) = (q * scale) . r + q . centre: the scales fold into the query */
    const int64_t hb = h * c->num_blocks + blk;
    const uint16_t *ks = c->k_scale + hb * DIM;
    const uint8_t *cc = c->centre + hb * DIM;
    const float cs = c->centre_scale[hb];
    float qs[DIM];
    code_rows(code_block(c, 0, h, blk), scratch, tn * DIM, c->fmt);
    for (int64_t g = 0; g < groups; g++) {
        const float *qg = q + g * DIM;
        float qc = 0.0f;
#pragma omp simd reduction(+ : qc)
        for (int d = 0; d < DIM; d++) {
            qs[d] = qg[d] * bf16_value(ks[d]);
            qc += qg[d] * (fp8_value(cc[d], c->fmt) * cs);
        }
        float *sg = s + g * span;
        block_scores(qs, scratch, tn, sg);
        for (int t = 0; t < tn; t++) sg[t] += qc;
    }
}

/* o[g] += sum_t w[g * span + t] V[t] over the tn rows of head h's block blk, each of the G queries. */
static void staged_block_sum(const staged_layer *c, int64_t h, int64_t blk, int tn, const float *w, int64_t groups,
                             int64_t span, float *o, float *scratch) {
    if (blk >= c->num_blocks) {
        bf16_rows(dense_rows(c, 1, h, blk), scratch, tn * DIM);
        for (int64_t g = 0; g < groups; g++) block_weighted_sum(w + g * span, scratch, tn, o + g * DIM);
        return;
    }
    const uint16_t *vs = c->v_scale + (h * c->num_blocks + blk) * BS;
    float ws[BS];
    code_rows(code_block(c, 1, h, blk), scratch, tn * DIM, c->fmt);
    for (int64_t g = 0; g < groups; g++) {
        for (int t = 0; t < tn; t++) ws[t] = w[g * span + t] * bf16_value(vs[t]); /* per-token scales fold into the weights */
        block_weighted_sum(ws, scratch, tn, o + g * DIM);
    }
}

static inline void staged_prefetch(const staged_layer *c, int kv, int64_t h, int64_t blk) {
    const char *first = blk >= c->num_blocks ? (const char *)dense_rows(c, kv, h, blk) : (const char *)code_block(c, kv, h, blk);
    const int64_t bytes = blk >= c->num_blocks ? BS * DIM * 2 : BS * DIM;
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(first + i);
}

/* Decode attention over a staged cache: as decode_attention (same arguments for tables, lens, q, out), each
 * block read from the fp8 pool or the dense pool by its id, fp8 codes converted as they are read. */
int staged_decode_attention(const uint8_t *codes, const uint8_t *centre, const float *centre_scale,
                            const uint16_t *k_scale, const uint16_t *v_scale, const uint16_t *dense,
                            const int64_t *tables, const int64_t *lens, const float *q, float *out, int64_t heads,
                            int64_t batch, int64_t width, int64_t groups, int64_t num_blocks, int64_t num_dense,
                            int fmt, int threads) {
    if (!tables_valid(tables, batch * width, num_blocks + num_dense)) return -1;
    for (int64_t b = 0; b < batch; b++)
        if (lens[b] < 1 || lens[b] > width * BS) return -1;
    const staged_layer c = {codes, centre, centre_scale, k_scale, v_scale, dense, heads, num_blocks, num_dense, fmt};
    const int64_t n = heads * batch, span = width * BS;
    int failed = 0;
    /* a few thousand rows take microseconds: waking threads (descheduled ones, on a loaded host) costs more */
    int64_t rows = 0;
    for (int64_t b = 0; b < batch; b++) rows += heads * lens[b];
    if (rows < SERIAL_ROWS) threads = 1;
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
            float *o = out + i * groups * DIM, *inv = s + groups * span;
            for (int64_t j = 0; j * BS < len; j++) {
                const int tn = len - j * BS < BS ? (int)(len - j * BS) : BS;
                if ((j + 1) * BS < len) staged_prefetch(&c, 0, h, table[j + 1]);
                staged_block_scores(&c, h, table[j], tn, q + i * groups * DIM, groups, s + j * BS, span, scratch);
            }
            softmax_weights(s, groups, span, len, inv);
            memset(o, 0, sizeof(float) * groups * DIM);
            for (int64_t j = 0; j * BS < len; j++) {
                const int tn = len - j * BS < BS ? (int)(len - j * BS) : BS;
                if ((j + 1) * BS < len) staged_prefetch(&c, 1, h, table[j + 1]);
                staged_block_sum(&c, h, table[j], tn, s + j * BS, groups, span, o, scratch);
            }
            scale_outputs(o, groups, inv);
        }
        free(s);
    }
    return failed ? -2 : 0;
}

/* out [2, heads, n, DIM] float: K and V of the n slots (fp8 slots read back, dense ones as they are), in one pass:
 * a prefill chunk's context (gather) and decode's blocks (gather_blocks, as their slots). Bit for bit what
 * kv_quant.dequantize_keys/values compute: products rounded before the sum (no fused multiply-add). */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
static inline void read_row(const uint8_t *restrict kc, const uint8_t *restrict vc, const uint8_t *restrict cc, float cs,
                            const uint16_t *restrict ks, float vs, float *restrict k, float *restrict v, const int fmt) {
#pragma omp simd
    for (int d = 0; d < DIM; d++) {
        k[d] = fp8_value(kc[d], fmt) * bf16_value(ks[d]) + fp8_value(cc[d], fmt) * cs;
        v[d] = fp8_value(vc[d], fmt) * vs;
    }
}

int staged_gather(const uint8_t *codes, const uint8_t *centre, const float *centre_scale, const uint16_t *k_scale,
                  const uint16_t *v_scale, const uint16_t *dense, const int64_t *slots, float *out, int64_t heads,
                  int64_t n, int64_t num_blocks, int64_t num_dense, int fmt, int threads) {
    const int64_t fp8_slots = num_blocks * BS;
    for (int64_t i = 0; i < n; i++)
        if (slots[i] < 0 || slots[i] >= (num_blocks + num_dense) * BS) return -1;
    const staged_layer c = {codes, centre, centre_scale, k_scale, v_scale, dense, heads, num_blocks, num_dense, fmt};
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2) if (heads * n >= SERIAL_ROWS)
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < n; i++) {
            const int64_t slot = slots[i];
            float *k = out + (h * n + i) * DIM, *v = out + ((heads + h) * n + i) * DIM;
            if (slot >= fp8_slots) {
                const int64_t off = (h * num_dense * BS + slot - fp8_slots) * DIM;
                bf16_rows(c.dense + off, k, DIM);
                bf16_rows(c.dense + heads * num_dense * BS * DIM + off, v, DIM);
                continue;
            }
            const int64_t hb = h * num_blocks + slot / BS;
            const uint8_t *kc = codes + (h * fp8_slots + slot) * DIM, *vc = codes + ((heads + h) * fp8_slots + slot) * DIM;
            const float vs = bf16_value(v_scale[h * fp8_slots + slot]);
            if (fmt == E4M3) /* the format a constant in each copy, so that the row loops vectorize */
                read_row(kc, vc, centre + hb * DIM, centre_scale[hb], k_scale + hb * DIM, vs, k, v, E4M3);
            else
                read_row(kc, vc, centre + hb * DIM, centre_scale[hb], k_scale + hb * DIM, vs, k, v, E5M2);
        }
    return 0;
}
#pragma GCC pop_options

/* ---- staged writes: kv_quant.quantize_keys/values bit for bit (fp32 arithmetic in torch's order) ------------ */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off", "no-associative-math", "signed-zeros", "trapping-math")

#define E4M3_MAX 448.0f
#define MAX_INPUT 0x1p127f
#define MIN_SCALE 0x1p-126f /* fp32's smallest normal, which is bf16's too */

static inline float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* bf16 of x, rounded to nearest even (c10::round_to_nearest_even; inputs are never NaN here) */
static inline uint16_t bf16_round(float x) {
    const uint32_t u = float_bits(x);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* e4m3fn code of x, |x| <= 448, rounded to nearest even (c10's fp8e4m3fn_from_fp32_value), both of its
 * branches computed and one selected, so that loops over it vectorize */
static inline uint8_t e4m3_code(float x) {
    uint32_t u = float_bits(x);
    const uint32_t sign = u & 0x80000000u, denorm = 141u << 23;
    u ^= sign;
    /* below e4m3's smallest normal: the sum rounds the value onto the subnormal grid */
    const uint32_t subnormal = float_bits(bits_float(u) + bits_float(denorm)) - denorm;
    const uint32_t normal = (u + ((uint32_t)(7 - 127) << 23) + 0x7ffffu + ((u >> 20) & 1u)) >> 20;
    return (uint8_t)((u < (121u << 23) ? subnormal : normal) | (sign >> 24));
}

/* kv_quant.stored_scale: bf16 >= amax / 448 (and >= MIN_SCALE), rounded up */
static inline uint16_t stored_scale(float amax) {
    float exact = amax / E4M3_MAX;
    exact = exact < MIN_SCALE ? MIN_SCALE : exact;
    const uint16_t rounded = bf16_round(exact);
    return bf16_value(rounded) < exact ? (uint16_t)(rounded + 1) : rounded;
}

/* fp8.quantize: code of x / scale, inputs clamped to +-2^127 and quotients to +-448 */
static inline uint8_t quantize_one(float x, float scale) {
    x = x < -MAX_INPUT ? -MAX_INPUT : (x > MAX_INPUT ? MAX_INPUT : x);
    float q = x / scale;
    q = q < -E4M3_MAX ? -E4M3_MAX : (q > E4M3_MAX ? E4M3_MAX : q);
    return e4m3_code(q);
}

/* Quantize one completed block of one head: k, v [BS, DIM] (bf16 values as float) into block blk's codes,
 * centre, scales (kv_quant.quantize_keys, quantize_values). */
static void quantize_block(uint8_t *codes, uint8_t *centre, float *centre_scale, uint16_t *k_scale,
                           uint16_t *v_scale, int64_t heads, int64_t num_blocks, int64_t h, int64_t blk,
                           const float *k, const float *v) {
    const int64_t hb = h * num_blocks + blk, fp8_slots = num_blocks * BS;
    uint8_t *kc = codes + (h * fp8_slots + blk * BS) * DIM, *vc = codes + ((heads + h) * fp8_slots + blk * BS) * DIM;
    float c[DIM], amax = 0.0f;
    for (int d = 0; d < DIM; d++) {
        float lo = k[d], hi = k[d];
        for (int t = 1; t < BS; t++) {
            lo = k[t * DIM + d] < lo ? k[t * DIM + d] : lo;
            hi = k[t * DIM + d] > hi ? k[t * DIM + d] : hi;
        }
        c[d] = (lo + hi) / 2.0f;
        amax = fabsf(c[d]) > amax ? fabsf(c[d]) : amax;
    }
    float cs = amax / E4M3_MAX;
    cs = cs < MIN_SCALE ? MIN_SCALE : cs;
    centre_scale[hb] = cs;
    float scale[DIM];
    for (int d = 0; d < DIM; d++) {
        const uint8_t code = quantize_one(c[d], cs);
        centre[hb * DIM + d] = code;
        c[d] = fp8_value(code, E4M3) * cs; /* the stored centre */
        float ramax = 0.0f;
        for (int t = 0; t < BS; t++) {
            const float r = fabsf(k[t * DIM + d] - c[d]);
            ramax = r > ramax ? r : ramax;
        }
        const uint16_t s = stored_scale(ramax);
        k_scale[hb * DIM + d] = s;
        scale[d] = bf16_value(s);
    }
    for (int t = 0; t < BS; t++)
        for (int d = 0; d < DIM; d++) kc[t * DIM + d] = quantize_one(k[t * DIM + d] - c[d], scale[d]);
    for (int t = 0; t < BS; t++) {
        float vmax = 0.0f;
        for (int d = 0; d < DIM; d++) vmax = fabsf(v[t * DIM + d]) > vmax ? fabsf(v[t * DIM + d]) : vmax;
        const uint16_t s = stored_scale(vmax);
        v_scale[h * fp8_slots + blk * BS + t] = s;
        const float sf = bf16_value(s);
        for (int d = 0; d < DIM; d++) vc[t * DIM + d] = quantize_one(v[t * DIM + d], sf);
    }
}

/* A step's writes into one layer of a staged cache (kv_staged.StagedKVCache.write_staged): the new tokens'
 * k, v [T, heads, DIM] float, rounded to bf16; each completed block (its ids complete[C], its tokens
 * complete_src[C * BS]: row r < T of k/v, or dense slot staged_slots[r - T]) quantized into its fp8 block;
 * then rows dense_rows[Td] stored in dense slots dense_slots[Td]. Returns -1 (nothing written) for an id,
 * a row or a slot out of range. */
int staged_write(uint8_t *codes, uint8_t *centre, float *centre_scale, uint16_t *k_scale, uint16_t *v_scale,
                 uint16_t *dense, const float *k, const float *v, int64_t tokens, const int64_t *complete, int64_t nc,
                 const int64_t *complete_src, const int64_t *staged_slots, int64_t ns, const int64_t *dense_rows,
                 const int64_t *dense_slots, int64_t nd, int64_t heads, int64_t num_blocks, int64_t num_dense,
                 int threads) {
    const int64_t dense_slot_count = num_dense * BS;
    for (int64_t i = 0; i < nc; i++)
        if (complete[i] < 0 || complete[i] >= num_blocks) return -1;
    for (int64_t i = 0; i < nc * BS; i++)
        if (complete_src[i] < 0 || complete_src[i] >= tokens + ns) return -1;
    for (int64_t i = 0; i < ns; i++)
        if (staged_slots[i] < 0 || staged_slots[i] >= dense_slot_count) return -1;
    for (int64_t i = 0; i < nd; i++)
        if (dense_rows[i] < 0 || dense_rows[i] >= tokens || dense_slots[i] < 0 || dense_slots[i] >= dense_slot_count)
            return -1;
    const uint16_t *dense_v = dense + heads * dense_slot_count * DIM;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2) if (nc * heads * BS >= SERIAL_ROWS)
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < nc; i++) {
            float kb[BS * DIM], vb[BS * DIM];
            for (int t = 0; t < BS; t++) {
                const int64_t r = complete_src[i * BS + t];
                if (r < tokens) {
                    for (int d = 0; d < DIM; d++) {
                        kb[t * DIM + d] = bf16_value(bf16_round(k[(r * heads + h) * DIM + d]));
                        vb[t * DIM + d] = bf16_value(bf16_round(v[(r * heads + h) * DIM + d]));
                    }
                } else {
                    const int64_t off = (h * dense_slot_count + staged_slots[r - tokens]) * DIM;
                    bf16_rows(dense + off, kb + t * DIM, DIM);
                    bf16_rows(dense_v + off, vb + t * DIM, DIM);
                }
            }
            quantize_block(codes, centre, centre_scale, k_scale, v_scale, heads, num_blocks, h, complete[i], kb, vb);
        }
    for (int64_t h = 0; h < heads; h++) /* after the completions, which read staged slots these may overwrite */
        for (int64_t i = 0; i < nd; i++) {
            const int64_t r = dense_rows[i], off = (h * dense_slot_count + dense_slots[i]) * DIM;
            for (int d = 0; d < DIM; d++) {
                dense[off + d] = bf16_round(k[(r * heads + h) * DIM + d]);
                dense[heads * dense_slot_count * DIM + off + d] = bf16_round(v[(r * heads + h) * DIM + d]);
            }
        }
    return 0;
}
#pragma GCC pop_options

/* attend_fn of a staged cache (fp8_kernels.c's attention_layer, attention_step): staged_write of the step's
 * K and V, then staged_decode_attention (e4m3 codes). */
int attend_staged(const struct attention_layer *L, const struct attention_step *S, const float *qkv, float *context,
                  int threads) {
    const int64_t batch = S->batch, nqkv = (L->heads + 2 * L->kv_heads) * DIM, kv = L->kv_heads * DIM;
    if (L->kv_heads < 1 || L->heads % L->kv_heads) return -1;
    float *buf = malloc(sizeof(float) * (size_t)(2 * batch * (kv + L->heads * DIM)));
    if (!buf) return -2;
    float *k = buf, *v = k + batch * kv, *q = v + batch * kv, *out = q + batch * L->heads * DIM;
    for (int64_t b = 0; b < batch; b++) { /* staged_write takes K and V as [B, kv_heads, DIM] */
        memcpy(k + b * kv, qkv + b * nqkv + L->heads * DIM, sizeof(float) * kv);
        memcpy(v + b * kv, qkv + b * nqkv + L->heads * DIM + kv, sizeof(float) * kv);
    }
    int rc = staged_write(L->codes, L->centre, L->centre_scale, L->k_scale, L->v_scale, L->dense, k, v, batch,
                          S->complete, S->nc, S->complete_src, S->staged_slots, S->ns, S->dense_rows, S->dense_slots,
                          S->nd, L->kv_heads, L->num_blocks, L->num_dense, threads);
    if (rc == 0) {
        gather_queries(L, batch, qkv, q);
        rc = staged_decode_attention(L->codes, L->centre, L->centre_scale, L->k_scale, L->v_scale, L->dense,
                                     S->tables, S->lens, q, out, L->kv_heads, batch, S->width, L->heads / L->kv_heads,
                                     L->num_blocks, L->num_dense, E4M3, threads);
    }
    if (rc == 0) scatter_outputs(L, batch, out, context);
    free(buf);
    return rc;
}
