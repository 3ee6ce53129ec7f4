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

#include <string>

#define GPUFIT_LINEAR_CE_OPTION_SCHEMA \
  "int ignore_index, str reduction, float label_smoothing, float z_loss, int chunk_size"

#define GPUFIT_LINEAR_CE_OPTION_PARAMS                                                      \
  int64_t ignore_index, c10::string_view reduction, double label_smoothing, double z_loss, \
      int64_t chunk_size

#define GPUFIT_LINEAR_CE_OPTION_ARGS ignore_index, reduction, label_smoothing, z_loss, chunk_size

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

struct Options {
  int64_t ignore_index;
  Reduction reduction;
  double label_smoothing;  // eps: weight of the uniform distribution in the target
  double z_loss;           // z_loss * lse^2 added to each kept row's loss
  int64_t chunk_size;      // 0: the op's own plan

  // The one reading of the schema's option arguments; refuses bad values.
  static Options parse(GPUFIT_LINEAR_CE_OPTION_PARAMS) {
    TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, kOp,
                ": label_smoothing must be in [0, 1], got ", label_smoothing);
    TORCH_CHECK(z_loss >= 0.0, kOp, ": z_loss must be >= 0, got ", z_loss);
    TORCH_CHECK(chunk_size >= 0, kOp, ": chunk_size must be >= 0 (0: the op's plan), got ",
                chunk_size);
    return {ignore_index, parse_reduction(reduction), label_smoothing, z_loss, chunk_size};
  }

  // f(GPUFIT_LINEAR_CE_OPTION_ARGS...): the schema's option arguments again.
  template <typename F>
  decltype(auto) call(F&& f) const {
    return f(ignore_index, reduction_name(reduction), label_smoothing, z_loss, chunk_size);
  }

  bool smoothing() const { return label_smoothing != 0.0; }
};

}  // namespace linear_ce
}  // namespace gpufit
