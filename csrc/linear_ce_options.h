// The options of fused_linear_cross_entropy, as one value.
//
// GPUFIT_LINEAR_CE_OPTIONS below declares each option once, in schema order. From it come the
// schema's option arguments (GPUFIT_LINEAR_CE_OPTION_SCHEMA, which both schemas in
// registration.cpp take), how every kernel entry point (CPU, CUDA, autograd, autocast) takes
// them (GPUFIT_LINEAR_CE_OPTION_PARAMS / _ARGS), the fields of Options, Options::parse (the one
// reading of the arguments, after its checks) and Options::call (the arguments again, for
// op_calls.h). Adding an option: an entry there, its check in parse, its use;
// gpufit/_linear_ce_options.py declares the Python side, and a test compares the schemas.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

// X(schema type, parameter type, name, field type, read, write): an entry point takes the
// option as `parameter type name`; Options keeps `field type name`, made from the parameter
// by `read` and turned back into it by `write` (both name the value `name`).
#define GPUFIT_LINEAR_CE_OPTIONS(X, SEP)                                                      \
  X("int", int64_t, ignore_index, int64_t, ignore_index, ignore_index) SEP()                 \
  X("str", c10::string_view, reduction, Reduction, parse_reduction(reduction),               \
    reduction_name(reduction)) SEP()                                                           \
  X("float", double, label_smoothing, double, label_smoothing, label_smoothing) SEP()        \
  X("float", double, z_loss, double, z_loss, z_loss) SEP()                                     \
  X("float?", c10::optional<double>, softcap, double, softcap.value_or(0.0),                  \
    optional_cap(softcap)) SEP()                                                               \
  X("Tensor?", const c10::optional<at::Tensor>&, class_weight, at::Tensor,                    \
    defined_or_empty(class_weight), optional_of(class_weight)) SEP()                           \
  X("Tensor?", const c10::optional<at::Tensor>&, num_items, at::Tensor,                       \
    defined_or_empty(num_items), optional_of(num_items)) SEP()                                 \
  X("int", int64_t, chunk_size, int64_t, chunk_size, chunk_size) SEP()                         \
  X("bool", bool, return_predicted, bool, return_predicted, return_predicted) SEP()           \
  X("float", double, temperature, double, temperature, temperature) SEP()                      \
  X("bool", bool, return_entropy, bool, return_entropy, return_entropy) SEP()                  \
  X("bool", bool, return_log_sum_sq_probs, bool, return_log_sum_sq_probs,                      \
    return_log_sum_sq_probs) SEP()                                                             \
  X("bool", bool, return_mean_logits, bool, return_mean_logits, return_mean_logits)

#define GPUFIT_LCE_SCHEMA_ITEM(schema, param, name, field, read, write) schema " " #name
#define GPUFIT_LCE_PARAM_ITEM(schema, param, name, field, read, write) param name
#define GPUFIT_LCE_ARG_ITEM(schema, param, name, field, read, write) name
#define GPUFIT_LCE_FIELD_ITEM(schema, param, name, field, read, write) field name;
#define GPUFIT_LCE_READ_ITEM(schema, param, name, field, read, write) read
#define GPUFIT_LCE_WRITE_ITEM(schema, param, name, field, read, write) write
#define GPUFIT_LCE_SCHEMA_SEP() ", "
#define GPUFIT_LCE_COMMA() ,
#define GPUFIT_LCE_NOTHING()

#define GPUFIT_LINEAR_CE_OPTION_SCHEMA \
  GPUFIT_LINEAR_CE_OPTIONS(GPUFIT_LCE_SCHEMA_ITEM, GPUFIT_LCE_SCHEMA_SEP)
#define GPUFIT_LINEAR_CE_OPTION_PARAMS GPUFIT_LINEAR_CE_OPTIONS(GPUFIT_LCE_PARAM_ITEM, GPUFIT_LCE_COMMA)
#define GPUFIT_LINEAR_CE_OPTION_ARGS GPUFIT_LINEAR_CE_OPTIONS(GPUFIT_LCE_ARG_ITEM, GPUFIT_LCE_COMMA)

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

inline c10::optional<double> optional_cap(double softcap) {
  return softcap > 0.0 ? c10::optional<double>(softcap) : c10::nullopt;
}

// What each field means: ignore_index; reduction; label_smoothing, the weight of the uniform
// distribution in the target; z_loss, times lse^2 added to each kept row's loss; softcap, the
// logits become softcap * tanh(z / softcap) (0: none); class_weight, (V,) weight of each class
// as F.cross_entropy's (undefined: none); num_items, 0-dim: a reduction="sum" loss is divided
// by it (undefined: none); chunk_size, 0: the op's own plan; return_predicted, also return
// each row's argmax; temperature, the (capped) logits are divided by it; return_entropy,
// return_log_sum_sq_probs, return_mean_logits: also return each row's softmax entropy,
// log sum_j p_j^2 and mean logit (of the tempered logits).
//
// The kernels apply the temperature as a scale of the GEMM, z = (x W^T + b) / T, and the softcap
// to that as cap / T: (cap / T) tanh((z / T) / (cap / T)) = cap tanh(z / cap) / T, the capped
// logit divided by T. So every kernel sees the final logits, and its gradient with respect to
// them is multiplied by 1 / T on the way back to the GEMM's.
struct Options {
  GPUFIT_LINEAR_CE_OPTIONS(GPUFIT_LCE_FIELD_ITEM, GPUFIT_LCE_NOTHING)

  // The one reading of the schema's option arguments; refuses bad values (class_weight's size
  // and device are checked with the inputs, linear_ce.h's check_inputs).
  static Options parse(GPUFIT_LINEAR_CE_OPTION_PARAMS) {
    TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, kOp,
                ": label_smoothing must be in [0, 1], got ", label_smoothing);
    TORCH_CHECK(z_loss >= 0.0, kOp, ": z_loss must be >= 0, got ", z_loss);
    TORCH_CHECK(!softcap.has_value() || (*softcap > 0.0 && std::isfinite(*softcap)), kOp,
                ": softcap must be a positive finite number or None, got ", softcap.value_or(0));
    TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), kOp,
                ": temperature must be a positive finite number, got ", temperature);
    TORCH_CHECK(chunk_size >= 0, kOp, ": chunk_size must be >= 0 (0: the op's plan), got ",
                chunk_size);
    const at::Tensor weights = defined_or_empty(class_weight);
    TORCH_CHECK(!weights.defined() ||
                    (weights.dim() == 1 && at::isFloatingType(weights.scalar_type())),
                kOp, ": class_weight must be a 1-D floating-point tensor");
    const at::Tensor items = defined_or_empty(num_items);
    TORCH_CHECK(!items.defined() || parse_reduction(reduction) == Reduction::Sum, kOp,
                ": num_items goes with reduction='sum' only");
    TORCH_CHECK(!items.defined() || items.dim() == 0, kOp,
                ": num_items must be a 0-dim tensor, got shape ", items.sizes());
    return {GPUFIT_LINEAR_CE_OPTIONS(GPUFIT_LCE_READ_ITEM, GPUFIT_LCE_COMMA)};
  }

  // f(GPUFIT_LINEAR_CE_OPTION_ARGS...): the schema's option arguments again.
  template <typename F>
  decltype(auto) call(F&& f) const {
    return f(GPUFIT_LINEAR_CE_OPTIONS(GPUFIT_LCE_WRITE_ITEM, GPUFIT_LCE_COMMA));
  }

  bool smoothing() const { return label_smoothing != 0.0; }
  bool capped() const { return softcap > 0.0; }
  // the softcap as the kernels apply it, to logits already divided by the temperature
  double tempered_cap() const { return softcap / temperature; }
  bool tempered() const { return temperature != 1.0; }
  double inv_temperature() const { return 1.0 / temperature; }
  bool row_outputs() const {
    return return_entropy || return_log_sum_sq_probs || return_mean_logits;
  }
  bool weighted() const { return class_weight.defined(); }
};

}  // namespace linear_ce
}  // namespace gpufit
