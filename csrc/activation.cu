// Fused gated-MLP activations. SwiGLU reads the fused gate/up projection's output [rows, 2I]
// (last dim cat(gate, up), gate first) and writes silu(gate) * up [rows, I]; GELU is the exact
// (erf) form. fp32 arithmetic, grid-stride loops, one element (pair) per thread step.
#include "common.cuh"
#include "kernels.h"

namespace stars {
namespace {

__device__ __forceinline__ float sigmoidf(float g) { return 1.f / (1.f + __expf(-g)); }

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gu, T* __restrict__ out, int64_t n, int64_t I) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = k / I, j = k - row * I;
    const float g = to_f(gu[row * 2 * I + j]), u = to_f(gu[row * 2 * I + I + j]);
    out[k] = static_cast<T>(g * sigmoidf(g) * u);
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ gu, T* __restrict__ dgu,
                                  int64_t n, int64_t I) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = k / I, j = k - row * I;
    const int64_t ig = row * 2 * I + j, iu = ig + I;
    const float g = to_f(gu[ig]), u = to_f(gu[iu]), dy = to_f(grad[k]);
    const float sig = sigmoidf(g);
    dgu[ig] = static_cast<T>(dy * u * sig * (1.f + g * (1.f - sig)));
    dgu[iu] = static_cast<T>(dy * g * sig);
  }
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

template <typename T>
__global__ void gelu_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t n) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = to_f(x[k]);
    out[k] = static_cast<T>(0.5f * v * (1.f + erff(v * kInvSqrt2)));
  }
}

template <typename T>
__global__ void gelu_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ dx, int64_t n) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = to_f(x[k]);
    const float cdf = 0.5f * (1.f + erff(v * kInvSqrt2));
    const float pdf = __expf(-0.5f * v * v) * kInvSqrt2Pi;
    dx[k] = static_cast<T>(to_f(grad[k]) * (cdf + v * pdf));
  }
}

}  // namespace

void swiglu_fwd_launch(const at::Tensor& gate_up, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t n = out.numel(), I = out.size(-1);
  if (n == 0) return;
  STARS_DISPATCH(gate_up.scalar_type(), "swiglu_fwd", [&] {
    swiglu_fwd_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, I);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void swiglu_bwd_launch(const at::Tensor& grad, const at::Tensor& gate_up, at::Tensor& dgate_up) {
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t n = grad.numel(), I = grad.size(-1);
  if (n == 0) return;
  STARS_DISPATCH(gate_up.scalar_type(), "swiglu_bwd", [&] {
    swiglu_bwd_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        grad.data_ptr<scalar_t>(), gate_up.data_ptr<scalar_t>(), dgate_up.data_ptr<scalar_t>(), n, I);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gelu_fwd_launch(const at::Tensor& x, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  STARS_DISPATCH(x.scalar_type(), "gelu_fwd", [&] {
    gelu_fwd_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(x.data_ptr<scalar_t>(),
                                                                       out.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gelu_bwd_launch(const at::Tensor& grad, const at::Tensor& x, at::Tensor& dx) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  STARS_DISPATCH(x.scalar_type(), "gelu_bwd", [&] {
    gelu_bwd_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace stars
