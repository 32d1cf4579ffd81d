// The STARS finite-difference probe reduction: d = (f(h + eps v) - f(h)) / eps, its squared norm
// (fp32, per row then summed) and its unit direction, normalised over the whole tensor or every
// token (row) to the same norm. The backward of ||d||^2 is 2 d / eps (and minus that for f(h)).
#include "common.cuh"
#include "kernels.h"

namespace stars {
namespace {

template <typename T>
__global__ void probe_rowsq_kernel(const T* __restrict__ y1, const T* __restrict__ y0, float inv_eps, int64_t H,
                                   float* __restrict__ rowsq) {
  __shared__ float shared[32];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * H;
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const float d = (to_f(y1[off + i]) - to_f(y0[off + i])) * inv_eps;
    s += d * d;
  }
  s = block_reduce<false>(s, shared);
  if (threadIdx.x == 0) rowsq[blockIdx.x] = s;
}

template <typename T>
__global__ void probe_normalize_kernel(const T* __restrict__ y1, const T* __restrict__ y0, float inv_eps,
                                       int64_t n, int64_t H, bool token, float sqrt_rows,
                                       const float* __restrict__ rowsq, const float* __restrict__ total,
                                       T* __restrict__ v) {
  const float inv_total = 1.f / (sqrtf(*total) + 1e-12f);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float d = (to_f(y1[k]) - to_f(y0[k])) * inv_eps;
    const float inv = token ? 1.f / ((sqrtf(rowsq[k / H]) + 1e-12f) * sqrt_rows) : inv_total;
    v[k] = static_cast<T>(d * inv);
  }
}

template <typename T>
__global__ void probe_bwd_kernel(const float* __restrict__ grad_sq, const T* __restrict__ y1,
                                 const T* __restrict__ y0, float inv_eps, int64_t n, T* __restrict__ dy1) {
  const float c = 2.f * (*grad_sq) * inv_eps;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dy1[k] = static_cast<T>(c * (to_f(y1[k]) - to_f(y0[k])) * inv_eps);
  }
}

}  // namespace

void probe_rowsq_launch(const at::Tensor& y1, const at::Tensor& y0, double eps, at::Tensor& rowsq) {
  const c10::cuda::CUDAGuard guard(y1.device());
  const int64_t H = y1.size(-1), rows = y1.numel() / H;
  if (rows == 0) return;
  STARS_DISPATCH(y1.scalar_type(), "probe_rowsq", [&] {
    probe_rowsq_kernel<scalar_t><<<rows, kThreads, 0, stream()>>>(
        y1.data_ptr<scalar_t>(), y0.data_ptr<scalar_t>(), static_cast<float>(1.0 / eps), H, rowsq.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void probe_normalize_launch(const at::Tensor& y1, const at::Tensor& y0, double eps, bool token,
                            const at::Tensor& rowsq, const at::Tensor& total, at::Tensor& v) {
  const c10::cuda::CUDAGuard guard(y1.device());
  const int64_t n = y1.numel(), H = y1.size(-1);
  if (n == 0) return;
  const float sqrt_rows = sqrtf(static_cast<float>(n / H));
  STARS_DISPATCH(y1.scalar_type(), "probe_normalize", [&] {
    probe_normalize_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        y1.data_ptr<scalar_t>(), y0.data_ptr<scalar_t>(), static_cast<float>(1.0 / eps), n, H, token, sqrt_rows,
        rowsq.data_ptr<float>(), total.data_ptr<float>(), v.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void probe_bwd_launch(const at::Tensor& grad_sq, const at::Tensor& y1, const at::Tensor& y0, double eps,
                      at::Tensor& dy1) {
  const c10::cuda::CUDAGuard guard(y1.device());
  const int64_t n = y1.numel();
  if (n == 0) return;
  STARS_DISPATCH(y1.scalar_type(), "probe_bwd", [&] {
    probe_bwd_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        grad_sq.data_ptr<float>(), y1.data_ptr<scalar_t>(), y0.data_ptr<scalar_t>(), static_cast<float>(1.0 / eps),
        n, dy1.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace stars
