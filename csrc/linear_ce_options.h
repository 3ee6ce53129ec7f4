// The options of fused_linear_cross_entropy, as one value.
//
// Both schemas (registration.cpp) take the same option arguments, in the order of
// GPUFIT_LINEAR_CE_OPTION_SCHEMA. Every kernel entry point (CPU, CUDA, autograd, autocast) takes
// them as GPUFIT_LINEAR_CE_OPTION_PARAMS and reads them once, with Options::parse; below that
// only an Options travels. op_calls.h hands an Options back to the dispatcher as the same
// arguments (Options::call). An option is added here (the four lists below and the struct) and
// where it is used; gpufit/_schema.py and gpufit/_linear_ce_options.py hold the Python side.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

#define GPUFIT_LINEAR_CE_OPTION_SCHEMA                                                   \
  "int ignore_index, str reduction, float label_smoothing, float z_loss, float? softcap, " \
  "Tensor? class_weight, Tensor? num_items, int chunk_size, bool return_predicted"

#define GPUFIT_LINEAR_CE_OPTION_PARAMS                                                          \
  int64_t ignore_index, c10::string_view reduction, double label_smoothing, double z_loss,     \
      c10::optional<double> softcap, const c10::optional<at::Tensor>& class_weight,            \
      const c10::optional<at::Tensor>& num_items, int64_t chunk_size, bool return_predicted

#define GPUFIT_LINEAR_CE_OPTION_ARGS                                                   \
  ignore_index, reduction, label_smoothing, z_loss, softcap, class_weight, num_items, \
      chunk_size, return_predicted

namespace gpufit {
namespace linear_ce {

constexpr const char* kOp = "fused_linear_cross_entropy";

enum class Reduction { None, Mean, Sum };

inline Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "none") return Reduction::None;
  TORCH_CHECK(false, kOp, ": reduction must be 'mean', 'sum' or 'none', got '",
              std::string(reduction.data(), reduction.size()), "'");
}

inline c10::string_view reduction_name(Reduction reduction) {
  switch (reduction) {
    case Reduction::Mean:
      return "mean";
    case Reduction::Sum:
      return "sum";
    case Reduction::None:
      break;
  }
  return "none";
}

inline at::Tensor defined_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? *t : at::Tensor();
}

inline c10::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

struct Options {
  int64_t ignore_index;
  Reduction reduction;
  double label_smoothing;  // eps: weight of the uniform distribution in the target
  double z_loss;           // z_loss * lse^2 added to each kept row's loss
  double softcap;          // logits become softcap * tanh(z / softcap); 0: none
  at::Tensor class_weight;  // (V,) weight of each class, as F.cross_entropy's; undefined: none
  at::Tensor num_items;     // 0-dim: a reduction="sum" loss is divided by it; undefined: none
  int64_t chunk_size;       // 0: the op's own plan
  bool return_predicted;    // also return each row's argmax

  // The one reading of the schema's option arguments; refuses bad values (class_weight's size
  // and device are checked with the inputs, linear_ce.h's check_inputs).
  static Options parse(GPUFIT_LINEAR_CE_OPTION_PARAMS) {
    TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, kOp,
                ": label_smoothing must be in [0, 1], got ", label_smoothing);
    TORCH_CHECK(z_loss >= 0.0, kOp, ": z_loss must be >= 0, got ", z_loss);
    TORCH_CHECK(!softcap.has_value() || (*softcap > 0.0 && std::isfinite(*softcap)), kOp,
                ": softcap must be a positive finite number or None, got ", softcap.value_or(0));
    TORCH_CHECK(chunk_size >= 0, kOp, ": chunk_size must be >= 0 (0: the op's plan), got ",
                chunk_size);
    const Reduction r = parse_reduction(reduction);
    const at::Tensor weights = defined_or_empty(class_weight);
    TORCH_CHECK(!weights.defined() ||
                    (weights.dim() == 1 && at::isFloatingType(weights.scalar_type())),
                kOp, ": class_weight must be a 1-D floating-point tensor");
    const at::Tensor items = defined_or_empty(num_items);
    TORCH_CHECK(!items.defined() || r == Reduction::Sum, kOp,
                ": num_items goes with reduction='sum' only");
    TORCH_CHECK(!items.defined() || items.dim() == 0, kOp,
                ": num_items must be a 0-dim tensor, got shape ", items.sizes());
    return {ignore_index, r,       label_smoothing, z_loss,          softcap.value_or(0.0),
            weights,      items,   chunk_size,      return_predicted};
  }

  // f(GPUFIT_LINEAR_CE_OPTION_ARGS...): the schema's option arguments again.
  template <typename F>
  decltype(auto) call(F&& f) const {
    return f(ignore_index, reduction_name(reduction), label_smoothing, z_loss,
             softcap > 0.0 ? c10::optional<double>(softcap) : c10::nullopt,
             optional_of(class_weight), optional_of(num_items), chunk_size, return_predicted);
  }

  bool smoothing() const { return label_smoothing != 0.0; }
  bool capped() const { return softcap > 0.0; }
  bool weighted() const { return class_weight.defined(); }
};

}  // namespace linear_ce
}  // namespace gpufit
