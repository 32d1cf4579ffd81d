// Host launchers of the stars_scale CUDA kernels (csrc/*.cu). Outputs are allocated by the
// caller (ops.cpp); every tensor argument is contiguous unless stated, on one CUDA device.
#pragma once

#include <ATen/core/Tensor.h>

namespace stars {

// z = x + residual (residual may be undefined); out = norm(z) with fp32 mean/rstd per row.
void add_norm_fwd_launch(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, bool rms, at::Tensor& out, at::Tensor& mean,
                         at::Tensor& rstd);
// dz (for x and residual alike); per-block partial sums of d weight / d bias: [blocks, H] fp32.
void add_norm_bwd_launch(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& residual,
                         const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd, bool rms,
                         at::Tensor& dz, at::Tensor& part_w, at::Tensor& part_b);
int add_norm_bwd_blocks(int64_t rows);

void swiglu_fwd_launch(const at::Tensor& gate_up, at::Tensor& out);
void swiglu_bwd_launch(const at::Tensor& grad, const at::Tensor& gate_up, at::Tensor& dgate_up);
void gelu_fwd_launch(const at::Tensor& x, at::Tensor& out);
void gelu_bwd_launch(const at::Tensor& grad, const at::Tensor& x, at::Tensor& dx);

// x, out: [B, H, T, D] with the same strides and stride(-1) == 1; cos/sin [>= T, D/2] fp32.
void rope_launch(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out);

void xent_stats_launch(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start,
                       at::Tensor& mx, at::Tensor& sumexp, at::Tensor& target);
void xent_grad_launch(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& mx,
                      const at::Tensor& sumexp, int64_t vocab_start, int64_t ignore_index,
                      const at::Tensor& scale);

// Per-row Σ((y1 - y0)/eps)^2, then the normalised direction (token: per row; else by `total`).
void probe_rowsq_launch(const at::Tensor& y1, const at::Tensor& y0, double eps, at::Tensor& rowsq);
void probe_normalize_launch(const at::Tensor& y1, const at::Tensor& y0, double eps, bool token,
                            const at::Tensor& rowsq, const at::Tensor& total, at::Tensor& v);
void probe_bwd_launch(const at::Tensor& grad_sq, const at::Tensor& y1, const at::Tensor& y0, double eps,
                      at::Tensor& dy1);

}  // namespace stars
