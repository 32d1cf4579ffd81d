// Registers the CUDA kernels as torch.ops.stars_scale_cuda.* (CUDA dispatch key). The Python
// custom ops torch.ops.stars_scale.* (stars_scale/kernels/ops.py) call these on CUDA tensors and
// own the autograd formulas and fake implementations.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "kernels.h"

namespace stars {
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "stars_scale_cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "stars_scale_cuda: ", name, " must be contiguous");
}

at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_norm_fwd(const at::Tensor& x,
                                                            const std::optional<at::Tensor>& residual,
                                                            const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias, double eps,
                                                            bool rms) {
  check_cuda(x, "x");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == x.size(-1),
              "stars_scale_cuda.add_norm_fwd: weight must be fp32 of size ", x.size(-1));
  if (residual) TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                            "stars_scale_cuda.add_norm_fwd: residual must match x");
  auto out = at::empty_like(x);
  auto mean = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  add_norm_fwd_launch(x, opt(residual), weight.contiguous(), bias ? bias->contiguous() : at::Tensor(), eps, rms,
                      out, mean, rstd);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_norm_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                            const std::optional<at::Tensor>& residual,
                                                            const at::Tensor& weight, const at::Tensor& mean,
                                                            const at::Tensor& rstd, bool rms) {
  check_cuda(grad, "grad");
  check_cuda(x, "x");
  const int64_t H = x.size(-1), rows = x.numel() / H;
  auto dz = at::empty_like(x);
  const int64_t blocks = add_norm_bwd_blocks(rows);
  auto part_w = at::zeros({blocks, H}, x.options().dtype(at::kFloat));
  auto part_b = at::zeros({blocks, H}, x.options().dtype(at::kFloat));
  add_norm_bwd_launch(grad, x, opt(residual), weight.contiguous(), mean.contiguous(), rstd.contiguous(), rms, dz,
                      part_w, part_b);
  return {dz, part_w.sum(0), part_b.sum(0)};
}

at::Tensor swiglu_fwd(const at::Tensor& gate_up) {
  check_cuda(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "stars_scale_cuda.swiglu_fwd: last dim must be cat(gate, up)");
  auto sizes = gate_up.sizes().vec();
  sizes.back() /= 2;
  auto out = at::empty(sizes, gate_up.options());
  swiglu_fwd_launch(gate_up, out);
  return out;
}

// d input of an elementwise activation: the gradient has the input's shape.
template <typename Launch>
at::Tensor activation_bwd(const at::Tensor& grad, const at::Tensor& input, Launch launch) {
  check_cuda(grad, "grad");
  check_cuda(input, "input");
  auto d = at::empty_like(input);
  launch(grad, input, d);
  return d;
}

at::Tensor swiglu_bwd(const at::Tensor& grad, const at::Tensor& gate_up) {
  return activation_bwd(grad, gate_up, swiglu_bwd_launch);
}

at::Tensor gelu_fwd(const at::Tensor& x) {
  check_cuda(x, "x");
  auto out = at::empty_like(x);
  gelu_fwd_launch(x, out);
  return out;
}

at::Tensor gelu_bwd(const at::Tensor& grad, const at::Tensor& x) { return activation_bwd(grad, x, gelu_bwd_launch); }

at::Tensor rope_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.is_cuda() && x.stride(-1) == 1, "stars_scale_cuda.rope_fwd: x must be CUDA with a contiguous last dim");
  TORCH_CHECK(x.size(-1) % 2 == 0, "stars_scale_cuda.rope_fwd: head dim must be even");
  // Any strides over (B, H, T) are read as they are (q/k come from a transposed view); other
  // ranks are flattened to [1, rows, T, D].
  at::Tensor x4 = x;
  if (x.dim() != 4 || !x.is_non_overlapping_and_dense()) {
    x4 = x.contiguous().view({1, -1, x.size(-2), x.size(-1)});
  }
  auto out = at::empty_like(x4);
  if (out.strides() != x4.strides()) {
    x4 = x4.contiguous();
    out = at::empty_like(x4);
  }
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.size(0) >= x4.size(2) && cos.size(1) == x4.size(3) / 2,
              "stars_scale_cuda.rope_fwd: cos/sin must be fp32 [>= T, D/2]");
  rope_launch(x4, cos.contiguous(), sin.contiguous(), out);
  return x.dim() == 4 ? out : out.view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> xent_stats(const at::Tensor& logits, const at::Tensor& labels,
                                                          int64_t vocab_start) {
  check_cuda(logits, "logits");
  check_cuda(labels, "labels");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.numel() * logits.size(-1) == logits.numel(),
              "stars_scale_cuda.xent_stats: labels must be int64 with one label per logits row");
  auto mx = at::empty(logits.sizes().slice(0, logits.dim() - 1), logits.options().dtype(at::kFloat));
  auto sumexp = at::empty_like(mx);
  auto target = at::empty_like(mx);
  xent_stats_launch(logits, labels, vocab_start, mx, sumexp, target);
  return {mx, sumexp, target};
}

void xent_grad_(at::Tensor logits, const at::Tensor& labels, const at::Tensor& mx, const at::Tensor& sumexp,
                int64_t vocab_start, int64_t ignore_index, const at::Tensor& scale) {
  check_cuda(logits, "logits");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1, "stars_scale_cuda.xent_grad_: scale must be one fp32");
  xent_grad_launch(logits, labels.contiguous(), mx.contiguous(), sumexp.contiguous(), vocab_start, ignore_index,
                   scale.contiguous());
}

std::tuple<at::Tensor, at::Tensor> probe_reduce(const at::Tensor& y1, const at::Tensor& y0, double eps, bool token) {
  check_cuda(y1, "y1");
  check_cuda(y0, "y0");
  TORCH_CHECK(y1.sizes() == y0.sizes() && y1.scalar_type() == y0.scalar_type(),
              "stars_scale_cuda.probe_reduce: y1 and y0 must match");
  auto rowsq = at::empty({y1.numel() / y1.size(-1)}, y1.options().dtype(at::kFloat));
  probe_rowsq_launch(y1, y0, eps, rowsq);
  auto total = rowsq.sum();
  auto v = at::empty_like(y1);
  probe_normalize_launch(y1, y0, eps, token, rowsq, total, v);
  return {v, total};
}

at::Tensor probe_reduce_bwd(const at::Tensor& grad_sq, const at::Tensor& y1, const at::Tensor& y0, double eps) {
  check_cuda(y1, "y1");
  check_cuda(y0, "y0");
  auto d = at::empty_like(y1);
  probe_bwd_launch(grad_sq.to(at::kFloat).contiguous(), y1, y0, eps, d);
  return d;
}

}  // namespace
}  // namespace stars

TORCH_LIBRARY(stars_scale_cuda, m) {
  m.def("add_norm_fwd(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, bool rms)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("add_norm_bwd(Tensor grad, Tensor x, Tensor? residual, Tensor weight, Tensor mean, Tensor rstd, bool rms)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("swiglu_fwd(Tensor gate_up) -> Tensor");
  m.def("swiglu_bwd(Tensor grad, Tensor gate_up) -> Tensor");
  m.def("gelu_fwd(Tensor x) -> Tensor");
  m.def("gelu_bwd(Tensor grad, Tensor x) -> Tensor");
  m.def("rope_fwd(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("xent_stats(Tensor logits, Tensor labels, int vocab_start) -> (Tensor, Tensor, Tensor)");
  m.def("xent_grad_(Tensor(a!) logits, Tensor labels, Tensor mx, Tensor sumexp, int vocab_start, int ignore_index,"
        " Tensor scale) -> ()");
  m.def("probe_reduce(Tensor y1, Tensor y0, float eps, bool token) -> (Tensor, Tensor)");
  m.def("probe_reduce_bwd(Tensor grad_sq, Tensor y1, Tensor y0, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(stars_scale_cuda, CUDA, m) {
  m.impl("add_norm_fwd", &stars::add_norm_fwd);
  m.impl("add_norm_bwd", &stars::add_norm_bwd);
  m.impl("swiglu_fwd", &stars::swiglu_fwd);
  m.impl("swiglu_bwd", &stars::swiglu_bwd);
  m.impl("gelu_fwd", &stars::gelu_fwd);
  m.impl("gelu_bwd", &stars::gelu_bwd);
  m.impl("rope_fwd", &stars::rope_fwd);
  m.impl("xent_stats", &stars::xent_stats);
  m.impl("xent_grad_", &stars::xent_grad_);
  m.impl("probe_reduce", &stars::probe_reduce);
  m.impl("probe_reduce_bwd", &stars::probe_reduce_bwd);
}

#ifdef STARS_PYTHON_MODULE
// `import stars_scale._C` loads this library (and so the registrations above).
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
#endif
