// Autograd of gpufit's ops, for every device (the Autograd key covers CPU and CUDA).
//
// In C++ rather than with torch.library.register_autograd because on small shapes (an MNIST
// step) the Python path cost more per call than the kernels. Each forward calls the op below
// autograd and each backward calls the registered *_backward op, both through the dispatcher,
// so torch.compile / AOTAutograd see exactly those ops (their fake kernels are in gpufit/ops.py).
// The pure-PyTorch reference backend registers its ops, and their autograd, from Python instead.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>

#include "linear_ce.h"

namespace gpufit {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using Mask = std::array<bool, 3>;

bool any(const Mask& m) { return m[0] || m[1] || m[2]; }

OptTensor optional_tensor(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// ---------------------------------------------------------------- the ops, via the dispatcher

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor linear_relu_op(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>(
          "gpufit::fused_linear_relu");
  return op.call(x, weight, bias);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Grads linear_relu_backward_op(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& weight, const at::Tensor& out, bool needs_x) {
  static const auto op =
      find_op<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    bool)>("gpufit::fused_linear_relu_backward");
  return op.call(grad_out, x, weight, out, needs_x);
}

using LinearCeOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

LinearCeOutputs linear_ce_op(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& target, const OptTensor& bias, int64_t ignore_index,
                             c10::string_view reduction, double smoothing, double z_loss,
                             int64_t chunk_size, Mask grad_mask) {
  static const auto op =
      find_op<LinearCeOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const OptTensor&, int64_t, c10::string_view, double, double, int64_t,
                              Mask)>("gpufit::fused_linear_cross_entropy");
  return op.call(x, weight, target, bias, ignore_index, reduction, smoothing, z_loss, chunk_size,
                 grad_mask);
}

Grads linear_ce_backward_op(const at::Tensor& grad_loss, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& target,
                            const OptTensor& bias, const at::Tensor& lse, int64_t ignore_index,
                            c10::string_view reduction, double smoothing, double z_loss,
                            int64_t chunk_size, Mask grad_mask) {
  static const auto op =
      find_op<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const OptTensor&, const at::Tensor&, int64_t, c10::string_view, double, double,
                    int64_t, Mask)>("gpufit::fused_linear_cross_entropy_backward");
  return op.call(grad_loss, x, weight, target, bias, lse, ignore_index, reduction, smoothing,
                 z_loss, chunk_size, grad_mask);
}

// ---------------------------------------------------------------- fused_linear_relu

struct FusedLinearReluFunction : public torch::autograd::Function<FusedLinearReluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptTensor& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = linear_relu_op(x, weight, bias);
    // The output doubles as the ReLU mask: out > 0 exactly where the pre-activation was.
    ctx->save_for_backward({x, weight, out});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    // needs_input_grad counts tensor inputs only: bias is input 2 when it was given.
    const bool needs_x = ctx->needs_input_grad(0);
    const bool needs_w = ctx->needs_input_grad(1);
    const bool needs_b = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    auto [grad_x, grad_w, grad_b] =
        linear_relu_backward_op(grads[0], saved[0], saved[1], saved[2], needs_x);
    return {needs_x ? grad_x : at::Tensor(), needs_w ? grad_w : at::Tensor(),
            needs_b ? grad_b : at::Tensor()};
  }
};

at::Tensor fused_linear_relu_autograd(const at::Tensor& x, const at::Tensor& weight,
                                      const OptTensor& bias) {
  return FusedLinearReluFunction::apply(x, weight, bias);
}

// ---------------------------------------------------------------- fused_linear_cross_entropy

// Copying a saved gradient this big (16 MiB+ of fp32) is worth waiting for a GPU to read
// grad_loss; gpufit/ops.py's reference path uses the same threshold.
constexpr int64_t kUnitCheckMinNumel = int64_t(1) << 22;

// Whether t holds real values that nothing traces (no fake or functional tensor, no Python
// mode, no functorch transform): only then may its value decide which ops run.
bool holds_plain_data(const at::Tensor& t) {
  constexpr c10::DispatchKeySet traced({c10::DispatchKey::Python,
                                        c10::DispatchKey::PythonTLSSnapshot,
                                        c10::DispatchKey::Functionalize,
                                        c10::DispatchKey::FuncTorchGradWrapper,
                                        c10::DispatchKey::FuncTorchBatched});
  return !t.key_set().has_any(traced) &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python) &&
         t.layout() == at::kStrided && !t.is_neg() && (t.is_cpu() || t.is_cuda());
}

// A one-element tensor's value; on the CPU read straight from memory (no dispatch).
double scalar_value(const at::Tensor& t) {
  if (t.is_cpu()) {
    if (t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>();
    if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>();
  }
  return t.item<double>();
}

// grad_loss == 1, the usual loss.backward(): then the saved gradients are already the answer.
bool is_unit(const at::Tensor& grad_loss, const at::Tensor& weight) {
  return grad_loss.numel() == 1 && holds_plain_data(grad_loss) &&
         (grad_loss.is_cpu() || weight.numel() >= kUnitCheckMinNumel) &&
         scalar_value(grad_loss) == 1.0;
}

Mask to_mask(const c10::IValue& v) {
  const auto list = v.toBoolList();
  return {list[0], list[1], list[2]};
}

struct FusedLinearCrossEntropyFunction
    : public torch::autograd::Function<FusedLinearCrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& target, const OptTensor& bias,
                               int64_t ignore_index, c10::string_view reduction, double smoothing,
                               double z_loss, int64_t chunk_size, Mask grad_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse, grad_x, grad_w, grad_b] = linear_ce_op(
        x, weight, target, bias, ignore_index, reduction, smoothing, z_loss, chunk_size, grad_mask);
    ctx->mark_non_differentiable({lse, grad_x, grad_w, grad_b});
    ctx->set_materialize_grads(false);  // an unused loss gets no gradient, not a zero one
    const bool in_forward = linear_ce::grads_in_forward(
        x.scalar_type(), linear_ce::parse_reduction(reduction), grad_mask);
    const Mask precomputed = in_forward ? grad_mask : Mask{false, false, false};
    ctx->saved_data["precomputed"] =
        c10::List<bool>({precomputed[0], precomputed[1], precomputed[2]});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["label_smoothing"] = smoothing;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["chunk_size"] = chunk_size;
    ctx->save_for_backward(
        {x, weight, target, bias.value_or(at::Tensor()), lse, grad_x, grad_w, grad_b});
    return {loss, lse, grad_x, grad_w, grad_b};
  }

  // Gradients for (x, weight, target, bias, and the six non-tensor arguments).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(10);
    const at::Tensor& grad_loss = grads[0];
    // needs_input_grad counts tensor inputs only: x 0, weight 1, target 2, bias 3 when given.
    const Mask needs = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                        ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)};
    if (!grad_loss.defined() || !any(needs)) return result;
    const variable_list saved = ctx->get_saved_variables();
    const Mask precomputed = to_mask(ctx->saved_data["precomputed"]);
    const Mask missing = {needs[0] && !precomputed[0], needs[1] && !precomputed[1],
                          needs[2] && !precomputed[2]};
    std::array<at::Tensor, 3> out;
    if (any(missing)) {
      std::tie(out[0], out[1], out[2]) = linear_ce_backward_op(
          grad_loss, saved[0], saved[1], saved[2], optional_tensor(saved[3]), saved[4],
          ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["reduction"].toStringRef(),
          ctx->saved_data["label_smoothing"].toDouble(), ctx->saved_data["z_loss"].toDouble(),
          ctx->saved_data["chunk_size"].toInt(), missing);
    }
    // The saved gradients are those of the loss itself. Scaled by grad_loss out of place: a
    // graph kept with retain_graph=True must give the same gradients again. For grad_loss == 1
    // they are returned as they are, so no second (V, H) buffer is made.
    const Mask reuse = {needs[0] && precomputed[0], needs[1] && precomputed[1],
                        needs[2] && precomputed[2]};
    const bool unit = any(reuse) && is_unit(grad_loss, saved[1]);
    for (size_t i = 0; i < 3; ++i) {
      if (reuse[i]) out[i] = unit ? saved[5 + i] : saved[5 + i] * grad_loss;
      if (!needs[i]) out[i] = at::Tensor();
    }
    result[0] = out[0];
    result[1] = out[1];
    result[3] = out[2];
    return result;
  }
};

LinearCeOutputs fused_linear_cross_entropy_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& target, const OptTensor& bias,
                                                    int64_t ignore_index,
                                                    c10::string_view reduction, double smoothing,
                                                    double z_loss, int64_t chunk_size,
                                                    Mask grad_mask) {
  const variable_list out = FusedLinearCrossEntropyFunction::apply(
      x, weight, target, bias, ignore_index, reduction, smoothing, z_loss, chunk_size, grad_mask);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpufit, Autograd, m) {
  m.impl("fused_linear_relu", &fused_linear_relu_autograd);
  m.impl("fused_linear_cross_entropy", &fused_linear_cross_entropy_autograd);
}

}  // namespace gpufit
