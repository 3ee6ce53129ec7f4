"""Shared pytest setup: tests marked `cuda` run only where a CUDA GPU is visible; tests marked
`compiled` (the C++ kernels' own guards and memory behaviour) only where gpufit runs compiled
kernels, not on the pure-PyTorch reference backend (GPUFIT_BACKEND=reference); a test that
cannot run because an optional package is not installed is skipped, naming the extra of
pyproject.toml that installs it."""

import os
import shutil
import tempfile

import pytest

# optional packages (top-level module) -> the extra that installs them
EXTRA_OF = {
    "rattler": "lock",
    "conda_lock": "lock",
    "torchvision": "mnist",
    "matplotlib": "bench",
    "cut_cross_entropy": "bench",
    "transformers": "hf",
    "accelerate": "hf",
    "peft": "lm",
    "sentencepiece": "lm",
    "mistral_common": "lm",
    "deepspeed": "deepspeed",
}


# extras of lockgen's own distribution (lockgen/pyproject.toml); the others are gpufit's
LOCKGEN_EXTRAS = ("lock",)


def skip_reason(module: str) -> str:
    extra = EXTRA_OF[module]
    project = "./lockgen" if extra in LOCKGEN_EXTRAS else "."
    install = f"pip install -e '{project}[{extra}]'"
    return f"needs the {extra} extra ({module} is not installed): {install}"


def missing_optional_module(error: BaseException | None) -> str | None:
    """The optional package whose absence caused ``error`` (anywhere in its chain), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ModuleNotFoundError) and error.name:
            top = error.name.split(".")[0]
            if top in EXTRA_OF:
                return top
        error = error.__cause__ or error.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None:
        module = missing_optional_module(call.excinfo.value)
        if module is not None:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, skip_reason(module))


def _skip_marked(items, marker: str, reason: str) -> None:
    for item in items:
        if item.get_closest_marker(marker) is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_collection_modifyitems(config, items):
    markers = {m.name for item in items for m in item.iter_markers()}
    if not markers & {"cuda", "compiled"}:
        return  # no torch import for suites without such tests (lockgen's)
    import torch

    if "cuda" in markers and not torch.cuda.is_available():
        _skip_marked(items, "cuda", "needs a CUDA GPU (none visible)")
    if "compiled" in markers:
        from gpufit import ops

        if ops.BACKEND.kind == "reference":
            _skip_marked(items, "compiled", "tests compiled kernels; this run uses the reference")


def pytest_configure(config):
    # torch.compile's on-disk cache is shared by every checkout of a user (/tmp/torchinductor_*)
    # and its keys do not cover gpufit's compiled library: a graph compiled against another
    # build of these ops would be replayed here. Each test run gets its own.
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="gpufit-tests-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
