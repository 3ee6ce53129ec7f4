// fused_linear_cross_entropy on CUDA: the chunk loops and GEMMs (cuBLAS through ATen) are in
// linear_ce.h; here are the two row-wise kernels over one chunk of logits, one thread block per
// row, accumulating in fp32 (fp64 for double):
//   stats: online log-sum-exp of the row's block (each thread keeps a running max and sum of
//          exponentials, merged across the block), target logit, sum of logits;
//   grad:  the logits overwritten in place with softmax * (1 + 2 z_loss lse) - eps/V - (1-eps)
//          onehot, times the row's scale.
// A target outside [0, V) other than ignore_index trips a device-side assert, as PyTorch's own
// cross_entropy does; the Python wrapper checks first and raises a ValueError outside compile.
//
// Only lean ATen/c10 headers here: <torch/extension.h> triples compile time and memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda/std/limits>

#include "linear_ce.h"

namespace gpufit {
namespace {

using linear_ce::kOp;

constexpr int kMaxThreads = 1024;

inline int threads_for(int64_t cols) {
  if (cols >= 16384) return 1024;
  if (cols >= 2048) return 512;
  return 256;
}

template <typename acc_t>
struct MaxSum {
  acc_t m;  // running max
  acc_t s;  // sum of exp(v - m)
};

template <typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> merge(MaxSum<acc_t> a, MaxSum<acc_t> b) {
  const acc_t neg_inf = -::cuda::std::numeric_limits<acc_t>::infinity();
  if (a.m == neg_inf) return b;
  if (b.m == neg_inf) return a;
  const acc_t m = a.m > b.m ? a.m : b.m;
  return {m, a.s * ::exp(a.m - m) + b.s * ::exp(b.m - m)};
}

// Reduce (max, sum-exp) and a plain sum over the block; the result is valid in thread 0.
template <typename acc_t>
__device__ void block_reduce(MaxSum<acc_t>& ms, acc_t& total) {
  __shared__ acc_t shared_m[kMaxThreads / 32];
  __shared__ acc_t shared_s[kMaxThreads / 32];
  __shared__ acc_t shared_t[kMaxThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    MaxSum<acc_t> other{__shfl_down_sync(0xffffffffu, ms.m, offset),
                        __shfl_down_sync(0xffffffffu, ms.s, offset)};
    ms = merge(ms, other);
    total += __shfl_down_sync(0xffffffffu, total, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_m[warp] = ms.m;
    shared_s[warp] = ms.s;
    shared_t[warp] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
      ms = merge(ms, MaxSum<acc_t>{shared_m[w], shared_s[w]});
      total += shared_t[w];
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void stats_kernel(const scalar_t* __restrict__ z, int64_t cols, int64_t col0,
                             const int64_t* __restrict__ target, int64_t ignore_index, int64_t V,
                             acc_t* __restrict__ m, acc_t* __restrict__ s, acc_t* __restrict__ zt,
                             acc_t* __restrict__ zsum) {
  const acc_t neg_inf = -::cuda::std::numeric_limits<acc_t>::infinity();
  const int64_t i = blockIdx.x;
  const scalar_t* row = z + i * cols;
  const int64_t t = target[i];
  CUDA_KERNEL_ASSERT(t == ignore_index || (t >= 0 && t < V));
  MaxSum<acc_t> ms{neg_inf, acc_t(0)};
  acc_t total = acc_t(0);
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const acc_t v = static_cast<acc_t>(row[j]);
    total += v;
    if (v > ms.m) {
      ms.s = ms.s * ::exp(ms.m - v) + acc_t(1);
      ms.m = v;
    } else if (v != neg_inf) {
      ms.s += ::exp(v - ms.m);
    }
  }
  block_reduce(ms, total);
  if (threadIdx.x == 0) {
    const MaxSum<acc_t> state = merge(MaxSum<acc_t>{m[i], s[i]}, ms);
    m[i] = state.m;
    s[i] = state.s;
    zsum[i] += total;
    if (t >= col0 && t < col0 + cols) zt[i] = static_cast<acc_t>(row[t - col0]);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void grad_kernel(scalar_t* __restrict__ z, int64_t cols, int64_t col0,
                            const int64_t* __restrict__ target, int64_t ignore_index, int64_t V,
                            const acc_t* __restrict__ lse, const acc_t* __restrict__ scale,
                            bool per_row, acc_t smooth, acc_t one_minus_eps, acc_t two_z_loss) {
  const int64_t i = blockIdx.x;
  scalar_t* row = z + i * cols;
  const int64_t t = target[i];
  CUDA_KERNEL_ASSERT(t == ignore_index || (t >= 0 && t < V));
  if (t == ignore_index) {
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) row[j] = scalar_t(0);
    return;
  }
  const acc_t c = scale[per_row ? i : 0];
  const acc_t l = lse[i];
  const acc_t a = c * (acc_t(1) + two_z_loss * l);
  const acc_t b = c * smooth;
  const int64_t tj = t - col0;  // the target's column in this block (may be outside it)
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    acc_t v = ::exp(static_cast<acc_t>(row[j]) - l) * a - b;
    if (j == tj) v -= c * one_minus_eps;
    row[j] = static_cast<scalar_t>(v);
  }
}

struct CudaKernels {
  static void stats(const at::Tensor& z, int64_t col0, const at::Tensor& target,
                    int64_t ignore_index, int64_t V, at::Tensor& m, at::Tensor& s, at::Tensor& zt,
                    at::Tensor& zsum) {
    const int64_t rows = z.size(0), cols = z.size(1);
    if (rows == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), kOp, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      stats_kernel<scalar_t, acc_t><<<rows, threads_for(cols), 0, stream>>>(
          z.const_data_ptr<scalar_t>(), cols, col0, target.const_data_ptr<int64_t>(),
          ignore_index, V, m.data_ptr<acc_t>(), s.data_ptr<acc_t>(), zt.data_ptr<acc_t>(),
          zsum.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void grad(at::Tensor& z, int64_t col0, const at::Tensor& target, int64_t ignore_index,
                   int64_t V, const at::Tensor& lse, const at::Tensor& scale, bool per_row,
                   double eps, double z_loss) {
    const int64_t rows = z.size(0), cols = z.size(1);
    if (rows == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), kOp, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      grad_kernel<scalar_t, acc_t><<<rows, threads_for(cols), 0, stream>>>(
          z.data_ptr<scalar_t>(), cols, col0, target.const_data_ptr<int64_t>(), ignore_index, V,
          lse.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), per_row,
          static_cast<acc_t>(eps / static_cast<double>(V)), static_cast<acc_t>(1.0 - eps),
          static_cast<acc_t>(2.0 * z_loss));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_linear_cross_entropy_cuda(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& target, const c10::optional<at::Tensor>& bias,
                                int64_t ignore_index, c10::string_view reduction, double eps,
                                double z_loss, int64_t chunk_size, std::array<bool, 3> grad_mask) {
  TORCH_CHECK(x.is_cuda(), kOp, ": the CUDA kernel got a tensor on ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  return linear_ce::forward<CudaKernels>(x, weight, target, bias, ignore_index, reduction, eps,
                                         z_loss, chunk_size, grad_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& target, const c10::optional<at::Tensor>& bias, const at::Tensor& lse,
    int64_t ignore_index, c10::string_view reduction, double eps, double z_loss,
    int64_t chunk_size, std::array<bool, 3> grad_mask) {
  TORCH_CHECK(x.is_cuda(), kOp, "_backward: the CUDA kernel got a tensor on ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  return linear_ce::backward<CudaKernels>(grad_loss, x, weight, target, bias, lse, ignore_index,
                                          reduction, eps, z_loss, chunk_size, grad_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpufit, CUDA, m) {
  m.impl("fused_linear_cross_entropy", &fused_linear_cross_entropy_cuda);
  m.impl("fused_linear_cross_entropy_backward", &fused_linear_cross_entropy_backward_cuda);
}

}  // namespace gpufit
