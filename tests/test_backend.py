"""Backend choice: the compiled library, the JIT fallback and the pure-PyTorch fallback all
expose the same ops, and the choice is reported."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gpufit
from gpufit import _schema, ops

ROOT = Path(__file__).resolve().parent.parent

# Makes `import gpufit._C` fail in a child process, as on a machine where it was never built.
BLOCK_COMPILED = textwrap.dedent(
    """
    import sys
    class _NoCompiled:
        def find_spec(self, name, path=None, target=None):
            if name == "gpufit._C":
                raise ImportError("blocked by the test")
    sys.meta_path.insert(0, _NoCompiled())
    """
)

CHECK_OPS = textwrap.dedent(
    """
    import json, warnings, torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import gpufit.ops  # the kernels load here (a bare `import gpufit` is lazy)
    from gpufit import reference
    x, w, b = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4)
    x.requires_grad_()
    out = gpufit.ops.fused_linear_relu(x, w, b)
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    reference.fused_linear_relu(x2, w, b).sum().backward()
    torch.testing.assert_close(out, reference.fused_linear_relu(x, w, b))
    torch.testing.assert_close(x.grad, x2.grad)
    t = torch.tensor([0, 3, 1, 2, 0, 1])
    h = x.detach().clone().requires_grad_()
    loss = gpufit.ops.fused_linear_cross_entropy(h, w, t, b)
    (2 * loss).backward()
    h2 = h.detach().clone().requires_grad_()
    (2 * torch.nn.functional.cross_entropy(h2 @ w.T + b, t)).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    print(json.dumps({"info": gpufit.info().as_dict(),
                      "warnings": [str(w.message) for w in caught],
                      "grad_fns": [out.grad_fn.name(), loss.grad_fn.name()]}))
    """
)


def run_child(code: str, **env: str) -> dict:
    # the child picks its backend as a user's process would, whatever this run was told
    inherited = {k: v for k, v in os.environ.items() if k != "GPUFIT_BACKEND"}
    full_env = {**inherited, "PYTHONPATH": str(ROOT), **env}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_compiled_schemas_match_the_fallback_schemas():
    for name, schema in _schema.SCHEMAS.items():
        declared = torch._C.parse_schema(f"{_schema.NAMESPACE}::{name}{schema}")
        registered = getattr(torch.ops.gpufit, name).default._schema
        assert str(registered) == str(declared), name


def test_info_reports_the_active_backend():
    report = gpufit.info()
    assert report.backend == ops.BACKEND.label
    assert report.torch == torch.__version__
    assert report.torch_cuda == torch.version.cuda
    if ops.BACKEND.with_cuda:
        assert report.compiled_archs and report.compiled_archs != "none"
    text = str(report)
    assert "backend" in text and ops.BACKEND.label in text


def test_info_command_prints_json():
    result = subprocess.run(
        [sys.executable, "-m", "gpufit", "info", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["backend"] == ops.BACKEND.label and data["torch"] == torch.__version__


def test_reference_backend_on_request():
    data = run_child(CHECK_OPS, GPUFIT_BACKEND="reference")
    assert data["info"]["backend"] == "pure PyTorch (reference)"
    assert data["warnings"] == []  # asked for explicitly: nothing to warn about
    # its ops are Python-registered, so is their autograd (not csrc/autograd.cpp's)
    assert not any("CppNode" in name for name in data["grad_fns"]), data["grad_fns"]


def test_compiled_backend_has_cpp_autograd():
    if ops.BACKEND.kind == "reference":
        pytest.skip("no compiled backend in this environment")
    data = run_child(CHECK_OPS)
    assert data["info"]["backend"] == ops.BACKEND.label
    assert "FusedLinearReluFunction" in data["grad_fns"][0]
    assert "FusedLinearCrossEntropyFunction" in data["grad_fns"][1]


def test_falls_back_to_reference_with_one_warning_naming_the_cause():
    data = run_child(BLOCK_COMPILED + CHECK_OPS, GPUFIT_JIT="0")
    assert data["info"]["backend"] == "pure PyTorch (reference)"
    fallback = [w for w in data["warnings"] if "reference" in w]
    assert len(fallback) == 1
    assert "gpufit._C is not importable" in fallback[0] and "GPUFIT_JIT=0" in fallback[0]


def test_unknown_backend_is_refused():
    result = subprocess.run(
        [sys.executable, "-c", "import gpufit.ops"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "GPUFIT_BACKEND": "fastest"},
    )
    assert result.returncode != 0
    assert "GPUFIT_BACKEND='fastest' is not one of auto, compiled, jit, reference" in result.stderr


@pytest.mark.slow
def test_jit_fallback_builds_and_runs(tmp_path):
    """Without gpufit._C, import builds the CPU kernels with JIT (about half a minute)."""
    data = run_child(
        BLOCK_COMPILED + CHECK_OPS,
        GPUFIT_FORCE_CPU="1",
        TORCH_EXTENSIONS_DIR=str(tmp_path),
    )
    assert data["info"]["backend"] == "JIT-compiled CPU"
    assert data["warnings"] == []
    assert all("CppNode<gpufit::" in name for name in data["grad_fns"]), data["grad_fns"]
