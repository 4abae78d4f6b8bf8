/* The small per-layer operations of a decoder step on fp32 CPU tensors (gpu_workers/model/layer_kernels.py):
 * RMSNorm (with the residual add fused in), rotary embedding and SiLU-and-multiply, each one pass over
 * its rows instead of the 3-8 torch operations (and their dispatch cost) it replaces.
 *
 * Rounding follows the torch code they replace: each product and sum rounded on its own (this file is
 * built with -ffp-contract=off), so RoPE's outputs equal apply_rotary's bit for bit; RMSNorm's mean of
 * squares sums in another order and precision than torch's reduction (a few ulps). Rows go to OpenMP
 * threads only from PARALLEL_ROWS on: a decode step's few rows cost less than waking a thread.
 * Names as vLLM's CPU ops (csrc/cpu/layernorm.cpp, pos_encoding.cpp, activation.cpp).
 */
#include <stdint.h>

#include "layer_ops.h"

#define PARALLEL_ROWS 32

/* out[t] = RMSNorm(x[t]) for rows of n; x and out [rows, n] contiguous (may be the same). */
void rms_norm(const float *x, const float *weight, float eps, int offset, int64_t rows, int64_t n, float *out,
              int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t t = 0; t < rows; t++) norm_row(x + t * n, weight, eps, offset, n, out + t * n);
}

/* sum[t] = x[t] + residual[t]; out[t] = RMSNorm(sum[t]) (vLLM's fused_add_rms_norm, which updates the
 * residual in place; here the sum goes to its own buffer). All [rows, n] contiguous. */
void fused_add_rms_norm(const float *x, const float *residual, const float *weight, float eps, int offset,
                        int64_t rows, int64_t n, float *out, float *sum, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t t = 0; t < rows; t++) {
        add_norm_row(x + t * n, residual + t * n, weight, eps, offset, n, out + t * n, sum + t * n);
    }
}

/* Rotate heads of x [rows, heads, d] (row stride x_stride floats, heads contiguous d apart) by cos, sin
 * [rows, d / 2] into out [rows, heads, d] contiguous: the two halves (x1, x2) become
 * (x1 cos - x2 sin, x2 cos + x1 sin), transformers' rotate_half convention. */
void rotary_embedding(const float *x, int64_t x_stride, const float *cos, const float *sin, int64_t rows,
                      int64_t heads, int64_t d, float *out, int threads) {
    int64_t half = d / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t t = 0; t < rows; t++)
        for (int64_t h = 0; h < heads; h++)
            rope_head(x + t * x_stride + h * d, cos + t * half, sin + t * half, half, out + (t * heads + h) * d);
}

/* out[t] = silu(gate) * up for gate_up [rows, 2 n] (gate the first n of a row), out [rows, n]. */
void silu_and_mul(const float *gate_up, int64_t rows, int64_t n, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t t = 0; t < rows; t++) silu_mul_row(gate_up + t * 2 * n, n, out + t * n);
}
