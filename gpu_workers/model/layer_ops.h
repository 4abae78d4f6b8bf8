/* One row of a decoder layer's small fp32 operations, shared by layer_kernels.c (one operation a call)
 * and panel_matmul.c (a layer's halves in one call), so that both round alike: each product and sum
 * rounded on its own (both build these with fp-contract off), as the torch forms they replace.
 */
#ifndef LAYER_OPS_H
#define LAYER_OPS_H

#include <math.h>
#include <stdint.h>

/* y = x * rsqrt(mean(x^2) + eps), then times weight (or 1 + weight: Gemma's): one row of n. The fp32
 * squares are summed in double, then rounded once: a running fp32 sum drifted with n (1.3e-6 relative at
 * 8192 against a float64 norm, torch's pairwise sums 2e-7). */
static inline void norm_row(const float *x, const float *weight, float eps, int offset, int64_t n, float *y) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += (double)(x[i] * x[i]);
    float inv = 1.0f / sqrtf((float)sum / (float)n + eps);
    if (offset) {
        for (int64_t i = 0; i < n; i++) y[i] = (x[i] * inv) * (1.0f + weight[i]);
    } else {
        for (int64_t i = 0; i < n; i++) y[i] = weight[i] * (x[i] * inv);
    }
}

/* sum = x + residual, then y = RMSNorm(sum): one row of n (vLLM's fused_add_rms_norm). */
static inline void add_norm_row(const float *x, const float *residual, const float *weight, float eps, int offset,
                                int64_t n, float *y, float *sum) {
    for (int64_t i = 0; i < n; i++) sum[i] = x[i] + residual[i];
    norm_row(sum, weight, eps, offset, n, y);
}

/* One head of d = 2 half: its halves (x1, x2) become (x1 cos - x2 sin, x2 cos + x1 sin), transformers'
 * rotate_half convention, into y (which may be x). */
static inline void rope_head(const float *x, const float *cos, const float *sin, int64_t half, float *y) {
    for (int64_t i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        y[i] = x1 * cos[i] - x2 * sin[i];
        y[i + half] = x2 * cos[i] + x1 * sin[i];
    }
}

/* y = silu(gate) * up for one row of gate_up [2 n] (gate first). */
static inline void silu_mul_row(const float *gate_up, int64_t n, float *y) {
    const float *g = gate_up, *u = gate_up + n;
    for (int64_t i = 0; i < n; i++) y[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
}

#endif
