// The one place where gpufit's operator schemas are declared.
//
// Kernels register themselves per backend (CPU in the .cpp files, CUDA in the .cu files) with
// TORCH_LIBRARY_IMPL, and so do the autograd of both devices (autograd.cpp, Autograd key) and
// the autocast casts (autocast.cpp, AutocastCPU and AutocastCUDA keys); the fake kernels are
// registered from Python (gpufit/ops.py).
// gpufit/_schema.py holds the same schema strings for the pure-PyTorch fallback, and a test
// checks that both agree.
#include <Python.h>
#include <torch/library.h>

#include "linear_ce_options.h"

#ifndef GPUFIT_WITH_CUDA
#define GPUFIT_WITH_CUDA 0
#endif
#ifndef GPUFIT_CUDA_ARCHS_TOKENS
#define GPUFIT_CUDA_ARCHS_TOKENS none
#endif
#define GPUFIT_STRINGIFY_(...) #__VA_ARGS__
#define GPUFIT_STRINGIFY(...) GPUFIT_STRINGIFY_(__VA_ARGS__)

TORCH_LIBRARY(gpufit, m) {
  m.def("fused_linear_relu(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "fused_linear_relu_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, "
      "bool needs_input_grad) -> (Tensor, Tensor, Tensor)");
  // Returns (loss, lse, lse_lo, predicted, entropy, log_sum_sq_probs, mean_logits, grad_x,
  // grad_weight, grad_bias): loss and lse in the accumulation type (fp32 for half inputs),
  // lse + lse_lo the log-sum-exp to twice lse's precision (for backward), each row's argmax for
  // return_predicted (ignore_index on ignored rows; else empty), each row's entropy,
  // log sum_j p_j^2 and mean logit where asked (accumulation type; else empty), and the
  // gradients (of the loss itself, for grad_loss = 1) filled in
  // forward only where linear_ce.h's grads_in_forward() says so, else empty. The option
  // arguments: csrc/linear_ce_options.h.
  m.def(
      "fused_linear_cross_entropy(Tensor x, Tensor weight, Tensor target, Tensor? bias, "
      GPUFIT_LINEAR_CE_OPTION_SCHEMA
      ", bool[3] grad_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
  // The gradients of grad_loss . loss + grad_lse . lse + grad_entropy . entropy (grad_lse,
  // grad_entropy None: that output unused; entropy: the forward's, with grad_entropy).
  m.def(
      "fused_linear_cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, "
      "Tensor? grad_entropy, Tensor x, Tensor weight, Tensor target, Tensor? bias, Tensor lse, "
      "Tensor lse_lo, Tensor? entropy, " GPUFIT_LINEAR_CE_OPTION_SCHEMA
      ", bool[3] grad_mask) -> (Tensor, Tensor, Tensor)");
}

// A plain extension module (no pybind11): importing gpufit._C loads the shared library, which
// runs the registrations above, and exposes how the library was built.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "gpufit compiled operators", -1,
                                   nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "with_cuda", GPUFIT_WITH_CUDA) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs",
                                 GPUFIT_STRINGIFY(GPUFIT_CUDA_ARCHS_TOKENS)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
