// fused_linear_cross_entropy on CUDA: the chunk loops and GEMMs (cuBLAS through ATen) are in
// linear_ce.h; here are the two row-wise kernels over one chunk of logits, one thread block per
// row, accumulating in fp32 (fp64 for double):
//   stats: online log-sum-exp of the row's block (each thread keeps a running max, sum of
//          exponentials and sum of logits relative to the max, merged across the block and with
//          the earlier blocks' statistics), the target logit and, for the per-row outputs
//          (kRowOutputs), the sums of exp(z - m) (z - m), exp(2 (z - m)) and z;
//   grad:  the logits overwritten in place with d loss / d z (linear_ce.h), the softmax taken
//          as exp((z - lse) - lse_lo).
// For bf16/fp16 inputs the logits reach these kernels in fp32 (linear_ce.h: a GEMM with fp32
// output).
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
using linear_ce::Options;

constexpr int kMaxThreads = 1024;

inline int threads_for(int64_t cols) {
  if (cols >= 16384) return 1024;
  if (cols >= 2048) return 512;
  return 256;
}

// A row's online statistics over the columns one thread (or a group of threads) has seen: max
// m, sum s of exp(v - m), zrel = sum of w (v - m) (w the class weight, 1 without them), the
// weight of those columns (their count without class weights), the first column holding m
// (-1 while none was seen), and for the per-row outputs u = sum exp(v - m) (v - m),
// q = sum exp(2 (v - m)) and zsum = sum v (kept only where the kernel is told to).
template <typename acc_t>
struct RowState {
  acc_t m;
  acc_t s;
  acc_t zrel;
  acc_t count;  // exact in fp32 up to 2^24 columns
  long long arg;
  acc_t u;
  acc_t q;
  acc_t zsum;
};

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -::cuda::std::numeric_limits<acc_t>::infinity();
}

// a.zrel re-expressed relative to a new max m >= a.m (-inf when all of a's columns were -inf).
template <typename acc_t>
__device__ __forceinline__ acc_t zrel_at(const RowState<acc_t>& a, acc_t m) {
  if (a.count == acc_t(0)) return acc_t(0);
  if (a.m == neg_inf<acc_t>()) return neg_inf<acc_t>();
  return a.zrel + a.count * (a.m - m);
}

template <typename acc_t>
__device__ __forceinline__ bool is_nan(acc_t v) {
  return v != v;
}

// The first column of the larger max (of the smaller column on a tie). A nan max is larger than
// any number, as for torch.argmax.
template <typename acc_t>
__device__ __forceinline__ long long merged_arg(const RowState<acc_t>& a, const RowState<acc_t>& b) {
  if (a.arg < 0) return b.arg;
  if (b.arg < 0) return a.arg;
  if (is_nan(a.m) != is_nan(b.m)) return is_nan(a.m) ? a.arg : b.arg;
  if (a.m > b.m) return a.arg;
  if (b.m > a.m) return b.arg;
  return a.arg < b.arg ? a.arg : b.arg;
}

// The larger max, nan where either is nan.
template <typename acc_t>
__device__ __forceinline__ acc_t merged_max(acc_t a, acc_t b) {
  if (is_nan(a)) return a;
  if (is_nan(b)) return b;
  return a > b ? a : b;
}

// a's u and q re-expressed relative to a new max m >= a.m, scaled by f = exp(a.m - m): u
// becomes f (u + (a.m - m) s), q becomes f^2 q (nothing while all of a's columns were -inf).
template <bool kRowOutputs, typename acc_t>
__device__ __forceinline__ void rescaled_uq(const RowState<acc_t>& a, acc_t m, acc_t& u,
                                            acc_t& q) {
  if (!kRowOutputs || a.m == neg_inf<acc_t>()) return;
  const acc_t f = ::exp(a.m - m);
  u += f * (a.u + (a.m - m) * a.s);
  q += f * f * a.q;
}

template <bool kRowOutputs, typename acc_t>
__device__ __forceinline__ RowState<acc_t> merge(const RowState<acc_t>& a,
                                                 const RowState<acc_t>& b) {
  const acc_t m = merged_max(a.m, b.m);
  const acc_t count = a.count + b.count;
  const long long arg = merged_arg(a, b);
  const acc_t zsum = kRowOutputs ? a.zsum + b.zsum : acc_t(0);
  if (m == neg_inf<acc_t>()) {
    return {m, acc_t(0), count > acc_t(0) ? m : acc_t(0), count, arg, acc_t(0), acc_t(0), zsum};
  }
  const acc_t s = (a.m == neg_inf<acc_t>() ? acc_t(0) : a.s * ::exp(a.m - m)) +
                  (b.m == neg_inf<acc_t>() ? acc_t(0) : b.s * ::exp(b.m - m));
  acc_t u = acc_t(0), q = acc_t(0);
  rescaled_uq<kRowOutputs>(a, m, u, q);
  rescaled_uq<kRowOutputs>(b, m, u, q);
  return {m, s, zrel_at(a, m) + zrel_at(b, m), count, arg, u, q, zsum};
}

// Column j with (final) logit v and class weight w.
template <bool kRowOutputs, typename acc_t>
__device__ __forceinline__ void push(RowState<acc_t>& st, acc_t v, acc_t w, long long j) {
  if (kRowOutputs) st.zsum += v;
  if (is_nan(v) && !is_nan(st.m)) {  // the row's max from here on (torch.argmax's rule)
    st.m = v;
    st.s = v;
    st.zrel = v;
    st.arg = j;
    st.u = v;
    st.q = v;
  } else if (v > st.m) {
    if (kRowOutputs) {  // the new column adds exp(0) 0 to u and exp(0) to q
      acc_t u = acc_t(0), q = acc_t(0);
      rescaled_uq<kRowOutputs>(st, v, u, q);
      st.u = u;
      st.q = q + acc_t(1);
    }
    st.zrel = zrel_at(st, v);
    st.s = st.s * ::exp(st.m - v) + acc_t(1);
    st.m = v;
    st.arg = j;
  } else if (st.m == neg_inf<acc_t>() && v == neg_inf<acc_t>()) {
    st.zrel = neg_inf<acc_t>();
    if (st.arg < 0) st.arg = j;
  } else {  // also a nan v: it reaches s and zrel
    const acc_t e = ::exp(v - st.m);
    st.s += e;
    st.zrel += w * (v - st.m);
    if (kRowOutputs && !(e == acc_t(0))) {
      st.u += e * (v - st.m);
      st.q += e * e;
    }
    if (st.arg < 0) st.arg = j;
  }
  st.count += w;
}

template <bool kRowOutputs, typename acc_t>
__device__ __forceinline__ RowState<acc_t> shfl_down(const RowState<acc_t>& st, int offset) {
  RowState<acc_t> out{__shfl_down_sync(0xffffffffu, st.m, offset),
                      __shfl_down_sync(0xffffffffu, st.s, offset),
                      __shfl_down_sync(0xffffffffu, st.zrel, offset),
                      __shfl_down_sync(0xffffffffu, st.count, offset),
                      __shfl_down_sync(0xffffffffu, st.arg, offset),
                      acc_t(0), acc_t(0), acc_t(0)};
  if (kRowOutputs) {
    out.u = __shfl_down_sync(0xffffffffu, st.u, offset);
    out.q = __shfl_down_sync(0xffffffffu, st.q, offset);
    out.zsum = __shfl_down_sync(0xffffffffu, st.zsum, offset);
  }
  return out;
}

// Merge the states of the block's threads; the result is valid in thread 0.
template <bool kRowOutputs, typename acc_t>
__device__ void block_reduce(RowState<acc_t>& st) {
  __shared__ RowState<acc_t> shared[kMaxThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    st = merge<kRowOutputs>(st, shfl_down<kRowOutputs>(st, offset));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
      st = merge<kRowOutputs>(st, shared[w]);
    }
  }
}

// Class weights on the device: w (V,) and its exclusive prefix sums (V + 1,), or null (all 1).
template <typename acc_t>
struct DeviceWeights {
  const acc_t* w;
  const acc_t* prefix;

  __device__ __forceinline__ acc_t at(int64_t j) const { return w != nullptr ? w[j] : acc_t(1); }
  __device__ __forceinline__ acc_t before(int64_t col) const {
    return prefix != nullptr ? prefix[col] : static_cast<acc_t>(col);
  }
};

template <typename acc_t>
DeviceWeights<acc_t> device_weights(const linear_ce::ClassWeights& cw) {
  if (!cw.defined()) return {nullptr, nullptr};
  return {cw.w.const_data_ptr<acc_t>(), cw.prefix.const_data_ptr<acc_t>()};
}

// The running sums of the per-row outputs (RowStats' u, q, zsum), each null where not asked.
template <typename acc_t>
struct RowOutputSums {
  acc_t* u;
  acc_t* q;
  acc_t* zsum;

  __device__ __forceinline__ static acc_t read(const acc_t* p, int64_t i) {
    return p != nullptr ? p[i] : acc_t(0);
  }
};

template <typename scalar_t, typename acc_t, bool kRowOutputs>
__global__ void stats_kernel(const scalar_t* __restrict__ z, int64_t cols, int64_t col0,
                             const int64_t* __restrict__ target, int64_t ignore_index, int64_t V,
                             DeviceWeights<acc_t> weights, acc_t* __restrict__ m,
                             acc_t* __restrict__ s, acc_t* __restrict__ zt,
                             acc_t* __restrict__ zrel, int64_t* __restrict__ pred,
                             RowOutputSums<acc_t> sums) {
  const int64_t i = blockIdx.x;
  const scalar_t* row = z + i * cols;
  const int64_t t = target[i];
  CUDA_KERNEL_ASSERT(t == ignore_index || (t >= 0 && t < V));
  RowState<acc_t> st{neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0), -1, acc_t(0), acc_t(0),
                     acc_t(0)};
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    push<kRowOutputs>(st, static_cast<acc_t>(row[j]), weights.at(col0 + j), j);
  }
  block_reduce<kRowOutputs>(st);
  if (threadIdx.x == 0) {
    // the columns before this block: [0, col0)
    const RowState<acc_t> before{m[i],
                                 s[i],
                                 zrel[i],
                                 weights.before(col0),
                                 -1,
                                 RowOutputSums<acc_t>::read(sums.u, i),
                                 RowOutputSums<acc_t>::read(sums.q, i),
                                 RowOutputSums<acc_t>::read(sums.zsum, i)};
    const RowState<acc_t> state = merge<kRowOutputs>(before, st);
    const bool nan_block = is_nan(st.m) && !is_nan(before.m);
    if (pred != nullptr && st.arg >= 0 && (st.m > before.m || nan_block)) pred[i] = col0 + st.arg;
    m[i] = state.m;
    s[i] = state.s;
    zrel[i] = state.zrel;
    if (kRowOutputs) {
      if (sums.u != nullptr) sums.u[i] = state.u;
      if (sums.q != nullptr) sums.q[i] = state.q;
      if (sums.zsum != nullptr) sums.zsum[i] = state.zsum;
    }
    if (t >= col0 && t < col0 + cols) zt[i] = static_cast<acc_t>(row[t - col0]);
  }
}

// The per-row and per-option constants of grad_kernel.
template <typename acc_t>
struct GradConstants {
  acc_t smooth;      // eps / V
  acc_t keep;        // 1 - eps
  acc_t two_z_loss;  // 2 z_loss
  acc_t cap;         // softcap / temperature, 0: none
  acc_t inv_t;       // 1 / temperature
};

template <typename scalar_t, typename acc_t>
__global__ void grad_kernel(scalar_t* __restrict__ z, int64_t cols, int64_t col0,
                            const int64_t* __restrict__ target, int64_t ignore_index, int64_t V,
                            const acc_t* __restrict__ lse, const acc_t* __restrict__ lse_lo,
                            const acc_t* __restrict__ scale, bool per_row,
                            const acc_t* __restrict__ grad_lse,
                            const acc_t* __restrict__ grad_entropy,
                            const acc_t* __restrict__ entropy, DeviceWeights<acc_t> weights,
                            GradConstants<acc_t> k) {
  const int64_t i = blockIdx.x;
  scalar_t* row = z + i * cols;
  const int64_t t = target[i];
  CUDA_KERNEL_ASSERT(t == ignore_index || (t >= 0 && t < V));
  const bool ignored = t == ignore_index;
  const acc_t g = grad_lse != nullptr ? grad_lse[i] : acc_t(0);
  const acc_t e = grad_entropy != nullptr ? grad_entropy[i] : acc_t(0);
  const acc_t h = grad_entropy != nullptr ? entropy[i] : acc_t(0);
  if (ignored && g == acc_t(0) && e == acc_t(0)) {
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) row[j] = scalar_t(0);
    return;
  }
  const acc_t c = ignored ? acc_t(0) : scale[per_row ? i : 0];
  const acc_t l = lse[i];
  const acc_t lo = lse_lo[i];
  const acc_t wt = ignored ? acc_t(1) : weights.at(t);
  const acc_t a = weights.w != nullptr
                      ? c * (k.keep * wt + k.smooth * weights.prefix[V] + k.two_z_loss * l) + g
                      : c * (acc_t(1) + k.two_z_loss * l) + g;
  const acc_t b = c * k.smooth;
  const int64_t tj = ignored ? -1 : t - col0;  // the target's column in this block (may be outside)
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const acc_t zj = static_cast<acc_t>(row[j]);
    const acc_t log_p = (zj - l) - lo;
    const acc_t p = ::exp(log_p);
    acc_t v = p * a - b * weights.at(col0 + j);
    if (e != acc_t(0) && p > acc_t(0)) v -= e * p * (log_p + h);  // d H / d z = -p (log p + H)
    if (j == tj) v -= c * k.keep * wt;
    if (k.cap > acc_t(0)) v *= acc_t(1) - (zj / k.cap) * (zj / k.cap);
    row[j] = static_cast<scalar_t>(v * k.inv_t);
  }
}

struct CudaKernels {
  // zrel is kept whether or not the options smooth the labels
  static void stats(const at::Tensor& z, int64_t col0, const at::Tensor& target, int64_t V,
                    const Options& o, const linear_ce::ClassWeights& cw,
                    linear_ce::RowStats& st) {
    const int64_t rows = z.size(0), cols = z.size(1);
    if (rows == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), kOp, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto ptr = [](const at::Tensor& t) {
        return t.defined() ? t.data_ptr<acc_t>() : nullptr;
      };
      const RowOutputSums<acc_t> sums{ptr(st.u), ptr(st.q), ptr(st.zsum)};
      const auto launch = [&](auto kernel) {
        kernel<<<rows, threads_for(cols), 0, stream>>>(
            z.const_data_ptr<scalar_t>(), cols, col0, target.const_data_ptr<int64_t>(),
            o.ignore_index, V, device_weights<acc_t>(cw), st.m.data_ptr<acc_t>(),
            st.s.data_ptr<acc_t>(), st.zt.data_ptr<acc_t>(), st.zrel.data_ptr<acc_t>(),
            st.pred.defined() ? st.pred.data_ptr<int64_t>() : nullptr, sums);
      };
      if (o.row_outputs()) {
        launch(stats_kernel<scalar_t, acc_t, true>);
      } else {
        launch(stats_kernel<scalar_t, acc_t, false>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void grad(at::Tensor& z, int64_t col0, const at::Tensor& target, int64_t V,
                   const linear_ce::BackwardRows& r, const Options& o,
                   const linear_ce::ClassWeights& cw) {
    const double eps = o.label_smoothing;
    const int64_t rows = z.size(0), cols = z.size(1);
    if (rows == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), kOp, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const GradConstants<acc_t> k{static_cast<acc_t>(eps / static_cast<double>(V)),
                                   static_cast<acc_t>(1.0 - eps),
                                   static_cast<acc_t>(2.0 * o.z_loss),
                                   static_cast<acc_t>(o.capped() ? o.tempered_cap() : 0.0),
                                   static_cast<acc_t>(o.inv_temperature())};
      const auto ptr = [](const at::Tensor& t) {
        return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
      };
      grad_kernel<scalar_t, acc_t><<<rows, threads_for(cols), 0, stream>>>(
          z.data_ptr<scalar_t>(), cols, col0, target.const_data_ptr<int64_t>(), o.ignore_index, V,
          r.lse.const_data_ptr<acc_t>(), r.lse_lo.const_data_ptr<acc_t>(),
          r.scale.const_data_ptr<acc_t>(), r.per_row, ptr(r.grad_lse), ptr(r.grad_entropy),
          ptr(r.entropy), device_weights<acc_t>(cw), k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

linear_ce::Outputs fused_linear_cross_entropy_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& target,
                                                  const c10::optional<at::Tensor>& bias,
                                                  GPUFIT_LINEAR_CE_OPTION_PARAMS,
                                                  std::array<bool, 3> grad_mask) {
  const Options o = Options::parse(GPUFIT_LINEAR_CE_OPTION_ARGS);
  TORCH_CHECK(x.is_cuda(), kOp, ": the CUDA kernel got a tensor on ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  return linear_ce::forward<CudaKernels>(x, weight, target, bias, o, grad_mask);
}

linear_ce::Grads fused_linear_cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& target, const c10::optional<at::Tensor>& bias, const at::Tensor& lse,
    const at::Tensor& lse_lo, const c10::optional<at::Tensor>& entropy,
    GPUFIT_LINEAR_CE_OPTION_PARAMS, std::array<bool, 3> grad_mask) {
  const Options o = Options::parse(GPUFIT_LINEAR_CE_OPTION_ARGS);
  TORCH_CHECK(x.is_cuda(), kOp, "_backward: the CUDA kernel got a tensor on ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  return linear_ce::backward<CudaKernels>(grad_loss, grad_lse, grad_entropy, x, weight, target,
                                          bias, lse, lse_lo, entropy, o, grad_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpufit, CUDA, m) {
  m.impl("fused_linear_cross_entropy", &fused_linear_cross_entropy_cuda);
  m.impl("fused_linear_cross_entropy_backward", &fused_linear_cross_entropy_backward_cuda);
}

}  // namespace gpufit
