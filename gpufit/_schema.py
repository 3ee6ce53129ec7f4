"""The operator schemas of the gpufit namespace, as declared in csrc/registration.cpp.

The compiled library declares them in C++; the pure-PyTorch fallback declares them from here.
tests/test_backend.py checks that both say the same thing.
"""

from gpufit._linear_ce_options import SCHEMA as LINEAR_CE_OPTIONS

NAMESPACE = "gpufit"

SCHEMAS: dict[str, str] = {
    "fused_linear_relu": "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "fused_linear_relu_backward": (
        "(Tensor grad_out, Tensor x, Tensor weight, Tensor out, bool needs_input_grad)"
        " -> (Tensor, Tensor, Tensor)"
    ),
    "fused_linear_cross_entropy": (
        "(Tensor x, Tensor weight, Tensor target, Tensor? bias, "
        f"{LINEAR_CE_OPTIONS}, bool[3] grad_mask)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "fused_linear_cross_entropy_backward": (
        "(Tensor grad_loss, Tensor? grad_lse, Tensor? grad_entropy, Tensor x, Tensor weight,"
        " Tensor target, Tensor? bias, Tensor lse, Tensor lse_lo, Tensor? entropy,"
        f" {LINEAR_CE_OPTIONS}, bool[3] grad_mask)"
        " -> (Tensor, Tensor, Tensor)"
    ),
}
