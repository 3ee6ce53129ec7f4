"""The operator schemas of the gpufit namespace, as declared in csrc/registration.cpp.

The compiled library declares them in C++; the pure-PyTorch fallback declares them from here.
tests/test_backend.py checks that both say the same thing.
"""

NAMESPACE = "gpufit"

SCHEMAS: dict[str, str] = {
    "fused_linear_relu": "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "fused_linear_relu_backward": (
        "(Tensor grad_out, Tensor x, Tensor weight, Tensor out, bool needs_input_grad)"
        " -> (Tensor, Tensor, Tensor)"
    ),
}
