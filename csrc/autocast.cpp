// The autocast rule of gpufit's forward ops (see autocast.h), registered for the AutocastCPU and
// AutocastCUDA keys: where autocast is on for the device, x, weight and bias are cast to its
// dtype as F.linear's are (float64 and non-floating tensors are left alone; a weight is cast
// once per autocast region, from autocast's cache), then the op runs with autocast off. Its
// backward needs no rule: the gradients come back through the casts autograd recorded, in each
// input's own dtype. fused_linear_cross_entropy returns its loss and lse in fp32 for half inputs
// (autocast runs cross_entropy in fp32 too).
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "op_calls.h"

namespace gpufit {
namespace {

using op_calls::OptTensor;

template <c10::DeviceType device>
at::Tensor linear_relu_autocast(const at::Tensor& x, const at::Tensor& weight,
                                const OptTensor& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return op_calls::linear_relu(at::autocast::cached_cast(dtype, x, device),
                               at::autocast::cached_cast(dtype, weight, device),
                               at::autocast::cached_cast(dtype, bias, device));
}

template <c10::DeviceType device>
op_calls::LinearCeOutputs linear_ce_autocast(const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& target, const OptTensor& bias,
                                             GPUFIT_LINEAR_CE_OPTION_PARAMS,
                                             op_calls::Mask grad_mask) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return op_calls::linear_ce(at::autocast::cached_cast(dtype, x, device),
                             at::autocast::cached_cast(dtype, weight, device), target,
                             at::autocast::cached_cast(dtype, bias, device),
                             linear_ce::Options::parse(GPUFIT_LINEAR_CE_OPTION_ARGS), grad_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpufit, AutocastCPU, m) {
  m.impl("fused_linear_relu", &linear_relu_autocast<c10::DeviceType::CPU>);
  m.impl("fused_linear_cross_entropy", &linear_ce_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(gpufit, AutocastCUDA, m) {
  m.impl("fused_linear_relu", &linear_relu_autocast<c10::DeviceType::CUDA>);
  m.impl("fused_linear_cross_entropy", &linear_ce_autocast<c10::DeviceType::CUDA>);
}

}  // namespace gpufit
