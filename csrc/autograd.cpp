// Autograd of gpufit's ops, for every device (the Autograd key covers CPU and CUDA).
//
// In C++ rather than with torch.library.register_autograd because on small shapes (an MNIST
// step) the Python path cost more per call than the kernels. Each forward calls the op below
// autograd and each backward calls the registered *_backward op, both through the dispatcher,
// so torch.compile / AOTAutograd see exactly those ops (their fake kernels are in gpufit/ops.py).
// The pure-PyTorch reference backend registers its ops, and their autograd, from Python instead.
//
// Double backward: when a backward runs with create_graph=True (grad mode on inside backward),
// the gradients are computed instead by a composite of differentiable ATen ops (the composite_*
// functions below), so that hessians, gradient penalties and the like are right. For the
// linear cross-entropy that composite holds the full (N, V) logits: it trades the op's memory
// saving for differentiability, only where the caller asked for a graph of the backward.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/one_hot.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>

#include "autocast.h"
#include "checks.h"
#include "linear_ce.h"
#include "op_calls.h"

namespace gpufit {
namespace {

using op_calls::Mask;
using op_calls::OptTensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool any(const Mask& m) { return m[0] || m[1] || m[2]; }

OptTensor optional_tensor(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// ---------------------------------------------------------------- fused_linear_relu

// Differentiable: relu's own backward (threshold_backward on its output), then the two GEMMs.
// The ReLU mask is a constant of the graph (relu'' = 0 almost everywhere).
variable_list composite_linear_relu_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                             const at::Tensor& weight, const at::Tensor& out,
                                             const Mask& needs) {
  NoAutocast no_autocast;
  const at::Tensor grad_z = as_rows(at::threshold_backward(grad_out, out.detach(), 0));
  const at::Tensor x2d = as_rows(x);
  return {needs[0] ? grad_z.mm(weight).view(x.sizes()) : at::Tensor(),
          needs[1] ? grad_z.t().mm(x2d) : at::Tensor(),
          needs[2] ? grad_z.sum(0) : at::Tensor()};
}

struct FusedLinearReluFunction : public torch::autograd::Function<FusedLinearReluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptTensor& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = op_calls::linear_relu(x, weight, bias);
    // The output doubles as the ReLU mask: out > 0 exactly where the pre-activation was.
    ctx->save_for_backward({x, weight, out});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    // needs_input_grad counts tensor inputs only: bias is input 2 when it was given.
    const Mask needs = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                        ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    if (at::GradMode::is_enabled()) {
      return composite_linear_relu_backward(grads[0], saved[0], saved[1], saved[2], needs);
    }
    auto [grad_x, grad_w, grad_b] =
        op_calls::linear_relu_backward(grads[0], saved[0], saved[1], saved[2], needs[0]);
    return {needs[0] ? grad_x : at::Tensor(), needs[1] ? grad_w : at::Tensor(),
            needs[2] ? grad_b : at::Tensor()};
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

// The options of one call, saved for backward in the context.
struct SavedOptions : torch::CustomClassHolder {
  explicit SavedOptions(const linear_ce::Options& o) : options(o) {}
  linear_ce::Options options;

  static void save(AutogradContext* ctx, const linear_ce::Options& o) {
    ctx->saved_data["options"] = c10::IValue::make_capsule(c10::make_intrusive<SavedOptions>(o));
  }
  static const linear_ce::Options& of(AutogradContext* ctx) {
    return static_cast<const SavedOptions*>(ctx->saved_data["options"].toCapsule().get())->options;
  }
};

// Differentiable gradients of grad_loss . loss + grad_lse . lse + grad_entropy . entropy (each
// may be undefined) from the full logits, the same formulas as the kernels (linear_ce.h).
variable_list composite_linear_ce_backward(const at::Tensor& grad_loss, const at::Tensor& grad_lse,
                                           const at::Tensor& grad_entropy, const at::Tensor& x,
                                           const at::Tensor& weight, const at::Tensor& target,
                                           const at::Tensor& bias, const linear_ce::Options& o,
                                           const Mask& needs) {
  NoAutocast no_autocast;
  const at::ScalarType dtype = x.scalar_type();
  const at::ScalarType acc = linear_ce::acc_type(dtype);
  const int64_t N = target.numel(), V = weight.size(0), H = weight.size(1);
  const at::Tensor x2d = x.reshape({N, H});
  // half inputs multiplied in fp32, as the kernels do
  const at::Tensor raw =
      at::linear(x2d.to(acc), weight.to(acc), bias.defined() ? optional_tensor(bias.to(acc))
                                                             : c10::nullopt);
  const at::Tensor capped = o.capped() ? (raw / o.softcap).tanh() * o.softcap : raw;
  const at::Tensor z = o.tempered() ? capped / o.temperature : capped;
  const at::Tensor lse = at::logsumexp(z, {1});
  const at::Tensor t = target.reshape({-1});
  const at::Tensor valid = t != o.ignore_index;
  const at::Tensor zero = at::zeros({}, z.options());
  const linear_ce::ClassWeights cw = linear_ce::ClassWeights::of(o, z.options());
  const double eps = o.label_smoothing;
  at::Tensor c = at::zeros({N}, z.options());
  if (grad_loss.defined()) {
    c = o.reduction == linear_ce::Reduction::None ? grad_loss.reshape({-1}).to(acc)
                                                  : grad_loss.to(acc).expand({N});
    if (o.reduction != linear_ce::Reduction::None) {
      const at::Tensor count = o.reduction == linear_ce::Reduction::Mean
                                   ? linear_ce::mean_denominator(t, valid, cw, acc)
                                   : at::Tensor();
      c = c * linear_ce::reduced_scale(o, count, z.options());
    }
    c = at::where(valid, c, zero);
  }
  // d row loss / d z = softmax A - eps/V w - (1 - eps) w_t onehot (linear_ce.h)
  const at::Tensor wt = cw.defined() ? linear_ce::target_weights(t, valid, cw) : at::Tensor();
  at::Tensor coef = cw.defined()
                        ? c * (wt * (1.0 - eps) + cw.prefix.narrow(0, V, 1) * (eps / V) +
                               lse * (2.0 * o.z_loss))
                        : c * (lse * (2.0 * o.z_loss) + 1.0);
  if (grad_lse.defined()) coef = coef + grad_lse.reshape({-1}).to(acc);
  const at::Tensor onehot = at::one_hot(at::where(valid, t, at::zeros({}, t.options())), V).to(acc);
  const at::Tensor target_coef = cw.defined() ? c * wt * (1.0 - eps) : c * (1.0 - eps);
  at::Tensor dz = at::softmax(z, 1) * coef.unsqueeze(1) - target_coef.unsqueeze(1) * onehot;
  if (o.smoothing()) {
    const at::Tensor smooth = (c * (eps / static_cast<double>(V))).unsqueeze(1);
    dz = dz - (cw.defined() ? smooth * cw.w.unsqueeze(0) : smooth);
  }
  if (grad_entropy.defined()) {  // d H / d z_j = -p_j (log p_j + H)
    const at::Tensor logp = at::log_softmax(z, 1);
    const at::Tensor p = logp.exp();
    const at::Tensor plogp = at::where(p > 0, p * logp, zero);
    const at::Tensor entropy = -plogp.sum(1, true);
    dz = dz - grad_entropy.reshape({N, 1}).to(acc) * at::where(p > 0, p * (logp + entropy), zero);
  }
  if (o.capped()) dz = dz * (1.0 - (z / o.tempered_cap()).pow(2));
  if (o.tempered()) dz = dz * o.inv_temperature();
  const at::Tensor dz_in = dz.to(dtype);
  return {needs[0] ? dz_in.mm(weight).view(x.sizes()) : at::Tensor(),
          needs[1] ? dz_in.t().mm(x2d) : at::Tensor(),
          needs[2] ? dz.sum(0).to(dtype) : at::Tensor()};
}

struct FusedLinearCrossEntropyFunction
    : public torch::autograd::Function<FusedLinearCrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& target, const OptTensor& bias,
                               const linear_ce::Options& o, Mask grad_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse, lse_lo, predicted, entropy, log_sum_sq_probs, mean_logits, grad_x, grad_w,
          grad_b] = op_calls::linear_ce(x, weight, target, bias, o, grad_mask);
    // loss, lse and entropy are differentiable (d lse_i / d z_ij = softmax_ij); the rest is not.
    ctx->mark_non_differentiable(
        {lse_lo, predicted, log_sum_sq_probs, mean_logits, grad_x, grad_w, grad_b});
    ctx->set_materialize_grads(false);  // an unused output gets no gradient, not a zero one
    const bool in_forward = linear_ce::grads_in_forward(x.scalar_type(), o.reduction, grad_mask);
    const Mask precomputed = in_forward ? grad_mask : Mask{false, false, false};
    ctx->saved_data["precomputed"] =
        c10::List<bool>({precomputed[0], precomputed[1], precomputed[2]});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    SavedOptions::save(ctx, o);
    ctx->save_for_backward({x, weight, target, bias.value_or(at::Tensor()), lse, lse_lo, grad_x,
                            grad_w, grad_b, entropy});
    return {loss,    lse,         lse_lo, predicted, entropy, log_sum_sq_probs,
            mean_logits, grad_x, grad_w,    grad_b};
  }

  // Gradients for (x, weight, target, bias, options, grad_mask).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(6);
    const at::Tensor& grad_loss = grads[0];
    const at::Tensor& grad_lse = grads[1];
    const linear_ce::Options& o = SavedOptions::of(ctx);
    // the entropy output is empty unless asked for (a traced graph may still pass it a gradient)
    const at::Tensor grad_entropy = o.return_entropy ? grads[4] : at::Tensor();
    // needs_input_grad counts tensor inputs only: x 0, weight 1, target 2, bias 3 when given.
    const Mask needs = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                        ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)};
    if ((!grad_loss.defined() && !grad_lse.defined() && !grad_entropy.defined()) || !any(needs)) {
      return result;
    }
    const variable_list saved = ctx->get_saved_variables();
    std::array<at::Tensor, 3> out;
    if (at::GradMode::is_enabled()) {
      const variable_list g = composite_linear_ce_backward(
          grad_loss, grad_lse, grad_entropy, saved[0], saved[1], saved[2], saved[3], o, needs);
      std::copy(g.begin(), g.end(), out.begin());
    } else if (grad_lse.defined() || grad_entropy.defined()) {
      // The lse or the entropy is used: its term is computed with the loss's, in one backward
      // op (the gradients precomputed in forward are the loss's alone).
      const at::Tensor& lse = saved[4];
      const at::Tensor loss_grad =
          grad_loss.defined()
              ? grad_loss
              : (o.reduction == linear_ce::Reduction::None ? at::zeros_like(lse)
                                                           : at::zeros({}, lse.options()));
      std::tie(out[0], out[1], out[2]) = op_calls::linear_ce_backward(
          loss_grad, optional_tensor(grad_lse), optional_tensor(grad_entropy), saved[0], saved[1],
          saved[2], optional_tensor(saved[3]), lse, saved[5],
          grad_entropy.defined() ? optional_tensor(saved[9]) : c10::nullopt, o, needs);
    } else {
      const Mask precomputed = to_mask(ctx->saved_data["precomputed"]);
      const Mask missing = {needs[0] && !precomputed[0], needs[1] && !precomputed[1],
                            needs[2] && !precomputed[2]};
      if (any(missing)) {
        std::tie(out[0], out[1], out[2]) = op_calls::linear_ce_backward(
            grad_loss, c10::nullopt, c10::nullopt, saved[0], saved[1], saved[2],
            optional_tensor(saved[3]), saved[4], saved[5], c10::nullopt, o, missing);
      }
      // The saved gradients are those of the loss itself. Scaled by grad_loss out of place: a
      // graph kept with retain_graph=True must give the same gradients again. For
      // grad_loss == 1 they are returned as they are, so no second (V, H) buffer is made.
      const Mask reuse = {needs[0] && precomputed[0], needs[1] && precomputed[1],
                          needs[2] && precomputed[2]};
      const bool unit = any(reuse) && is_unit(grad_loss, saved[1]);
      for (size_t i = 0; i < 3; ++i) {
        if (reuse[i]) out[i] = unit ? saved[6 + i] : saved[6 + i] * grad_loss;
      }
    }
    for (size_t i = 0; i < 3; ++i) {
      if (!needs[i]) out[i] = at::Tensor();
    }
    result[0] = out[0];
    result[1] = out[1];
    result[3] = out[2];
    return result;
  }
};

op_calls::LinearCeOutputs fused_linear_cross_entropy_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target, const OptTensor& bias,
    GPUFIT_LINEAR_CE_OPTION_PARAMS, Mask grad_mask) {
  const variable_list out = FusedLinearCrossEntropyFunction::apply(
      x, weight, target, bias, linear_ce::Options::parse(GPUFIT_LINEAR_CE_OPTION_ARGS), grad_mask);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8], out[9]};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpufit, Autograd, m) {
  m.impl("fused_linear_relu", &fused_linear_relu_autograd);
  m.impl("fused_linear_cross_entropy", &fused_linear_cross_entropy_autograd);
}

}  // namespace gpufit
