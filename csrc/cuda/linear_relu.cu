// fused_linear_relu on CUDA. GEMMs go through ATen (cuBLAS); the kernels here are the epilogues:
//   forward:  out = relu(out + bias) in place on the GEMM output (the output doubles as the
//             ReLU mask for backward),
//   backward: grad_z = (out <= 0 ? 0 : grad_out) (threshold_backward) fused with
//             grad_bias = sum_rows(grad_z).
// The bias reduction is deterministic: per-block partial sums in a fixed order, then one
// reduction over the partials, no atomics. Accumulation is fp32 for half types.
//
// Only lean ATen/c10 headers here: <torch/extension.h> triples compile time and memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "autocast.h"
#include "checks.h"

namespace gpufit {
namespace {

constexpr const char* kOp = "fused_linear_relu";
constexpr int kColumns = 32;   // columns per block (one warp wide, coalesced rows)
constexpr int kRowLanes = 8;   // threads per column within a block
constexpr int64_t kMinRowsPerSplit = 64;
constexpr int64_t kMaxSplits = 256;

template <typename scalar_t>
__global__ void bias_relu_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ bias,
                                 int64_t rows, int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= cols) return;
  const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[col]) : acc_t(0);
  for (int64_t row = blockIdx.y * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t i = row * cols + col;
    const acc_t v = static_cast<acc_t>(out[i]) + b;
    out[i] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);  // NaN stays NaN
  }
}

// Block (kColumns, kRowLanes) covers kColumns columns of one split of rows and writes one
// partial bias-gradient per column for that split.
template <typename scalar_t, typename acc_t>
__global__ void relu_backward_partial_kernel(const scalar_t* __restrict__ grad_out,
                                             const scalar_t* __restrict__ out,
                                             scalar_t* __restrict__ grad_z,
                                             acc_t* __restrict__ partial, int64_t rows,
                                             int64_t cols, int64_t rows_per_split) {
  __shared__ acc_t sums[kRowLanes][kColumns];
  const int64_t col = blockIdx.x * static_cast<int64_t>(kColumns) + threadIdx.x;
  const int64_t row_begin = blockIdx.y * rows_per_split;
  const int64_t row_end = min(rows, row_begin + rows_per_split);
  acc_t acc = acc_t(0);
  if (col < cols) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kRowLanes) {
      const int64_t i = row * cols + col;
      // threshold_backward on relu's output: a nan output passes its gradient on, as in torch
      const scalar_t v = static_cast<acc_t>(out[i]) <= acc_t(0) ? scalar_t(0) : grad_out[i];
      grad_z[i] = v;
      acc += static_cast<acc_t>(v);
    }
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    acc_t total = acc_t(0);
    for (int lane = 0; lane < kRowLanes; ++lane) total += sums[lane][threadIdx.x];
    partial[blockIdx.y * cols + col] = total;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ out,
                                    int64_t splits, int64_t cols) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= cols) return;
  acc_t total = acc_t(0);
  for (int64_t s = 0; s < splits; ++s) total += partial[s * cols + col];
  out[col] = static_cast<scalar_t>(total);
}

at::Tensor fused_linear_relu_cuda(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias) {
  NoAutocast no_autocast;
  check_linear_inputs(kOp, x, weight, bias);
  TORCH_CHECK(x.is_cuda(), kOp, ": the CUDA kernel got a tensor on ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0);
  const bool gemm_bias = bias_in_gemm(x, bias);
  at::Tensor out = gemm_bias ? at::addmm(*bias, as_rows(x), weight.t()).contiguous()
                             : at::mm(as_rows(x), weight.t()).contiguous();
  const int64_t M = out.size(0);
  const bool has_bias = !gemm_bias && bias.has_value() && bias->defined();
  at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  if (M > 0 && N > 0) {
    const dim3 block(kColumns, kRowLanes);
    const int64_t row_blocks = std::min<int64_t>((M + kRowLanes - 1) / kRowLanes, 65535);
    const dim3 grid((N + kColumns - 1) / kColumns, row_blocks);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), kOp, [&] {
      bias_relu_kernel<scalar_t><<<grid, block, 0, stream>>>(
          out.data_ptr<scalar_t>(), has_bias ? b.const_data_ptr<scalar_t>() : nullptr, M, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return out.view(out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& out, bool needs_input_grad) {
  NoAutocast no_autocast;
  TORCH_CHECK(x.is_cuda(), kOp, "_backward: the CUDA kernel got a tensor on ", x.device());
  TORCH_CHECK(grad_out.sizes() == out.sizes(), kOp, "_backward: grad_out shape ",
              grad_out.sizes(), " does not match the output shape ", out.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0);
  at::Tensor g = as_rows(grad_out).contiguous();
  at::Tensor y = as_rows(out).contiguous();
  const int64_t M = y.size(0);
  at::Tensor grad_z = at::empty_like(y);
  at::Tensor grad_bias = at::empty({N}, y.options());
  if (N > 0) {
    const int64_t rows_per_split =
        std::max(kMinRowsPerSplit, (M + kMaxSplits - 1) / kMaxSplits);
    const int64_t splits = std::max<int64_t>(1, (M + rows_per_split - 1) / rows_per_split);
    const int64_t col_blocks = (N + kColumns - 1) / kColumns;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), kOp, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      at::Tensor partial =
          at::empty({splits, N}, y.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      relu_backward_partial_kernel<scalar_t, acc_t>
          <<<dim3(col_blocks, splits), dim3(kColumns, kRowLanes), 0, stream>>>(
              g.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
              grad_z.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), M, N, rows_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_partials_kernel<scalar_t, acc_t><<<(N + 255) / 256, 256, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), grad_bias.data_ptr<scalar_t>(), splits, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor grad_weight = at::mm(grad_z.t(), as_rows(x));
  at::Tensor grad_x = needs_input_grad ? at::mm(grad_z, weight).view(x.sizes())
                                       : at::empty({0}, x.options());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpufit, CUDA, m) {
  m.impl("fused_linear_relu", &fused_linear_relu_cuda);
  m.impl("fused_linear_relu_backward", &fused_linear_relu_backward_cuda);
}

}  // namespace gpufit
