// Input validation shared by the CPU and CUDA kernels of every op. The Python wrappers check the
// same things first (with friendlier exception types); these guard direct torch.ops calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

namespace gpufit {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

// x (..., K), weight (N, K), bias (N,) or undefined: same dtype and device.
inline void check_linear_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias) {
  check_floating(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension, got a scalar");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got ",
              weight.sizes());
  TORCH_CHECK(x.size(-1) == weight.size(1), op, ": x has ", x.size(-1),
              " features in its last dimension but weight expects ", weight.size(1),
              " (weight shape ", weight.sizes(), ")");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": dtype mismatch, x is ",
              x.scalar_type(), " but weight is ", weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), op, ": device mismatch, x is on ", x.device(),
              " but weight is on ", weight.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must have shape (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": dtype mismatch, x is ",
                x.scalar_type(), " but bias is ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": device mismatch, x is on ", x.device(),
                " but bias is on ", bias->device());
  }
}

// t (..., F) viewed as rows (prod(...), F); unlike reshape({-1, F}) this works when F == 0.
inline at::Tensor as_rows(const at::Tensor& t) {
  const auto sizes = t.sizes();
  const int64_t rows = c10::multiply_integers(sizes.begin(), sizes.end() - 1);
  return t.reshape({rows, sizes.back()});
}

// For bf16/fp16 the bias goes into the GEMM (fp32 accumulator, one rounding), as PyTorch's own
// linear does; adding it after the GEMM output was rounded to 8 or 11 bits would round twice
// and flip the ReLU of near-zero pre-activations. fp32/fp64 have no such loss, and there the
// epilogue adds the bias in the same pass as the ReLU.
inline bool bias_in_gemm(const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() && at::isReducedFloatingType(x.scalar_type());
}

}  // namespace gpufit
