// Fused residual add + RMSNorm / LayerNorm (the sandwich block's `norm(x + f(x))`), fp32 statistics.
// Forward: one block per row. Backward: a grid of blocks striding over rows, each accumulating its
// partial d weight / d bias in its own row of an fp32 buffer (summed on the host side).
#include "common.cuh"
#include "kernels.h"

namespace stars {
namespace {

template <typename T>
__device__ __forceinline__ float load_z(const T* x, const T* res, int64_t i) {
  return to_f(x[i]) + (res != nullptr ? to_f(res[i]) : 0.f);
}

template <typename T>
__global__ void add_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res,
                                    const float* __restrict__ w, const float* __restrict__ b,
                                    T* __restrict__ out, float* __restrict__ mean_out,
                                    float* __restrict__ rstd_out, int64_t H, float eps, bool rms) {
  __shared__ float shared[32];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * H;
  const T* xr = x + off;
  const T* rr = res != nullptr ? res + off : nullptr;
  float mean = 0.f;
  if (!rms) {
    float s = 0.f;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) s += load_z(xr, rr, i);
    mean = block_reduce<false>(s, shared) / static_cast<float>(H);
  }
  float ss = 0.f;  // two passes: the variance of (z - mean), not E[z^2] - mean^2
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const float d = load_z(xr, rr, i) - mean;
    ss += d * d;
  }
  const float rstd = rsqrtf(block_reduce<false>(ss, shared) / static_cast<float>(H) + eps);
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    float y = (load_z(xr, rr, i) - mean) * rstd * w[i];
    if (b != nullptr) y += b[i];
    out[off + i] = static_cast<T>(y);
  }
  if (threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
}

template <typename T>
__global__ void add_norm_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                    const T* __restrict__ res, const float* __restrict__ w,
                                    const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                    T* __restrict__ dz, float* __restrict__ part_w,
                                    float* __restrict__ part_b, int64_t rows, int64_t H, bool rms) {
  __shared__ float shared[32];
  float* pw = part_w + static_cast<int64_t>(blockIdx.x) * H;
  float* pb = part_b + static_cast<int64_t>(blockIdx.x) * H;
  const float inv_h = 1.f / static_cast<float>(H);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t off = row * H;
    const T* xr = x + off;
    const T* rr = res != nullptr ? res + off : nullptr;
    const float mean = mean_in[row], rstd = rstd_in[row];
    float sum_g = 0.f, sum_gx = 0.f;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
      const float g = to_f(grad[off + i]) * w[i];
      sum_g += g;
      sum_gx += g * (load_z(xr, rr, i) - mean) * rstd;
    }
    sum_gx = block_reduce<false>(sum_gx, shared) * inv_h;
    sum_g = rms ? 0.f : block_reduce<false>(sum_g, shared) * inv_h;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
      const float dy = to_f(grad[off + i]);
      const float xhat = (load_z(xr, rr, i) - mean) * rstd;
      dz[off + i] = static_cast<T>(rstd * (dy * w[i] - xhat * sum_gx - sum_g));
      pw[i] += dy * xhat;  // column i of this block's partial row belongs to this thread alone
      pb[i] += dy;
    }
  }
}

template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

int add_norm_bwd_blocks(int64_t rows) { return static_cast<int>(rows < 1024 ? (rows > 0 ? rows : 1) : 1024); }

void add_norm_fwd_launch(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, bool rms, at::Tensor& out, at::Tensor& mean,
                         at::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t H = x.size(-1), rows = x.numel() / H;
  if (rows == 0) return;
  STARS_DISPATCH(x.scalar_type(), "add_norm_fwd", [&] {
    add_norm_fwd_kernel<scalar_t><<<rows, kThreads, 0, stream()>>>(
        x.data_ptr<scalar_t>(), opt_ptr<scalar_t>(residual), weight.data_ptr<float>(), opt_ptr<float>(bias),
        out.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), H, static_cast<float>(eps), rms);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void add_norm_bwd_launch(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& residual,
                         const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd, bool rms,
                         at::Tensor& dz, at::Tensor& part_w, at::Tensor& part_b) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t H = x.size(-1), rows = x.numel() / H;
  if (rows == 0) return;
  STARS_DISPATCH(x.scalar_type(), "add_norm_bwd", [&] {
    add_norm_bwd_kernel<scalar_t><<<add_norm_bwd_blocks(rows), kThreads, 0, stream()>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), opt_ptr<scalar_t>(residual), weight.data_ptr<float>(),
        mean.data_ptr<float>(), rstd.data_ptr<float>(), dz.data_ptr<scalar_t>(), part_w.data_ptr<float>(),
        part_b.data_ptr<float>(), rows, H, rms);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace stars
