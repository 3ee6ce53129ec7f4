// fused_linear_relu on the CPU: y = relu(x @ weight.T + bias).
//
// The matrix products go through ATen (MKL/oneDNN/OpenBLAS); what gpufit adds is the epilogue:
// bias + ReLU in one pass over the GEMM output, and in backward dReLU fused with the bias
// gradient reduction. The output itself is what backward needs (y > 0 exactly where the
// pre-activation was > 0), so no separate mask is stored.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "autocast.h"
#include "checks.h"

namespace gpufit {
namespace {

constexpr const char* kOp = "fused_linear_relu";

// out[i, j] = max(out[i, j] + bias[j], 0), in place, rows in parallel.
void bias_relu_(at::Tensor& out, const c10::optional<at::Tensor>& bias) {
  const int64_t M = out.size(0), N = out.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t i = begin; i < end; ++i) {
                         scalar_t* row = o + i * N;
                         // Branch-free loops (bias or not decided outside) so they vectorise.
                         // `v < 0 ? 0 : v` keeps NaN as NaN, like torch.relu.
                         if (bp) {
                           for (int64_t j = 0; j < N; ++j) {
                             const acc_t v =
                                 static_cast<acc_t>(row[j]) + static_cast<acc_t>(bp[j]);
                             row[j] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);
                           }
                         } else {
                           for (int64_t j = 0; j < N; ++j) {
                             const acc_t v = static_cast<acc_t>(row[j]);
                             row[j] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);
                           }
                         }
                       }
                     });
  });
}

// grad_z = (out <= 0 ? 0 : grad_out), PyTorch's threshold_backward on relu's output (so a nan
// pre-activation, whose output is nan, passes its gradient on as torch.relu does), and
// grad_bias = sum over rows of grad_z, in one pass.
// Columns are split into fixed blocks so the reduction order, and so the result, does not
// depend on the number of threads; within a block the rows are walked in order and the inner
// loop runs along contiguous columns, which the compiler vectorises.
void relu_backward_bias_grad(const at::Tensor& grad_out, const at::Tensor& out,
                             at::Tensor& grad_z, at::Tensor& grad_bias) {
  const int64_t M = out.size(0), N = out.size(1);
  constexpr int64_t kColumnBlock = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* y = out.const_data_ptr<scalar_t>();
    scalar_t* gz = grad_z.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    const int64_t blocks = (N + kColumnBlock - 1) / kColumnBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t j0 = blk * kColumnBlock, width = std::min(N - j0, kColumnBlock);
        acc_t acc[kColumnBlock] = {};
        for (int64_t i = 0; i < M; ++i) {
          const scalar_t* gi = g + i * N + j0;
          const scalar_t* yi = y + i * N + j0;
          scalar_t* gzi = gz + i * N + j0;
          for (int64_t j = 0; j < width; ++j) {
            const scalar_t gv = gi[j];  // loaded unconditionally: a select, not a branch
            const scalar_t v = yi[j] <= scalar_t(0) ? scalar_t(0) : gv;
            gzi[j] = v;
            acc[j] += static_cast<acc_t>(v);
          }
        }
        for (int64_t j = 0; j < width; ++j) gb[j0 + j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
}

at::Tensor fused_linear_relu_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias) {
  NoAutocast no_autocast;
  check_linear_inputs(kOp, x, weight, bias);
  TORCH_CHECK(x.device().is_cpu(), kOp, ": the CPU kernel got a tensor on ", x.device());
  const int64_t N = weight.size(0);
  at::Tensor out;
  if (bias_in_gemm(x, bias)) {
    out = at::addmm(*bias, as_rows(x), weight.t()).contiguous();
    bias_relu_(out, c10::nullopt);
  } else {
    out = at::mm(as_rows(x), weight.t()).contiguous();
    bias_relu_(out, bias);
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return out.view(out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& out, bool needs_input_grad) {
  NoAutocast no_autocast;
  TORCH_CHECK(x.device().is_cpu(), kOp, "_backward: the CPU kernel got a tensor on ",
              x.device());
  const int64_t N = weight.size(0);
  TORCH_CHECK(grad_out.sizes() == out.sizes(), kOp, "_backward: grad_out shape ",
              grad_out.sizes(), " does not match the output shape ", out.sizes());
  at::Tensor g = as_rows(grad_out).contiguous();
  at::Tensor y = as_rows(out).contiguous();
  at::Tensor grad_z = at::empty_like(y);
  at::Tensor grad_bias = at::empty({N}, y.options());
  relu_backward_bias_grad(g, y, grad_z, grad_bias);
  at::Tensor x2d = as_rows(x);
  at::Tensor grad_weight = at::mm(grad_z.t(), x2d);
  at::Tensor grad_x = needs_input_grad ? at::mm(grad_z, weight).view(x.sizes())
                                       : at::empty({0}, x.options());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpufit, CPU, m) {
  m.impl("fused_linear_relu", &fused_linear_relu_cpu);
  m.impl("fused_linear_relu_backward", &fused_linear_relu_backward_cpu);
}

}  // namespace gpufit
