"""The LLM stack targets (``stack = [...]`` in targets.toml) and what ``lockgen verify`` adds
for their locks: every package the stack facts know, judged against torch's CUDA major and
ABI on every platform x Python of the lock. Offline: the committed locks, copies of them
tampered with, and the stack facts themselves."""

from __future__ import annotations

import dataclasses
import io
import json
import re

import pytest
from checkout import ENVS, FACTS

from lockgen.check import Request
from lockgen.cli import main
from lockgen.errors import MatrixError
from lockgen.findings import ERROR, Report
from lockgen.formats.locks import target_machines
from lockgen.formats.pip import is_cuda_runtime_wheel, is_cudnn_wheel
from lockgen.formats.uv import uv_paths
from lockgen.load import load_matrix
from lockgen.routes import NONE, routes
from lockgen.stack import load_stack
from lockgen.stack_check import With, check_stack
from lockgen.stack_lock import check_stack_lock, stack_pin
from lockgen.verify import verify_file

STACKS = ("sft-cu130", "sft-cu128-xformers", "trl-vllm-cu130")
FAKE_SHA = "ab" * 32


@pytest.fixture(scope="module")
def stack():
    return load_stack()


def _installed(target, **changes) -> dict:
    """What a lock of the target installs on each machine: its stack pins, changed."""
    pins = dict(stack_pin(p) for p in target.stack)
    pins.update(changes)
    return {m: dict(pins) for m in target_machines(target)}


def _errors(report: Report) -> list[str]:
    return [f.message for f in report.findings if f.severity == ERROR]


# -- the targets --------------------------------------------------------------------------------


def test_the_stack_targets_are_listed_with_their_pins(matrix):
    assert {n for n, t in matrix.targets.items() if t.is_stack} == set(STACKS)
    out = io.StringIO()
    assert main(["targets"], out=out) == 0
    text = out.getvalue()
    for name in STACKS:
        t = matrix.target(name)
        assert f"\n{name}: torch {t.torch} " in text
        assert f"  LLM stack: {', '.join(t.stack)}\n" in text
        assert t.pip_source.kind == "pypi"
    # what the lock workflow reads to re-resolve every target, the stack ones among them
    out = io.StringIO()
    assert main(["targets", "--format", "json"], out=out) == 0
    listed = {t["name"]: t for t in json.loads(out.getvalue())}
    for name in STACKS:
        assert listed[name]["stack"] == list(matrix.target(name).stack)
        assert listed[name]["install"]["conda"]["status"] == NONE
    assert listed["cu130"]["stack"] == []
    assert "trl[vllm]==1.16.0" in matrix.target("trl-vllm-cu130").pip_requirements
    assert "xformers==0.0.34" in matrix.target("sft-cu128-xformers").stack
    assert not any(p.startswith("xformers") for p in matrix.target("sft-cu130").stack)


@pytest.mark.parametrize("name", STACKS)
def test_check_with_passes_for_every_python_and_platform_of_a_stack_target(matrix, stack, name):
    """The stack data says each target's pins work with its torch build: `check --with` finds
    that very build (PyPI's, the target's CUDA) on every platform and Python it covers."""
    t = matrix.target(name)
    withs = [With.parse(p, stack) for p in t.stack if stack_pin(p)[0] in stack.releases]
    assert len(withs) >= 5
    for platform in t.platforms:
        for py in t.pythons:
            req = Request(torch=t.torch, cuda=t.cuda, python=py, platform=platform)
            res = check_stack(matrix, stack, req, withs, suggest=False)
            assert res.ok, (platform, py.raw, [c.message for c in res.conflicts])
            assert res.torch.cuda == t.cuda and res.torch.pypi
            picked = {p.release.package: p.release.version for p in res.picks}
            for w in withs:
                assert picked[w.name] == w.version


def test_xformers_is_left_out_of_the_cuda13_stack_for_the_reason_the_facts_give(matrix, stack):
    t = matrix.target("sft-cu130")
    req = Request(torch=t.torch, cuda=t.cuda, python=t.python)
    res = check_stack(matrix, stack, req, [With.parse("xformers==0.0.35", stack)], suggest=False)
    assert not res.ok
    assert any("links libcudart.so.12" in c.message for c in res.conflicts)
    assert "links CUDA 12" in t.description


# -- the committed locks ------------------------------------------------------------------------


@pytest.mark.parametrize("name", STACKS)
def test_committed_stack_locks_verify(matrix, name):
    for path in (ENVS / f"{name}.requirements.txt", uv_paths(ENVS, name).lock):
        report = verify_file(path, matrix)
        assert report.ok, report.format()
        assert any(c.startswith("stack packages") for c in report.checked)
        text = path.read_text()
        for pin in matrix.target(name).stack:
            package, version = stack_pin(pin)
            assert re.search(rf"(^|\n)({package}=={version} |name = \"{package}\"\n"
                             rf"version = \"{version}\")", text), (path.name, pin)  # fmt: skip


def test_a_lock_with_a_cuda12_xformers_beside_cuda13_torch_is_refused(matrix, tmp_path):
    src = ENVS / "sft-cu130.requirements.txt"
    path = tmp_path / src.name
    path.write_text(src.read_text() + f"xformers==0.0.35 \\\n    --hash=sha256:{FAKE_SHA}\n")
    report = verify_file(path, matrix)
    assert not report.ok
    [msg] = [m for m in _errors(report) if m.startswith("xformers 0.0.35: the PyPI wheel")]
    assert "libcudart.so.12" in msg and "(CUDA 12)" in msg and "will not load" in msg
    assert "on linux-64 + Python 3.11, linux-64 + Python 3.12" in msg  # x86_64 only
    # on aarch64 PyPI has no xformers wheel: it would be compiled there
    assert any(
        m.startswith("xformers 0.0.35") and "linux-aarch64" in m and "compiled" in m
        for m in _errors(report)
    )


def test_the_same_lock_passes_without_the_tampered_line(matrix, tmp_path):
    """The refusal above comes from the xformers line, not from the copy."""
    src = ENVS / "sft-cu130.requirements.txt"
    path = tmp_path / src.name
    path.write_text(src.read_text())
    assert verify_file(path, matrix).ok


def test_a_uv_lock_that_installs_a_cuda12_xformers_beside_cuda13_torch_is_refused(matrix, tmp_path):
    name = "sft-cu130"
    src = uv_paths(ENVS, name)
    project = tmp_path / "uv" / name
    project.mkdir(parents=True)
    for f in (src.pyproject, src.python_version):
        (project / f.name).write_text(f.read_text())
    text = src.lock.read_text()
    peft = '[[package]]\nname = "peft"\nversion = "0.21.2"\n'
    head = text.index(peft) + len(peft)
    deps = text.index("dependencies = [\n", head) + len("dependencies = [\n")
    text = text[:deps] + '    { name = "xformers" },\n' + text[deps:]
    wheel = (
        "https://files.pythonhosted.org/packages/aa/bb/"
        "xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl"
    )
    text += (
        '\n[[package]]\nname = "xformers"\nversion = "0.0.35"\n'
        'source = { registry = "https://pypi.org/simple" }\n'
        f'wheels = [\n    {{ url = "{wheel}", hash = "sha256:{FAKE_SHA}", size = 1 }},\n]\n'
    )
    (project / "uv.lock").write_text(text)
    report = verify_file(project / "uv.lock", matrix, tmp_path)
    assert not report.ok
    assert any(
        m.startswith("xformers 0.0.35: the PyPI wheel") and "(CUDA 12)" in m
        for m in _errors(report)
    ), report.format()


def test_a_release_the_facts_do_not_hold_is_refused_unless_pure_python(matrix, stack):
    t = matrix.target("sft-cu130")
    report = Report("x", t.name)
    check_stack_lock(report, t, _installed(t, bitsandbytes="0.47.0"), stack)
    [msg] = [m for m in _errors(report) if m.startswith("bitsandbytes 0.47.0")]
    assert "hold no such release" in msg and "refresh-stack" in msg
    # the target pins 0.50.2, and the lock says otherwise
    assert any("pins bitsandbytes==0.50.2" in m for m in _errors(report))
    # transformers: every release the facts hold is pure Python, so an older one is no risk
    t2 = dataclasses.replace(t, stack=tuple(p for p in t.stack if "transformers" not in p))
    report = Report("x", t.name)
    check_stack_lock(report, t2, _installed(t2, transformers="5.17.0"), stack)
    assert report.ok, report.format()


def test_a_bundled_library_set_without_torchs_cuda_major_is_refused(matrix, stack):
    """bitsandbytes picks its bundled library by torch.version.cuda: a release whose wheel
    bundles no CUDA 13 library cannot load beside the CUDA 13 torch."""
    t = matrix.target("sft-cu130")
    cuda12 = {
        "bitsandbytes": tuple(
            dataclasses.replace(
                r,
                artifacts=tuple(
                    dataclasses.replace(a, cuda=(11, 12)) if a.cuda else a for a in r.artifacts
                ),
            )
            for r in stack.releases["bitsandbytes"]
        )
    }
    facts = dataclasses.replace(stack, releases={**stack.releases, **cuda12})
    report = Report("x", t.name)
    check_stack_lock(report, t, _installed(t), facts)
    msgs = [m for m in _errors(report) if m.startswith("bitsandbytes 0.50.2")]
    assert len(msgs) == 2  # the x86_64 wheel and the aarch64 one
    assert all("(CUDA 11/12)" in m and "is a CUDA 13 build" in m for m in msgs)
    report = Report("x", t.name)
    check_stack_lock(report, t, _installed(t), stack)
    assert report.ok, report.format()


def test_a_release_built_for_another_torch_is_refused(matrix, stack):
    """vllm pins torch exactly: vllm 0.34.0 (torch 2.14.0) in the torch 2.13 stack's lock."""
    t = matrix.target("trl-vllm-cu130")
    report = Report("x", t.name)
    check_stack_lock(report, t, _installed(t, vllm="0.34.0"), stack)
    assert any(m.startswith("vllm 0.34.0 requires torch==2.14.0") for m in _errors(report))


def test_a_stack_lock_that_fails_is_not_written(matrix, tmp_path):
    """`lockgen lock --flavor pip` refuses to write a stack lock whose resolution pairs a
    CUDA 12 binary with the CUDA 13 torch (the resolver is a stand-in that adds xformers)."""
    from lockgen.formats.pip import Wheel

    text = (ENVS / "sft-cu130.requirements.txt").read_text()
    pins = re.findall(
        r"^([a-z0-9-]+)==(\S+)(?: ; ([^\\]+))? \\\n\s+--hash=sha256:(\w+)", text, re.M
    )

    class Resolver:
        def resolve(self, requirements, index_url, python, platform, glibc="2.28"):
            wheels = [Wheel(n, v, h, "") for n, v, marker, h in pins if not marker]
            return [*wheels, Wheel("xformers", "0.0.35", FAKE_SHA, "")]

    out, err = io.StringIO(), io.StringIO()
    rc = main(
        ["lock", "sft-cu130", "--flavor", "pip", "--envs", str(tmp_path)],
        out=out,
        err=err,
        pip_resolver=Resolver(),
    )
    assert rc == 2 and "xformers 0.0.35: the PyPI wheel" in err.getvalue(), err.getvalue()
    assert not (tmp_path / "sft-cu130.requirements.txt").exists()


# -- no conda env, no Nix shell -----------------------------------------------------------------


@pytest.mark.parametrize("name", STACKS)
def test_conda_and_nix_flavours_of_a_stack_target_are_refused_with_the_reason(matrix, name):
    r = {x.flavor: x for x in routes(matrix, matrix.target(name), ENVS, {}, "")}
    assert r["conda"].status == NONE and "no conda channel's builds" in r["conda"].note
    assert r["nix"].status == NONE and "nixpkgs' builds" in r["nix"].note
    assert r["pip"].command == f"pip install --require-hashes -r envs/{name}.requirements.txt"
    err = io.StringIO()
    rc = main(["render", name, "--flavor", "conda"], out=io.StringIO(), err=err)
    assert rc == 2 and "LLM stack target: the stack facts" in err.getvalue(), err.getvalue()


# -- the targets file ---------------------------------------------------------------------------

TARGETS = (FACTS / "targets.toml").read_text()


def _load(tmp_path, targets: str):
    for f in ("matrix.toml", "gpus.toml"):
        (tmp_path / f).write_text((FACTS / f).read_text())
    (tmp_path / "targets.toml").write_text(targets)
    return load_matrix(tmp_path / "matrix.toml")


@pytest.mark.parametrize(
    "old,new,message",
    [
        ('"peft==0.21.2",\n', '"peft>=0.21",\n', "is not NAME==VERSION"),
        ('"peft==0.21.2",\n', '"torch==2.14.1",\n', "torch and torchvision are the target's"),
        ('cuda = "13.0"\nplatforms = ["linux-64", "linux-aarch64"]\nstack',
         'cuda = "13.2"\nplatforms = ["linux-64", "linux-aarch64"]\nstack',
         "a stack target takes torch from PyPI"),
        ('glibc = "2.31"', 'glibc = "2.31.1"', "is not a glibc version"),
    ],
)  # fmt: skip
def test_a_broken_stack_target_is_refused_at_load(tmp_path, old, new, message):
    assert old in TARGETS
    with pytest.raises(MatrixError, match=re.escape(message)):
        _load(tmp_path, TARGETS.replace(old, new, 1))


def test_a_stack_target_may_not_name_a_conda_channel(tmp_path):
    broken = TARGETS.replace(
        "[target.sft-cu128-xformers]\n",
        '[target.sft-cu128-xformers]\nconda_channel = "conda-forge"\n',
    )
    with pytest.raises(MatrixError):
        _load(tmp_path, broken)


# -- what verify calls cuDNN and the CUDA runtime ----------------------------------------------


def test_cudnn_frontend_is_not_cudnn():
    assert is_cudnn_wheel("nvidia-cudnn-cu13") and is_cudnn_wheel("nvidia-cudnn-cu12")
    assert not is_cudnn_wheel("nvidia-cudnn-frontend")
    assert is_cuda_runtime_wheel("nvidia-cuda-runtime")
    assert is_cuda_runtime_wheel("nvidia-cuda-runtime-cu12")
    assert not is_cuda_runtime_wheel("nvidia-cuda-runtime-dev")


def test_prereleases_are_accepted_only_for_the_packages_the_target_names(matrix, tmp_path):
    vllm = (ENVS / "trl-vllm-cu130.requirements.txt").read_text()
    assert "opentelemetry-semantic-conventions==0.66b2" in vllm
    src = ENVS / "sft-cu130.requirements.txt"
    path = tmp_path / src.name
    path.write_text(
        src.read_text()
        + f"opentelemetry-semantic-conventions==0.66b2 \\\n    --hash=sha256:{FAKE_SHA}\n"
    )
    report = verify_file(path, matrix)
    assert any("0.66b2 is a pre- or development release" in m for m in _errors(report))


def test_a_package_named_for_another_cuda_major_is_noted_not_judged(matrix, stack):
    """nvidia-cutlass-dsl-libs-cu12 comes with vllm's deps beside the CUDA 13 torch: the facts
    know nothing of it, so verify says so instead of passing over it in silence."""
    report = verify_file(ENVS / "trl-vllm-cu130.requirements.txt", matrix)
    notes = [f.message for f in report.findings if f.severity == "note"]
    assert any(n.startswith("nvidia-cutlass-dsl-libs-cu12 is named for CUDA 12") for n in notes)
    assert not any("cutlass-dsl-libs-cu13" in n for n in notes)  # torch's own major
    t = matrix.target("sft-cu130")
    report = Report("x", t.name)
    check_stack_lock(report, t, _installed(t, **{"cupy-cuda12x": "13.6.0"}), stack)
    assert report.ok and any(
        "cupy-cuda12x is named for CUDA 12" in f.message for f in report.findings
    )


def test_a_pre_release_of_a_stack_package_is_reported_not_a_crash(matrix, tmp_path):
    src = ENVS / "sft-cu130.requirements.txt"
    path = tmp_path / src.name
    path.write_text(src.read_text().replace("bitsandbytes==0.50.2 ", "bitsandbytes==0.51.0rc1 "))
    report = verify_file(path, matrix)
    errors = _errors(report)
    assert any(m.startswith("bitsandbytes 0.51.0rc1: the stack facts hold no such") for m in errors)
    assert any(
        "pins bitsandbytes==0.50.2" in m and "locks bitsandbytes 0.51.0rc1" in m for m in errors
    )
