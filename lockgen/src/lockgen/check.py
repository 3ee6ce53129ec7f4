"""Compatibility rules: which concrete PyTorch builds satisfy everything a user asked for?

Pure functions of data: no I/O.

Every constraint the user gives (torch, torchvision, CUDA or the CPU build, cuDNN, Python,
platform, NVIDIA driver, GPU) is one small :class:`Rule`. Each rule is judged against every
concrete build of the matrix (a :class:`Candidate`: one release and one of its CUDA builds, or
its CPU build); the answer is "compatible" only when at least one candidate passes every rule,
and it names those builds (:class:`Match`, newest first). When none does, each constraint that
cannot be met, alone or together with the ones before it (platform, torch, torchvision, CUDA,
Python, cuDNN, GPU, driver: the order in which they are blamed), gets an error saying why, and
the nearest builds that meet the user's hardware (platform, GPU, driver) are suggested, ranked
by how little they change: torch release, then Python, then CUDA, then cuDNN.

Public API
----------
``Request.from_strings(matrix, torch=..., cuda=..., cudnn=..., python=..., torchvision=...,
driver=..., gpu=..., platform=...)``
    Parses user text (``2.1.2``, ``cu121`` / ``12.1`` / ``cpu``, ``8.9.2``, ``535.104.05`` or
    a bare branch ``535``, ``sm_86`` / ``8.6`` / ``NVIDIA GeForce RTX 3090``; several GPUs one
    per line or comma-separated); a malformed value raises ``LockgenError``. A torch or
    torchvision version with a local label (``2.1.2+cu121``) gives the build, and one that
    contradicts ``cuda`` (or the other label) raises ``LockgenError``. A pre-release or a
    patch the matrix does not list is judged an "unknown release" by ``check``.
``check(matrix, request) -> CheckResult``
    ``conflicts`` (each a :class:`lockgen.findings.Finding`: ``severity`` error / warning /
    note, ``code`` (the constraint: ``gpu``, ``driver``, ...), ``message``), ``ok``,
    ``verdict``, ``matches`` (the builds that fit), ``unverified`` (the unconfirmed facts the
    verdict rests on) and, when not ok, ``suggestions``.
``format_check(result) -> str``, ``result.to_json() -> dict``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from lockgen.errors import LockgenError
from lockgen.findings import ERROR, NOTE, WARNING, Finding
from lockgen.matrix import MVC, PLATFORMS, TOO_OLD, Build, DriverFit, Matrix, Release
from lockgen.versions import NONE, SOME, Capability, Driver, Version, parse_cuda, runs_on

# -- the request ------------------------------------------------------------------------------


def _local_build(name: str, v: Version | None) -> tuple[bool, Version | None] | None:
    """``(cpu, cuda)`` that a ``+cpu`` / ``+cu121`` label names; None without one."""
    if v is None or not v.local:
        return None
    if v.local == "cpu":
        return True, None
    if re.fullmatch(r"cu\d{2,3}", v.local, re.ASCII):
        return False, parse_cuda(v.local)
    raise LockgenError(
        f"{name} {v}: the matrix knows the CUDA and CPU builds (+cu121, +cpu) only; "
        f"+{v.local} cannot be checked"
    )


def _build_name(cpu: bool, cuda: Version | None) -> str:
    return "CPU build" if cpu or cuda is None else f"CUDA {cuda} build"


def _parse_gpus(
    matrix: Matrix, text: str
) -> tuple[tuple[Capability, ...], tuple[str, ...], tuple[str, ...]]:
    """Every GPU of ``text``: one per line (nvidia-smi's output) or comma-separated."""
    names = [n.strip() for n in re.split(r"[\n,;]", text) if n.strip()]
    if not names:
        raise LockgenError(f"no GPU in --gpu {text!r}")
    seen: dict[tuple[Capability, str], None] = {}
    unverified: list[str] = []
    for name in names:
        cap, label, entry = matrix.resolve_gpu(name)
        seen[(cap, label)] = None
        if entry is not None and not entry.verified:
            unverified.append(f"compute capability of {entry.name}")
    return (
        tuple(c for c, _ in seen),
        tuple(label for _, label in seen),
        tuple(dict.fromkeys(unverified)),
    )


@dataclass(frozen=True)
class Request:
    """What to check. ``cpu=True`` asks for the CPU build (``cuda`` is then None)."""

    torch: Version | None = None
    cuda: Version | None = None
    cpu: bool = False
    cudnn: Version | None = None
    python: Version | None = None
    torchvision: Version | None = None
    driver: Driver | None = None
    gpus: tuple[Capability, ...] = ()
    gpu_labels: tuple[str, ...] = ()
    gpu_unverified: tuple[str, ...] = ()
    platform: str = "linux-64"

    @classmethod
    def from_strings(
        cls,
        matrix: Matrix,
        torch: str | None = None,
        cuda: str | None = None,
        cudnn: str | None = None,
        python: str | None = None,
        torchvision: str | None = None,
        driver: str | None = None,
        gpu: str | None = None,
        platform: str = "linux-64",
    ) -> Request:
        if platform not in PLATFORMS:
            raise LockgenError(f"unknown platform {platform!r} (known: {', '.join(PLATFORMS)})")
        tv = Version.parse(torch, "torch version") if torch else None
        tvv = Version.parse(torchvision, "torchvision version") if torchvision else None
        cuda_v = parse_cuda(cuda) if cuda else None
        cpu = cuda is not None and cuda_v is None
        given = f"--cuda {cuda}" if cuda is not None else None
        for name, v in (("torch", tv), ("torchvision", tvv)):
            tagged = _local_build(name, v)
            if tagged is None:
                continue
            # 2.1.2+cu121 says which build it is; it must agree with what else was said
            if given is not None and (tagged[0] != cpu or tagged[1] != cuda_v):
                raise LockgenError(
                    f"{name} {v} is the {_build_name(*tagged)}, but {given} asks for the "
                    f"{_build_name(cpu, cuda_v)}: give one of them"
                )
            cpu, cuda_v, given = *tagged, f"{name} {v}"
        gpus, labels, unverified = _parse_gpus(matrix, gpu) if gpu else ((), (), ())
        if python and re.fullmatch(r"\s*\d+\.\d+(\.\d+)?t\s*", python, re.ASCII):
            raise LockgenError(
                f"Python {python.strip()} is a free-threaded build: the matrix tracks the "
                f"wheels of the default (GIL) build only; give {python.strip()[:-1]} to check those"
            )
        return cls(
            torch=tv,
            cuda=cuda_v,
            cpu=cpu,
            cudnn=Version.parse(cudnn, "cuDNN version") if cudnn else None,
            python=Version.parse(python, "Python version") if python else None,
            torchvision=tvv,
            driver=Driver.parse(driver) if driver else None,
            gpus=gpus,
            gpu_labels=labels,
            gpu_unverified=unverified,
            platform=platform,
        )

    @property
    def gpu(self) -> Capability | None:
        return self.gpus[0] if self.gpus else None

    @property
    def gpu_label(self) -> str:
        return " + ".join(self.labels)

    @cached_property
    def labels(self) -> tuple[str, ...]:
        return tuple(
            self.gpu_labels[i] if i < len(self.gpu_labels) else g.sm
            for i, g in enumerate(self.gpus)
        )

    @property
    def os_name(self) -> str:
        return "windows" if self.platform.startswith("win") else "linux"

    def describe(self) -> str:
        parts = []
        if self.torch:
            parts.append(f"torch {self.torch}")
        if self.torchvision:
            parts.append(f"torchvision {self.torchvision}")
        if self.cpu:
            parts.append("CPU build")
        elif self.cuda:
            parts.append(f"CUDA {self.cuda}")
        if self.cudnn:
            parts.append(f"cuDNN {self.cudnn}")
        if self.python:
            parts.append(f"Python {self.python}")
        if self.driver:
            parts.append(f"driver {self.driver}")
        if self.gpus:
            parts.append(f"GPU {self.gpu_label}")
        if self.platform != "linux-64":
            parts.append(self.platform)
        return " + ".join(parts) or "(nothing)"

    @property
    def not_checked(self) -> tuple[str, ...]:
        """What the request leaves open: the verdict holds for some value of each."""
        given = {
            "torch": self.torch,
            "CUDA": self.cuda or self.cpu,
            "Python": self.python,
            "driver": self.driver,
            "GPU": self.gpus,
        }
        return tuple(name for name, value in given.items() if not value)


# -- candidates and how each rule judges one --------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A concrete build: one release and one of its CUDA builds (``build``) or its CPU build
    (``build`` is None)."""

    release: Release
    build: Build | None

    @property
    def cuda(self) -> Version | None:
        return self.build.cuda if self.build else None

    @cached_property
    def label(self) -> str:
        kind = f"CUDA {self.build.cuda}" if self.build else "CPU"
        return f"torch {self.release.torch} + {kind}"


@dataclass(frozen=True)
class Fit:
    """One rule's judgement of one candidate: ``ok`` or not, ``why`` not, and when ok the
    caveat (a warning), a note, and the unconfirmed facts it rests on."""

    ok: bool
    why: str = ""
    caveat: str = ""
    note: str = ""
    unverified: tuple[str, ...] = ()
    driver: DriverFit | None = None


@dataclass(frozen=True)
class Rule:
    code: str
    applies: Callable[[Request], bool]
    fit: Callable[[Matrix, Request, Candidate], Fit]
    alone: Callable[[Matrix, Request], str]


def _span(versions: Iterable[Version]) -> str:
    vs = sorted(set(versions))
    if not vs:
        return "none"
    return vs[0].raw if len(vs) == 1 else f"{vs[0].raw}-{vs[-1].raw}"


def _names(versions: Iterable[Version]) -> str:
    return ", ".join(v.raw for v in sorted(set(versions)))


def _platform_fit(m: Matrix, req: Request, c: Candidate) -> Fit:
    p = req.platform
    if p not in c.release.platforms:
        return Fit(False, f"torch {c.release.torch} has no wheels for {p}")
    if c.build is None or p == "linux-64":
        return Fit(True)
    if p.startswith("osx"):
        return Fit(False, f"there are no CUDA builds of torch for {p}: macOS has no CUDA")
    if m.arch_list(c.release.torch, c.build.cuda, p) is None:
        return Fit(False, f"the matrix knows no {c.label} build for {p}")
    return Fit(True)


def _platform_alone(m: Matrix, req: Request) -> str:
    return f"the matrix knows no build for {req.platform}"


def _not_final(what: str, v: Version) -> str:
    return (
        f"unknown release: {what} {v} is a pre-, post- or development release "
        f"({v.suffix}); the matrix knows final releases only"
    )


def _torch_fit(m: Matrix, req: Request, c: Candidate) -> Fit:
    assert req.torch is not None
    if c.release.torch != req.torch.minor:
        return Fit(False, f"{c.label} is not torch {req.torch}")
    if req.torch.suffix:
        return Fit(False, _not_final("torch", req.torch))
    unknown = c.release.unknown_patch(req.torch)
    if unknown:
        return Fit(False, f"unknown release: {unknown}")
    return Fit(True)


def _torch_alone(m: Matrix, req: Request) -> str:
    assert req.torch is not None
    release = next((r for r in m.releases if r.torch == req.torch.minor), None)
    if release is not None and req.torch.suffix:
        return _not_final("torch", req.torch)
    if release is not None and release.unknown_patch(req.torch):
        return f"unknown release: {release.unknown_patch(req.torch)}"
    first, last = m.releases[0].torch, m.releases[-1].torch
    if req.torch.minor < first:
        where = f"older than the oldest release the matrix covers ({first})"
    elif req.torch.minor > last:
        where = f"newer than the newest release the matrix covers ({last})"
    else:
        where = "not a PyTorch release"
    return f"torch {req.torch} is {where}"


def _torchvision_fit(m: Matrix, req: Request, c: Candidate) -> Fit:
    assert req.torchvision is not None
    r = c.release
    if r.torchvision is None:
        return Fit(False, f"no torchvision is known to pair with torch {r.torch} (unverified)")
    if req.torchvision.minor != r.torchvision:
        return Fit(False, f"torch {r.torch} pairs with torchvision {r.torchvision}")
    if req.torchvision.suffix:
        return Fit(False, _not_final("torchvision", req.torchvision))
    return Fit(True)


def _torchvision_alone(m: Matrix, req: Request) -> str:
    assert req.torchvision is not None
    if req.torchvision.suffix and any(r.torchvision == req.torchvision.minor for r in m.releases):
        return _not_final("torchvision", req.torchvision)
    pairs = _span(r.torchvision for r in m.releases if r.torchvision)
    return f"no release of the matrix pairs with torchvision {req.torchvision} (known: {pairs})"


def _cuda_fit(m: Matrix, req: Request, c: Candidate) -> Fit:
    if req.cpu:
        return Fit(c.build is None, f"{c.label} is not the CPU build")
    b = c.build
    if b is None or b.cuda != req.cuda:
        return Fit(False, f"{c.label} is not a CUDA {req.cuda} build")
    if not b.verified:
        return Fit(
            True,
            caveat=f"the CUDA {b.cuda} build of torch {c.release.torch} is unverified "
            f"({b.note or 'lead only'})",
            unverified=(f"the {c.label} build ({b.note or 'lead only'})",),
        )
    if b.status == "experimental" and b.cuda != c.release.pypi_default_cuda:
        return Fit(
            True,
            note=f"RELEASE.md labels the CUDA {b.cuda} build of torch {c.release.torch} "
            "experimental",
        )
    return Fit(True)


def _cuda_alone(m: Matrix, req: Request) -> str:
    first, last = m.releases[0].torch, m.releases[-1].torch
    return (
        f"no PyTorch release from {first} to {last} ships a CUDA {req.cuda} build "
        f"(builds exist for CUDA {_names(m.cuda_versions)})"
    )


def _python_fit(m: Matrix, req: Request, c: Candidate) -> Fit:
    assert req.python is not None
    r, py, p = c.release, req.python.minor, req.platform
    if req.python.suffix:
        return Fit(False, _not_final("Python", req.python))
    have = r.python_for(p)
    if py not in have:
        return Fit(False, f"torch {r.torch} has no wheels for Python {py} (it has {_span(have)})")
    if req.torchvision is not None and r.torchvision is not None:
        tv = r.torchvision_python_for(p)
        if py not in tv:
            return Fit(
                False,
                f"torchvision {r.torchvision} (for torch {r.torch}) has no wheels for Python "
                f"{py} (it has {_span(tv)})",
            )
    patch = ""
    if req.python.raw.count(".") >= 2:
        patch = (
            f"the matrix knows Python minors only: Python {req.python} is judged as Python "
            f"{py}, whether or not that patch release exists"
        )
    if py in r.python_experimental:
        return Fit(True, caveat=f"Python {py} is experimental for torch {r.torch}", note=patch)
    return Fit(True, note=patch)


def _python_alone(m: Matrix, req: Request) -> str:
    assert req.python is not None
    if req.python.suffix:
        return _not_final("Python", req.python)
    return f"no release of the matrix has wheels for Python {req.python} on {req.platform}"


def _cudnn_fit(m: Matrix, req: Request, c: Candidate) -> Fit:
    assert req.cudnn is not None
    b = c.build
    if b is None:
        if req.cpu:
            return Fit(True, caveat="a CPU build does not use cuDNN")
        return Fit(False, "the CPU build has no cuDNN")
    if b.cudnn is None:
        return Fit(False, f"the cuDNN of {c.label} is unknown (unverified)")
    if not b.cudnn_matches(req.cudnn):
        return Fit(False, f"{c.label} ships cuDNN {b.cudnn}, not {req.cudnn}")
    if b.cudnn_release_md and b.cudnn_release_md.matches_prefix(req.cudnn):
        return Fit(
            True, note=f"cuDNN {req.cudnn} is what RELEASE.md says; the wheels ship {b.cudnn}"
        )
    return Fit(True)


def _cudnn_alone(m: Matrix, req: Request) -> str:
    return f"no build in the matrix ships cuDNN {req.cudnn}"


def _gpu_fit(m: Matrix, req: Request, c: Candidate) -> Fit:
    b = c.build
    if b is None:
        if req.cpu:
            return Fit(True, caveat="a CPU build does not use the GPU")
        return Fit(False, "the CPU build does not use the GPU")
    archs = m.arch_list(c.release.torch, b.cuda, req.platform)
    if archs is None:
        return Fit(False, f"the matrix has no arch list for {c.label} on {req.platform}")
    caveats = []
    for gpu, label in zip(req.gpus, req.labels, strict=True):
        if not any(runs_on(a, gpu, b.cuda) for a in archs.archs):
            return Fit(
                False,
                f"GPU {label} is not in the arch list of {c.label} ({archs.torch_cuda_arch_list})"
                ": torch will refuse to run on it",
            )
        if not any(runs_on(a, gpu, b.cuda) for a in archs.archs if not a.ptx) and not any(
            runs_on(replace(a, ptx=False), gpu, b.cuda) for a in archs.archs if a.ptx
        ):
            caveats.append(
                f"GPU {label} runs {c.label} only through PTX JIT "
                f"({archs.torch_cuda_arch_list}): slow first start, needs a driver >= the "
                "toolkit driver"
            )
    unverified = list(req.gpu_unverified)
    if not archs.verified:
        unverified.append(f"arch list of {c.label} ({archs.note or 'lead only'})")
    return Fit(True, caveat="; ".join(caveats), unverified=tuple(unverified))


def _gpu_alone(m: Matrix, req: Request) -> str:
    if req.platform.startswith("osx"):
        return (
            f"macOS has no CUDA: no build of torch for {req.platform} runs on GPU {req.gpu_label}"
        )
    oldest = min((a for x in m.arch_lists for a in x.archs), key=lambda a: a.canonical)
    return (
        f"no build of the matrix runs on GPU {req.gpu_label}: the oldest architecture any "
        f"build has is {oldest.sm}; only a CPU build (--cuda cpu) can be used"
    )


def _full_cuda(m: Matrix, driver: Driver) -> tuple[Version | None, str]:
    """The newest CUDA toolkit the driver (or some driver of the branch) runs fully, and
    ``" (from X on)"`` when only the branch's later drivers do."""
    reached = [t for t in m.cuda_toolkits if driver.reaches(t.linux) != NONE]
    if not reached:
        return None, ""
    best = reached[-1]
    return best.version, f" (from {best.linux} on)" if driver.reaches(best.linux) == SOME else ""


def _floor_why(m: Matrix, req: Request, fit: DriverFit) -> str:
    assert req.driver is not None
    floor, cuda = fit.floor, fit.floor.cuda
    full = floor.full or "unknown"
    best, since = _full_cuda(m, req.driver)
    can = f"; this driver fully supports CUDA up to {best}{since}" if best else ""
    return (
        f"driver {req.driver} is below {floor.minimum}, the minimum for any CUDA "
        f"{cuda.major}.x build (minor version compatibility floor); CUDA {cuda} needs driver "
        f">= {full} (>= {floor.minimum} through minor version compatibility){can}"
    )


@dataclass(frozen=True)
class GpuDriverFit:
    """How a driver meets the GPUs' own driver windows (shared with the doctor)."""

    why: str = ""  # the driver cannot drive a GPU
    since: Version | None = None  # a branch drives them from this version on
    unverified: tuple[str, ...] = ()


def gpu_driver_fit(m: Matrix, req: Request, floor: Version | None = None) -> GpuDriverFit:
    """The GPUs' own driver window: a driver older than the first toolkit for a GPU's
    architecture does not know the GPU; one newer than its last branch has dropped it. An
    unconfirmed window counts only where it decides more than the build's ``floor`` does."""
    assert req.driver is not None
    since: Version | None = None
    unverified: list[str] = []
    for gpu, label in zip(req.gpus, req.labels, strict=True):
        window = m.gpu_driver(gpu, req.os_name)
        if window is None:
            continue
        decides = (window.minimum is not None and (floor is None or window.minimum > floor)) or (
            window.last_branch is not None and req.driver.version.major >= window.last_branch.major
        )
        if decides and not window.verified:
            unverified.append(f"driver range of {window.architecture} GPUs")
        if window.minimum is not None:
            reach = req.driver.reaches(window.minimum)
            if reach == NONE:
                why = (
                    f"driver {req.driver} predates GPU {label}: {window.architecture} GPUs "
                    f"need >= {window.minimum}, the driver of CUDA {window.first_cuda} (the "
                    f"first toolkit for {gpu.sm})"
                )
                return GpuDriverFit(why, unverified=tuple(unverified))
            if reach == SOME:
                since = max(since or window.minimum, window.minimum)
        if window.last_branch is not None and not req.driver.within(window.last_branch):
            why = (
                f"driver {req.driver} no longer supports GPU {label}: the last driver branch "
                f"for {window.architecture} GPUs is R{window.last_branch.major}"
            )
            return GpuDriverFit(why, unverified=tuple(unverified))
    return GpuDriverFit(since=since, unverified=tuple(unverified))


def _driver_fit(m: Matrix, req: Request, c: Candidate) -> Fit:
    assert req.driver is not None
    if c.build is None:
        return Fit(True)
    floor = m.driver_floor(c.build.cuda, req.os_name)
    if floor is None:
        # a missing fact is not a proof: the verdict holds unless the floor rules it out
        gpu = gpu_driver_fit(m, req) if req.gpus else GpuDriverFit()
        if gpu.why:
            return Fit(False, gpu.why, unverified=gpu.unverified)
        missing = f"{req.os_name} driver floor of CUDA {c.build.cuda} (the matrix has none)"
        return Fit(True, unverified=(*gpu.unverified, missing))
    gpu = gpu_driver_fit(m, req, floor.minimum) if req.gpus else GpuDriverFit()
    if gpu.why:
        return Fit(False, gpu.why, unverified=gpu.unverified)
    fit = floor.fit(req.driver)
    if not fit.runs:
        return Fit(False, _floor_why(m, req, fit))
    unverified = list(gpu.unverified)
    if not floor.verified:
        unverified.append(f"driver floor of CUDA {c.build.cuda}")
    if gpu.since is not None and (fit.since is None or gpu.since > fit.since):
        fit = replace(fit, since=gpu.since, below=TOO_OLD)
    caveat = note = ""
    if fit.status == MVC:
        caveat = (
            f"driver {req.driver} is older than CUDA {c.build.cuda}'s toolkit driver "
            f"{floor.full}: it works through minor version compatibility, but PTX JIT and "
            "the newest CUDA features may fail"
        )
    if fit.since is not None:
        note = f"holds for the drivers of {req.driver} from {fit.since} on"
    return Fit(True, caveat=caveat, note=note, unverified=tuple(unverified), driver=fit)


RULES: tuple[Rule, ...] = (
    Rule("platform", lambda r: True, _platform_fit, _platform_alone),
    Rule("torch", lambda r: r.torch is not None, _torch_fit, _torch_alone),
    Rule("torchvision", lambda r: r.torchvision is not None, _torchvision_fit, _torchvision_alone),
    Rule("cuda", lambda r: r.cpu or r.cuda is not None, _cuda_fit, _cuda_alone),
    Rule("python", lambda r: r.python is not None, _python_fit, _python_alone),
    Rule("cudnn", lambda r: r.cudnn is not None, _cudnn_fit, _cudnn_alone),
    Rule("gpu", lambda r: bool(r.gpus), _gpu_fit, _gpu_alone),
    Rule("driver", lambda r: r.driver is not None, _driver_fit, lambda m, r: ""),
)
HARD = ("platform", "gpu", "driver")  # the machine: suggestions keep these


def candidates(m: Matrix) -> list[Candidate]:
    """Every concrete build of the matrix, newest release first, newest CUDA first, then the
    release's CPU build."""
    out = []
    for release in reversed(m.releases):
        for build in sorted(release.builds, key=lambda b: b.cuda, reverse=True):
            out.append(Candidate(release, build))
        out.append(Candidate(release, None))
    return out


# -- judging every candidate once -------------------------------------------------------------


class _Table:
    """Every rule's fit for every candidate of one request, each computed once."""

    def __init__(self, m: Matrix, req: Request):
        self.m, self.req = m, req
        self.cands = candidates(m)
        self._fits: dict[str, list[Fit]] = {}

    def fits(self, rule: Rule) -> list[Fit]:
        if rule.code not in self._fits:
            self._fits[rule.code] = [rule.fit(self.m, self.req, c) for c in self.cands]
        return self._fits[rule.code]

    def passing(self, rules: Iterable[Rule], among: Iterable[int] | None = None) -> list[int]:
        rules = list(rules)
        idx = range(len(self.cands)) if among is None else among
        return [i for i in idx if all(self.fits(r)[i].ok for r in rules)]


def _rule(code: str) -> Rule:
    return next(r for r in RULES if r.code == code)


# -- explaining a failure ---------------------------------------------------------------------


def _explain(t: _Table, rule: Rule, pool: Sequence[int]) -> str:
    """Why ``rule`` fails every candidate that the constraints before it left (``pool``)."""
    m, req = t.m, t.req
    fits = [(t.cands[i], t.fits(rule)[i]) for i in pool]
    releases = sorted({c.release.torch for c, _ in fits})
    if rule.code == "cuda" and not req.cpu:
        shipping = [r.torch for r in m.releases if r.build(req.cuda)]
        where = f"; CUDA {req.cuda} builds exist for torch {_span(shipping)}" if shipping else ""
        on_platform = [t for t in shipping if m.arch_list(t, req.cuda, req.platform) is not None]
        if shipping and req.platform != "linux-64" and not on_platform:
            where = (
                f"; the matrix knows CUDA {req.cuda} builds of torch {_span(shipping)} for "
                f"linux-64 only (no {req.platform} arch list for them)"
            )
        if len(releases) == 1:
            r = m.release(releases[0])
            return (
                f"torch {r.torch} has no CUDA {req.cuda} build (its builds: "
                f"{_names(r.cuda_versions)}){where}"
            )
        on = f" for {req.platform}" if req.platform != "linux-64" else ""
        return (
            f"no build of torch {_span(releases)}{on} that fits the rest is CUDA {req.cuda}{where}"
        )
    if rule.code == "torchvision" and len(releases) == 1 and req.torchvision is not None:
        pair = next((r.torch for r in m.releases if r.torchvision == req.torchvision.minor), None)
        other = f"; torchvision {req.torchvision} pairs with torch {pair}" if pair else ""
        return f"{fits[0][1].why}, not {req.torchvision}{other}"
    if rule.code == "torch":
        return (
            f"torch {req.torch} has no build that fits the other constraints (torch "
            f"{_span(releases)} do)"
        )
    if rule.code == "gpu":
        return _explain_gpu(t, fits)
    whys = list(dict.fromkeys(f.why for _, f in fits))
    return whys[0] + (f" (and {len(whys) - 1} more reasons)" if len(whys) > 1 else "")


def _explain_gpu(t: _Table, fits: Sequence[tuple[Candidate, Fit]]) -> str:
    cuda_fits = [(c, f) for c, f in fits if c.build is not None]
    if not cuda_fits:
        return "the CPU build does not use the GPU; no CUDA build fits the other constraints"
    cpu = next((c for c, _ in fits if c.build is None), None)
    only_cpu = f"; only the CPU build ({cpu.label}) fits the rest" if cpu else ""
    if len(cuda_fits) == 1:
        return cuda_fits[0][1].why + only_cpu
    names = ", ".join(c.label for c, _ in cuda_fits[:4])
    more = f" and {len(cuda_fits) - 4} more" if len(cuda_fits) > 4 else ""
    return (
        f"GPU {t.req.gpu_label} runs none of the builds that fit the rest ({names}{more}); "
        f"builds that run on it: {_runs_where(t)}{only_cpu}"
    )


def _runs_where(t: _Table) -> str:
    """The builds the GPU rule alone accepts, grouped by CUDA: ``CUDA 12.8 (torch 2.7-2.11)``."""
    by_cuda: dict[Version, list[Version]] = {}
    for i in t.passing([_rule("platform"), _rule("gpu")]):
        c = t.cands[i]
        if c.build is not None:
            by_cuda.setdefault(c.build.cuda, []).append(c.release.torch)
    if not by_cuda:
        return "none"
    return ", ".join(f"CUDA {cuda} (torch {_span(ts)})" for cuda, ts in sorted(by_cuda.items()))


def _cudnn_by_value(m: Matrix, req: Request) -> str:
    """The cuDNN asked for never ships with the CUDA version or release asked for, even when
    those match no build at all."""
    assert req.cudnn is not None
    with_it = [
        (r, b) for r in m.releases for b in r.builds if b.cudnn and b.cudnn_matches(req.cudnn)
    ]
    if not with_it:
        return ""
    cudas = sorted({b.cuda for _, b in with_it})
    torches = [r.torch for r, _ in with_it]
    bad_cuda = req.cuda is not None and req.cuda not in cudas
    bad_torch = req.torch is not None and req.torch.minor not in torches
    if not (bad_cuda or bad_torch):
        return ""
    never = f", never with CUDA {req.cuda}" if bad_cuda else ""
    return (
        f"cuDNN {req.cudnn} ships only with CUDA {_names(cudas)} builds of torch "
        f"{_span(torches)}{never}"
    )


# -- the result -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """A build that satisfies every constraint, with what it rests on."""

    candidate: Candidate
    python: tuple[Version, ...]
    fits: tuple[tuple[str, Fit], ...]
    target: str | None = None

    @property
    def driver(self) -> DriverFit | None:
        return next((f.driver for _, f in self.fits if f.driver is not None), None)

    @property
    def unverified(self) -> tuple[str, ...]:
        b = self.candidate.build
        own = (
            (f"the {self.candidate.label} build ({b.note or 'lead only'})",)
            if b and not b.verified
            else ()
        )
        return tuple(dict.fromkeys([*own, *(u for _, f in self.fits for u in f.unverified)]))

    def caveats(self) -> tuple[Finding, ...]:
        return tuple(Finding(WARNING, code, f.caveat) for code, f in self.fits if f.caveat)

    def notes(self) -> tuple[Finding, ...]:
        return tuple(Finding(NOTE, code, f.note) for code, f in self.fits if f.note)

    def describe(self, shared_unverified: Iterable[str] = ()) -> str:
        """``2.7 cu118 (minor version compat)``; ``(unverified)`` when it rests on more
        unconfirmed facts than ``shared_unverified``."""
        c = self.candidate
        marks = []
        d = self.driver
        if d is not None and d.status == MVC:
            marks.append("minor version compat")
        if d is not None and d.since is not None:
            marks.append(f"driver >= {d.since}")
        if set(self.unverified) - set(shared_unverified):
            marks.append("unverified")
        text = f"{c.release.torch} {c.build.tag if c.build else 'cpu'}"
        return text + (f" ({', '.join(marks)})" if marks else "")

    def to_json(self) -> dict:
        c, d = self.candidate, self.driver
        return {
            "torch": c.release.torch.raw,
            "torchvision": c.release.torchvision.raw if c.release.torchvision else None,
            "cuda": c.cuda.raw if c.cuda else None,
            "cudnn": c.build.cudnn.raw if c.build and c.build.cudnn else None,
            "python": [p.raw for p in self.python],
            "driver": d.status if d else None,
            "driver_from": d.since.raw if d and d.since else None,
            "target": self.target,
            "unverified": list(self.unverified),
        }


@dataclass(frozen=True)
class Combination:
    """A valid combination from the matrix, suggested instead of the requested one."""

    torch: Version
    torchvision: Version | None
    cuda: Version | None
    cudnn: Version | None
    python: Version
    target: str | None = None
    keeps: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"torch {self.torch}"]
        if self.torchvision:
            parts.append(f"torchvision {self.torchvision}")
        parts.append(f"CUDA {self.cuda} + cuDNN {self.cudnn}" if self.cuda else "CPU")
        parts.append(f"Python {self.python}")
        return " + ".join(parts)

    def to_json(self) -> dict:
        return {
            "torch": self.torch.raw,
            "torchvision": self.torchvision.raw if self.torchvision else None,
            "cuda": self.cuda.raw if self.cuda else None,
            "cudnn": self.cudnn.raw if self.cudnn else None,
            "python": self.python.raw,
            "target": self.target,
            "keeps": list(self.keeps),
        }


@dataclass(frozen=True)
class CheckResult:
    request: Request
    conflicts: tuple[Finding, ...]
    matches: tuple[Match, ...] = ()
    suggestions: tuple[Combination, ...] = field(default=())

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(c for c in self.conflicts if c.severity == ERROR)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(c for c in self.conflicts if c.severity == WARNING)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def verdict(self) -> str:
        if self.errors:
            return "incompatible"
        return "compatible with warnings" if self.warnings else "compatible"

    @property
    def best(self) -> Match | None:
        """The newest CUDA build that fits and rests on no unconfirmed fact beyond what every
        fitting build rests on (else the newest build)."""
        if not self.matches:
            return None
        floor = set(self.unverified)
        cuda = [mt for mt in self.matches if mt.candidate.build is not None] or list(self.matches)
        return next((mt for mt in cuda if set(mt.unverified) <= floor), cuda[0])

    @property
    def release(self) -> Release | None:
        return self.best.candidate.release if self.best else None

    @property
    def build(self) -> Build | None:
        return self.best.candidate.build if self.best else None

    @property
    def unverified(self) -> tuple[str, ...]:
        """The unconfirmed facts the verdict rests on: empty when some matching build rests
        on none."""
        if not self.ok or not self.matches:
            return ()
        return min((mt.unverified for mt in self.matches), key=len)

    def to_json(self) -> dict:
        return {
            "request": self.request.describe(),
            "not_checked": list(self.request.not_checked),
            "verdict": self.verdict,
            "ok": self.ok,
            "unverified": list(self.unverified),
            "conflicts": [c.to_json() for c in self.conflicts],
            "builds": [mt.to_json() for mt in self.matches],
            "suggestions": [s.to_json() for s in self.suggestions],
        }


# -- evaluating -------------------------------------------------------------------------------


def _python_offer(req: Request, release: Release) -> tuple[Version, ...]:
    if req.python is not None:
        return (req.python.minor,)
    have = release.python_for(req.platform)
    if req.torchvision is not None and release.torchvision is not None:
        tv = release.torchvision_python_for(req.platform)
        have = tuple(p for p in have if p in tv)
    return have


def _target(m: Matrix, c: Candidate, platform: str) -> str | None:
    """The target that installs ``c`` on ``platform``, if one does."""
    return next(
        (
            t.name
            for t in m.targets.values()
            if t.release is c.release
            and t.cuda == c.cuda
            and platform in t.platforms
            and not t.is_stack
        ),
        None,
    )


def _judge(t: _Table, rules: Sequence[Rule]) -> list[Finding]:
    """Blame: a constraint no build meets, or none of those the constraints before it left."""
    errors: list[Finding] = []
    pool = list(range(len(t.cands)))
    for rule in rules:
        if not t.passing([rule]):
            why = rule.alone(t.m, t.req) or _explain(t, rule, pool)
            errors.append(Finding(ERROR, rule.code, why))
            continue
        left = t.passing([rule], pool)
        if not left:
            errors.append(Finding(ERROR, rule.code, _explain(t, rule, pool)))
            continue
        pool = left
    if t.req.cudnn is not None and not any(e.code == "cudnn" for e in errors):
        by_value = _cudnn_by_value(t.m, t.req)
        if by_value:
            errors.append(Finding(ERROR, "cudnn", by_value))
    return errors


def _matches(t: _Table, rules: Sequence[Rule]) -> list[Match]:
    """The builds that pass every rule: CUDA builds newest first, then the CPU builds."""
    out = []
    for i in sorted(t.passing(rules), key=lambda i: t.cands[i].build is None):
        c = t.cands[i]
        python = _python_offer(t.req, c.release)
        if python:
            fits = tuple((r.code, t.fits(r)[i]) for r in rules)
            out.append(Match(c, python, fits, _target(t.m, c, t.req.platform)))
    return out


def _summary(t: _Table, rules: Sequence[Rule], matches: Sequence[Match]) -> list[Finding]:
    """Warnings every preferred build shares, the best build's notes, and what the GPU and
    driver rule out."""
    m, req = t.m, t.req
    cuda = [mt for mt in matches if mt.candidate.build is not None]
    preferred = cuda or list(matches)
    out: list[Finding] = []
    if preferred:
        common = set(preferred[0].caveats())
        for mt in preferred[1:]:
            common &= set(mt.caveats())
        out += [w for w in preferred[0].caveats() if w in common]
        out += list(preferred[0].notes())
    if req.driver is not None and not req.cpu:
        if not cuda and req.cuda is None:
            out.append(Finding(ERROR, "driver", _no_cuda_left(t, rules)))
        elif req.cuda is None:
            out.append(Finding(NOTE, "driver", _driver_runs(m, req)))
    if req.gpus and cuda and req.cuda is None:
        out += _gpu_excludes(t, rules, cuda)
    return out


def _driver_runs(m: Matrix, req: Request) -> str:
    """What a driver runs, for an answer that names no CUDA version."""
    assert req.driver is not None
    best, since = _full_cuda(m, req.driver)
    mvc = max(
        (mj.major for mj in m.cuda_majors if req.driver.reaches(mj.linux_floor) != NONE),
        default=None,
    )
    unreached = [mj for mj in m.cuda_majors if mvc is None or mj.major > mvc]
    none = ""
    if unreached:
        majors = " or ".join(f"{mj.major}.x" for mj in unreached)
        floors = ", ".join(f">= {mj.linux_floor}" for mj in unreached)
        none = f"; no CUDA {majors} build ({floors})"
    if best is not None:
        newer = [t for t in m.cuda_toolkits if t.version > best and t.version.major == mvc]
        extra = f"; newer CUDA {mvc}.x builds through minor version compatibility" if newer else ""
        return f"driver {req.driver} runs CUDA builds up to {best} fully{since}{extra}{none}"
    oldest = m.cuda_toolkits[0]
    return (
        f"driver {req.driver} runs no CUDA version of the matrix fully (CUDA {oldest.version} "
        f"needs {oldest.linux}); CUDA {mvc}.x builds only through minor version compatibility"
        f"{none}"
    )


def _no_cuda_left(t: _Table, rules: Sequence[Rule]) -> str:
    """Why only CPU builds are left for a user who gave a driver, and which CUDA builds that
    driver (and GPU) runs: the reasons of the rules that turned the CUDA builds away."""
    req = t.req
    cuda = [i for i in range(len(t.cands)) if t.cands[i].build is not None]
    whys: list[str] = []
    pool = cuda
    for rule in rules:
        left = t.passing([rule], pool)
        if not left:
            # the oldest CUDA builds first: their reason is the one nearest to holding
            oldest_first = sorted(pool, key=lambda i: (t.cands[i].cuda, t.cands[i].release.torch))
            whys += [t.fits(rule)[i].why for i in oldest_first]
            break
        pool = left
    reasons = list(dict.fromkeys(w for w in whys if w))
    why = reasons[0] + (f" (and {len(reasons) - 1} more reasons)" if len(reasons) > 1 else "")
    hard = [r for r in RULES if r.code in HARD and r.applies(req)]
    runs = [t.cands[i] for i in t.passing(hard, cuda)]
    gpu = f" with GPU {req.gpu_label}" if req.gpus else ""
    if runs:
        newest = ", ".join(c.label for c in runs[:3])
        also = f"; driver {req.driver}{gpu} runs CUDA builds such as {newest}"
    else:
        also = f"; driver {req.driver}{gpu} runs no CUDA build of the matrix"
    return f"no CUDA build fits: {why}; only the CPU build does{also}"


def _gpu_excludes(t: _Table, rules: Sequence[Rule], cuda: Sequence[Match]) -> list[Finding]:
    """The CUDA versions whose builds fit everything but the GPU."""
    others = [r for r in rules if r.code not in ("gpu", "driver")]
    fits_rest = {t.cands[i].cuda for i in t.passing(others) if t.cands[i].build is not None}
    left = fits_rest - {mt.candidate.cuda for mt in cuda}
    if not left:
        return []
    return [Finding(NOTE, "gpu", f"no CUDA {_names(left)} build runs on GPU {t.req.gpu_label}")]


def check(m: Matrix, req: Request) -> CheckResult:
    """Judge every build against every constraint given; when none fits, say why and suggest
    the nearest builds that fit the machine."""
    rules = [r for r in RULES if r.applies(req)]
    t = _Table(m, req)
    errors = _judge(t, rules)
    if not errors:
        matches = _matches(t, rules)
        if matches:
            summary = tuple(_summary(t, rules, matches))
            if any(f.severity == ERROR for f in summary):
                return CheckResult(req, summary, tuple(matches), _suggest(t))
            return CheckResult(req, summary, tuple(matches))
        # every rule holds, but no build that fits has wheels for the Python asked for
        errors = [Finding(ERROR, "python", "no build that fits has wheels for it")]
    return CheckResult(req, tuple(errors), (), _suggest(t))


# -- suggestions ------------------------------------------------------------------------------


def _distance(values: list[Version], wanted: Version | None, got: Version) -> float:
    """Steps between ``got`` and ``wanted`` in ``values`` (ties: the newer one is nearer)."""
    if wanted is None:
        return 0.0
    i = bisect.bisect_left(values, wanted)
    pos = i if i < len(values) and values[i] == wanted else i - 0.5
    j = values.index(got)
    return abs(j - pos) - (0.25 if j > pos else 0.0)


def _major_distance(values: list[Version], wanted: Version | None, got: Version | None) -> float:
    if wanted is None or got is None:
        return 0.0
    return (100.0 if got.major != wanted.major else 0.0) + _distance(values, wanted, got)


def _nearest_python(have: Sequence[Version], wanted: Version) -> Version:
    return min(have, key=lambda p: (abs(p.padded(2)[1] - wanted.padded(2)[1]), -p.padded(2)[1]))


def _suggestion_pool(t: _Table) -> list[tuple[Candidate, Version]]:
    """Builds that fit the machine (platform, GPU, driver), each with the Python it would
    use: the one asked for or the nearest, else the newest stable one."""
    req = t.req
    hard = [r for r in RULES if r.code in HARD and r.applies(req)]
    want_cuda = req.cuda is not None or bool(req.gpus) or req.driver is not None
    out = []
    for i in t.passing(hard):
        c = t.cands[i]
        b = c.build
        if req.cpu and b is not None or not req.cpu and want_cuda and b is None:
            continue
        if b is not None and (not b.verified or b.cudnn is None):
            continue
        have = c.release.python_for(req.platform)
        if c.release.torchvision is not None:
            tv = c.release.torchvision_python_for(req.platform)
            have = tuple(p for p in have if p in tv)
        if not have:
            continue
        if req.python is not None:
            python = _nearest_python(have, req.python)
        else:
            stable = [p for p in have if p not in c.release.python_experimental]
            python = max(stable or have)
        out.append((c, python))
    return out


def _keeps(req: Request, c: Candidate, python: Version) -> tuple[str, ...]:
    r, b = c.release, c.build
    keeps = []
    if req.torch is not None and req.torch.minor == r.torch:
        keeps.append(f"torch {r.torch}")
    if req.cuda is not None and b is not None and b.cuda == req.cuda:
        keeps.append(f"CUDA {req.cuda}")
    if req.cudnn is not None and b is not None and b.cudnn_matches(req.cudnn):
        keeps.append(f"cuDNN {req.cudnn}")
    if req.python is not None and python == req.python.minor:
        keeps.append(f"Python {python}")
    if req.torchvision is not None and r.torchvision == req.torchvision.minor:
        keeps.append(f"torchvision {r.torchvision}")
    return tuple(keeps)


def suggest(m: Matrix, req: Request, limit: int = 3) -> tuple[Combination, ...]:
    """The nearest builds that fit the user's machine, ranked by how little they change:
    torch release, then Python, then CUDA, then cuDNN; the best one keeping each thing the
    user asked for comes right after the overall best."""
    return _suggest(_Table(m, req), limit)


def _suggest(t: _Table, limit: int = 3) -> tuple[Combination, ...]:
    m, req = t.m, t.req
    torches = [r.torch for r in m.releases]
    cudas = list(m.cuda_versions)
    cudnns = sorted({b.cudnn for r in m.releases for b in r.builds if b.cudnn})
    wanted_cudnn = next((v for v in cudnns if req.cudnn and v.matches_prefix(req.cudnn)), req.cudnn)
    if wanted_cudnn is not None and wanted_cudnn not in cudnns:
        cudnns = sorted({*cudnns, wanted_cudnn})
    ranked = []
    for c, python in _suggestion_pool(t):
        b = c.build
        target = _target(m, c, req.platform)
        key = (
            _distance(torches, req.torch.minor if req.torch else None, c.release.torch),
            abs(python.padded(2)[1] - req.python.padded(2)[1]) if req.python else 0,
            _major_distance(cudas, req.cuda, b.cuda if b else None),
            _major_distance(cudnns, wanted_cudnn, b.cudnn if b else None),
            b is not None and b.status == "experimental" and b.cuda != c.release.pypi_default_cuda,
            target is None,
        )
        combo = Combination(
            c.release.torch,
            c.release.torchvision,
            c.cuda,
            b.cudnn if b else None,
            python,
            target,
            _keeps(req, c, python),
        )
        ranked.append((key, combo))
    ranked.sort(key=lambda kc: kc[0])
    combos = [combo for _, combo in ranked]
    if not combos:
        return ()
    picks = [combos[0]]
    for prefix in ("torch ", "Python ", "CUDA ", "cuDNN ", "torchvision "):
        keeper = next((s for s in combos if any(k.startswith(prefix) for k in s.keeps)), None)
        if keeper is not None:
            picks.append(keeper)
    picks += combos
    out: list[Combination] = []
    for p in picks:
        if all((p.torch, p.cuda, p.python) != (o.torch, o.cuda, o.python) for o in out):
            out.append(p)
    return tuple(out[:limit])


# -- text -------------------------------------------------------------------------------------


def format_check(result: CheckResult, limit: int = 8) -> str:
    """Verdict first (with "unverified" beside it when it rests on unconfirmed facts), the
    reasons, the builds that fit (newest first), the suggestions."""
    head = f"{result.verdict}: {result.request.describe()}"
    if result.unverified:
        head += f"  [unverified: {'; '.join(result.unverified)}]"
    lines = [head]
    if result.request.not_checked:
        lines.append(
            f"  not given, so not checked: {', '.join(result.request.not_checked)} (the verdict "
            "holds for the builds listed)"
        )
    for c in result.conflicts:
        lines.append(f"  {c.severity:<7} {c.code:<11} {c.message}")
    if result.matches:
        cuda = [mt for mt in result.matches if mt.candidate.build is not None]
        listed = cuda if cuda and len(cuda) < len(result.matches) else list(result.matches)
        shown = [mt.describe(result.unverified) for mt in listed[:limit]]
        more = len(listed) - limit
        tail = f", and {more} more (--format json lists all)" if more > 0 else ""
        if listed is cuda:
            tail += "; and the CPU builds"
        lines.append(f"builds that fit, newest first: {', '.join(shown)}{tail}")
        best = result.best
        if best is not None and best.candidate.build is not None:
            b = best.candidate.build
            lines.append(
                f"  ships   cuDNN {b.cudnn or '?'} with {best.candidate.label}"
                + (f" (target {best.target})" if best.target else "")
            )
    if result.suggestions:
        lines.append("nearest valid combinations:")
        for s in result.suggestions:
            extra = []
            if s.keeps:
                extra.append("keeps " + ", ".join(s.keeps))
            if s.target:
                extra.append(f"target {s.target}")
            tail = f"   ({'; '.join(extra)})" if extra else ""
            lines.append(f"  {s.describe()}{tail}")
    elif not result.ok:
        lines.append("no valid combination in the matrix fits this driver and GPU")
    return "\n".join(lines)
