// Fused rotary position embedding on q or k [B, H, T, D] (any strides over B, H, T; the head dim
// contiguous), the layout LoopedLM uses: pair (i, i + D/2) rotates by angle t * theta_i. The
// backward is the same kernel with -sin.
#include "common.cuh"
#include "kernels.h"

namespace stars {
namespace {

template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                            T* __restrict__ out, int64_t B, int64_t H, int64_t T_, int64_t half, int64_t sb,
                            int64_t sh, int64_t st) {
  const int64_t n = B * H * T_ * half;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = k % half;
    int64_t r = k / half;
    const int64_t t = r % T_;
    r /= T_;
    const int64_t h = r % H, b = r / H;
    const int64_t off = b * sb + h * sh + t * st;
    const float x1 = to_f(x[off + i]), x2 = to_f(x[off + i + half]);
    const float c = cos[t * half + i], s = sin[t * half + i];
    out[off + i] = static_cast<T>(x1 * c - x2 * s);
    out[off + i + half] = static_cast<T>(x2 * c + x1 * s);
  }
}

}  // namespace

void rope_launch(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), H = x.size(1), T_ = x.size(2), half = x.size(3) / 2;
  const int64_t n = B * H * T_ * half;
  if (n == 0) return;
  STARS_DISPATCH(x.scalar_type(), "rope", [&] {
    rope_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        x.data_ptr<scalar_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr<scalar_t>(), B, H, T_,
        half, x.stride(0), x.stride(1), x.stride(2));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace stars
