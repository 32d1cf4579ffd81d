// Fused (vocab-parallel) cross-entropy, Apex xentropy / Megatron style. Pass 1 (xent_stats): per
// row of logits [N, V_local], the max, sum exp(l - max) and the label's logit (0 when another
// rank's slice holds it). The caller all-reduces these over the tensor-parallel group. Pass 2
// (xent_grad_): overwrite the logits in place with scale * (softmax - onehot), zero for ignored
// rows, so no second logits-sized buffer exists. One block per row, fp32 arithmetic.
#include "common.cuh"
#include "kernels.h"

namespace stars {
namespace {

template <typename T>
__global__ void xent_stats_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels,
                                  int64_t V, int64_t vocab_start, float* __restrict__ mx_out,
                                  float* __restrict__ sumexp_out, float* __restrict__ target_out) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const T* l = logits + row * V;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, to_f(l[i]));
  m = block_reduce<true>(m, shared);
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) s += __expf(to_f(l[i]) - m);
  s = block_reduce<false>(s, shared);
  if (threadIdx.x == 0) {
    const int64_t local = labels[row] - vocab_start;
    mx_out[row] = m;
    sumexp_out[row] = s;
    target_out[row] = (local >= 0 && local < V) ? to_f(l[local]) : 0.f;
  }
}

template <typename T>
__global__ void xent_grad_kernel(T* __restrict__ logits, const int64_t* __restrict__ labels,
                                 const float* __restrict__ mx, const float* __restrict__ sumexp, int64_t V,
                                 int64_t vocab_start, int64_t ignore_index, const float* __restrict__ scale) {
  const int64_t row = blockIdx.x;
  T* l = logits + row * V;
  const int64_t label = labels[row];
  const float sc = label == ignore_index ? 0.f : *scale;
  const int64_t local = label - vocab_start;
  const float m = mx[row], inv = 1.f / sumexp[row];
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float p = __expf(to_f(l[i]) - m) * inv;
    l[i] = static_cast<T>((p - (i == local ? 1.f : 0.f)) * sc);
  }
}

}  // namespace

void xent_stats_launch(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start,
                       at::Tensor& mx, at::Tensor& sumexp, at::Tensor& target) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t V = logits.size(-1), N = logits.numel() / V;
  if (N == 0) return;
  STARS_DISPATCH(logits.scalar_type(), "xent_stats", [&] {
    xent_stats_kernel<scalar_t><<<N, 1024, 0, stream()>>>(logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(),
                                                         V, vocab_start, mx.data_ptr<float>(),
                                                         sumexp.data_ptr<float>(), target.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void xent_grad_launch(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& mx,
                      const at::Tensor& sumexp, int64_t vocab_start, int64_t ignore_index,
                      const at::Tensor& scale) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t V = logits.size(-1), N = logits.numel() / V;
  if (N == 0) return;
  STARS_DISPATCH(logits.scalar_type(), "xent_grad_", [&] {
    xent_grad_kernel<scalar_t><<<N, 1024, 0, stream()>>>(logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(),
                                                        mx.data_ptr<float>(), sumexp.data_ptr<float>(), V,
                                                        vocab_start, ignore_index, scale.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace stars
