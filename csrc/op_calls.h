// gpufit's own ops called through the dispatcher, for the code that wraps them (autograd.cpp,
// autocast.cpp): each call goes on down the dispatch keys below the caller's, so autograd,
// autocast, torch.compile's tracing and the backends all see exactly these ops.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>

#include "linear_ce_options.h"

namespace gpufit {
namespace op_calls {

using OptTensor = c10::optional<at::Tensor>;
using Mask = std::array<bool, 3>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// loss, lse, lse_lo, predicted, entropy, log_sum_sq_probs, mean_logits, grad_x, grad_weight,
// grad_bias
using LinearCeOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                   at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline at::Tensor linear_relu(const at::Tensor& x, const at::Tensor& weight,
                              const OptTensor& bias) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>(
          "gpufit::fused_linear_relu");
  return op.call(x, weight, bias);
}

inline Grads linear_relu_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& weight, const at::Tensor& out, bool needs_x) {
  static const auto op =
      find_op<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    bool)>("gpufit::fused_linear_relu_backward");
  return op.call(grad_out, x, weight, out, needs_x);
}

// The schemas' function types; the options travel as one linear_ce::Options.
using LinearCeForward = LinearCeOutputs(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& target, const OptTensor& bias,
                                        GPUFIT_LINEAR_CE_OPTION_PARAMS, Mask grad_mask);
using LinearCeBackward = Grads(const at::Tensor& grad_loss, const OptTensor& grad_lse,
                               const OptTensor& grad_entropy, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& target,
                               const OptTensor& bias, const at::Tensor& lse,
                               const at::Tensor& lse_lo, const OptTensor& entropy,
                               GPUFIT_LINEAR_CE_OPTION_PARAMS, Mask grad_mask);

inline LinearCeOutputs linear_ce(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& target, const OptTensor& bias,
                                 const linear_ce::Options& options, Mask grad_mask) {
  static const auto op = find_op<LinearCeForward>("gpufit::fused_linear_cross_entropy");
  return options.call(
      [&](auto&&... args) { return op.call(x, weight, target, bias, args..., grad_mask); });
}

inline Grads linear_ce_backward(const at::Tensor& grad_loss, const OptTensor& grad_lse,
                                const OptTensor& grad_entropy, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& target,
                                const OptTensor& bias, const at::Tensor& lse,
                                const at::Tensor& lse_lo, const OptTensor& entropy,
                                const linear_ce::Options& options, Mask grad_mask) {
  static const auto op = find_op<LinearCeBackward>("gpufit::fused_linear_cross_entropy_backward");
  return options.call([&](auto&&... args) {
    return op.call(grad_loss, grad_lse, grad_entropy, x, weight, target, bias, lse, lse_lo,
                   entropy, args..., grad_mask);
  });
}

}  // namespace op_calls
}  // namespace gpufit
