"""Compatibility rules: is a requested PyTorch / CUDA / cuDNN / Python / driver / GPU
combination one that a release actually shipped and that this hardware can run?

Pure functions of data: no I/O.

Public API
----------
``Request.from_strings(matrix, torch=..., cuda=..., cudnn=..., python=..., torchvision=...,
driver=..., gpu=...)``
    Parses user text (``2.1.2``, ``cu121`` / ``12.1`` / ``cpu``, ``8.9.2``, ``535.104.05``,
    ``sm_86`` / ``8.6`` / ``RTX 3090``); a malformed value raises ``LockgenError``. A torch
    version with a local label (``2.1.2+cu121``) also gives the CUDA version.
``check(matrix, request) -> CheckResult``
    ``conflicts`` (each a :class:`Conflict` with ``severity`` error / warning / note,
    ``field`` and ``message``), ``ok`` (no errors), ``verdict`` and, when not ok,
    ``suggestions``: the nearest valid combinations (:class:`Combination`).
``driver_status(floor, driver)``
    ``"ok"``, ``"minor-version-compat"`` or ``"too-old"`` — shared with the doctor.
``format_check(result) -> str``, ``result.to_json() -> dict``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace

from lockgen.matrix import Build, DriverFloor, Matrix, Release
from lockgen.versions import Capability, Version, parse_cuda, runs_on

ERROR, WARNING, NOTE = "error", "warning", "note"


@dataclass(frozen=True)
class Request:
    """A combination to check. ``cpu=True`` asks for the CPU build (``cuda`` is then None)."""

    torch: Version | None = None
    cuda: Version | None = None
    cpu: bool = False
    cudnn: Version | None = None
    python: Version | None = None
    torchvision: Version | None = None
    driver: Version | None = None
    gpu: Capability | None = None
    gpu_label: str = ""
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
        tv = Version.parse(torch, "torch version") if torch else None
        cuda_v = parse_cuda(cuda) if cuda else None
        cpu = cuda is not None and cuda_v is None
        if tv is not None and tv.local and cuda is None:
            # 2.1.2+cu121 says which build it is
            if tv.local == "cpu":
                cpu = True
            elif tv.local.startswith("cu"):
                cuda_v = parse_cuda(tv.local)
        cap, label = (None, "")
        if gpu:
            cap, label = matrix.gpu_capability(gpu)
        return cls(
            torch=tv,
            cuda=cuda_v,
            cpu=cpu,
            cudnn=Version.parse(cudnn, "cuDNN version") if cudnn else None,
            python=Version.parse(python, "Python version") if python else None,
            torchvision=Version.parse(torchvision, "torchvision version") if torchvision else None,
            driver=Version.parse(driver, "driver version") if driver else None,
            gpu=cap,
            gpu_label=label,
            platform=platform,
        )

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
        if self.gpu:
            parts.append(f"GPU {self.gpu_label or self.gpu.sm}")
        return " + ".join(parts) or "(nothing)"


@dataclass(frozen=True)
class Conflict:
    severity: str
    field: str
    message: str


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
    conflicts: tuple[Conflict, ...]
    release: Release | None = None
    build: Build | None = None
    suggestions: tuple[Combination, ...] = field(default=())

    @property
    def errors(self) -> tuple[Conflict, ...]:
        return tuple(c for c in self.conflicts if c.severity == ERROR)

    @property
    def warnings(self) -> tuple[Conflict, ...]:
        return tuple(c for c in self.conflicts if c.severity == WARNING)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def verdict(self) -> str:
        if self.errors:
            return "incompatible"
        return "compatible with warnings" if self.warnings else "compatible"

    def to_json(self) -> dict:
        return {
            "request": self.request.describe(),
            "verdict": self.verdict,
            "ok": self.ok,
            "conflicts": [
                {"severity": c.severity, "field": c.field, "message": c.message}
                for c in self.conflicts
            ],
            "suggestions": [s.to_json() for s in self.suggestions],
        }


def driver_status(floor: DriverFloor, driver: Version) -> str:
    """``too-old`` below the minor-version-compatibility floor, ``minor-version-compat``
    between it and the toolkit driver, ``ok`` from the toolkit driver on."""
    if driver < floor.minimum:
        return "too-old"
    if floor.full is not None and driver < floor.full:
        return "minor-version-compat"
    return "ok"


def _span(versions: list[Version]) -> str:
    vs = sorted(set(versions))
    if not vs:
        return "none"
    return vs[0].raw if len(vs) == 1 else f"{vs[0].raw}-{vs[-1].raw}"


def _rules(m: Matrix, req: Request) -> tuple[list[Conflict], Release | None, Build | None]:
    out: list[Conflict] = []

    def add(sev: str, fld: str, msg: str) -> None:
        out.append(Conflict(sev, fld, msg))

    release = build = None
    first, last = m.releases[0].torch, m.releases[-1].torch
    if req.torch is not None:
        release = m.find_release(req.torch)
        if release is None:
            where = (
                f"older than the oldest release the matrix covers ({first})"
                if req.torch.minor < first
                else f"newer than the newest release the matrix covers ({last})"
                if req.torch.minor > last
                else "not a PyTorch release"
            )
            add(ERROR, "torch", f"torch {req.torch} is {where}")
        elif not release.verified and req.torch.minor == last:
            fields = ", ".join(release.unverified) or "some fields"
            add(NOTE, "torch", f"torch {release.torch}: {fields} unverified in the matrix")

    if req.torchvision is not None and release is not None:
        if release.torchvision is None:
            add(
                WARNING,
                "torchvision",
                f"no torchvision release is known to pair with torch {release.torch}",
            )
        elif req.torchvision.minor != release.torchvision:
            add(
                ERROR,
                "torchvision",
                f"torch {release.torch} pairs with torchvision {release.torchvision}, "
                f"not {req.torchvision}",
            )

    # -- CUDA build
    shipping = [r for r in m.releases if req.cuda is not None and r.build(req.cuda)]
    if req.cpu:
        if req.cudnn is not None:
            add(WARNING, "cudnn", "a CPU build does not use cuDNN")
        if req.gpu is not None:
            add(WARNING, "gpu", "a CPU build does not use the GPU")
    elif req.cuda is not None:
        if release is not None:
            build = release.build(req.cuda)
            if build is None:
                others = (
                    f"; CUDA {req.cuda} builds exist for torch {_span([r.torch for r in shipping])}"
                    if shipping
                    else ""
                )
                add(
                    ERROR,
                    "cuda",
                    f"torch {release.torch} has no CUDA {req.cuda} build (its builds: "
                    f"{', '.join(c.raw for c in release.cuda_versions)}){others}",
                )
            elif not build.verified:
                add(
                    WARNING,
                    "cuda",
                    f"the CUDA {req.cuda} build of torch {release.torch} is unverified "
                    f"({build.note or 'lead only'})",
                )
            elif build.status == "experimental" and req.cuda != release.pypi_default_cuda:
                add(
                    NOTE,
                    "cuda",
                    f"RELEASE.md labels the CUDA {req.cuda} build of torch {release.torch} "
                    "experimental",
                )
        elif not shipping:
            add(
                ERROR,
                "cuda",
                f"no PyTorch release from {first} to {last} ships a CUDA {req.cuda} build "
                f"(builds exist for CUDA {', '.join(c.raw for c in m.cuda_versions)})",
            )

    # -- cuDNN
    if req.cudnn is not None and not req.cpu:
        if build is not None:
            if build.cudnn is None:
                add(
                    WARNING,
                    "cudnn",
                    f"the cuDNN of torch {release.torch if release else '?'} + CUDA "
                    f"{build.cuda} is unknown",
                )
            elif not build.cudnn_matches(req.cudnn):
                add(
                    ERROR,
                    "cudnn",
                    f"torch {release.torch if release else '?'} + CUDA {build.cuda} ships "
                    f"cuDNN {build.cudnn}, not {req.cudnn}",
                )
            elif build.cudnn_release_md and build.cudnn_release_md.matches_prefix(req.cudnn):
                add(
                    NOTE,
                    "cudnn",
                    f"cuDNN {req.cudnn} is what RELEASE.md says; the wheels ship {build.cudnn}",
                )
        else:
            with_it = [
                (r, b)
                for r in m.releases
                for b in r.builds
                if b.cudnn is not None and b.cudnn_matches(req.cudnn)
            ]
            if not with_it:
                add(ERROR, "cudnn", f"no build in the matrix ships cuDNN {req.cudnn}")
            else:
                cudas = sorted({b.cuda for _, b in with_it})
                torches = [r.torch for r, _ in with_it]
                fits = (req.cuda is None or req.cuda in cudas) and (
                    release is None or any(r is release for r, _ in with_it)
                )
                if not fits or req.torch is not None and release is None:
                    add(
                        ERROR,
                        "cudnn",
                        f"cuDNN {req.cudnn} ships only with CUDA "
                        f"{', '.join(c.raw for c in cudas)} builds of torch {_span(torches)}"
                        + (
                            f", never with CUDA {req.cuda}"
                            if req.cuda and req.cuda not in cudas
                            else ""
                        ),
                    )

    # -- Python
    if req.python is not None and release is not None:
        supported = ", ".join(p.raw for p in release.python)
        if not release.supports_python(req.python):
            add(
                ERROR,
                "python",
                f"torch {release.torch} has no wheels for Python {req.python} "
                f"(it supports {supported})",
            )
        elif req.python.minor in release.python_experimental:
            add(
                WARNING,
                "python",
                f"Python {req.python.minor} is experimental for torch {release.torch}",
            )

    # -- driver
    if req.driver is not None and req.cuda is not None and not req.cpu:
        floor = m.driver_floor(req.cuda)
        if floor is None:
            add(WARNING, "driver", f"the matrix has no driver floor for CUDA {req.cuda}")
        else:
            status = driver_status(floor, req.driver)
            full = f"{floor.full}" if floor.full else "unknown"
            if status == "too-old":
                best = m.max_cuda_for_driver(req.driver)
                can = f"; this driver fully supports CUDA up to {best}" if best else ""
                add(
                    ERROR,
                    "driver",
                    f"driver {req.driver} is below {floor.minimum}, the minimum for any "
                    f"CUDA {req.cuda.major}.x build (minor version compatibility floor); "
                    f"CUDA {req.cuda} needs driver >= {full} (>= {floor.minimum} through "
                    f"minor version compatibility){can}",
                )
            elif status == "minor-version-compat":
                add(
                    WARNING,
                    "driver",
                    f"driver {req.driver} is older than CUDA {req.cuda}'s toolkit driver "
                    f"{full}: it works through minor version compatibility, but PTX JIT "
                    "and the newest CUDA features may fail",
                )
            if not floor.verified:
                add(NOTE, "driver", f"the driver floor of CUDA {req.cuda} is unverified")
    elif req.driver is not None and req.cuda is None and not req.cpu:
        best = m.max_cuda_for_driver(req.driver)
        mvc = max((mj.major for mj in m.cuda_majors if req.driver >= mj.linux_floor), default=None)
        oldest, lowest = m.cuda_toolkits[0], min(m.cuda_majors, key=lambda mj: mj.major)
        if best is not None:
            newer = [t for t in m.cuda_toolkits if t.version > best and t.version.major == mvc]
            extra = (
                f"; newer CUDA {mvc}.x builds through minor version compatibility" if newer else ""
            )
            add(NOTE, "driver", f"driver {req.driver} runs CUDA builds up to {best} fully" + extra)
        elif mvc is not None:
            add(
                NOTE,
                "driver",
                f"driver {req.driver} runs no CUDA version of the matrix fully (CUDA "
                f"{oldest.version} needs {oldest.linux}); CUDA {mvc}.x builds only through "
                "minor version compatibility",
            )
        else:
            add(
                WARNING,
                "driver",
                f"driver {req.driver} is too old for every CUDA build of the matrix (CUDA "
                f"{lowest.major}.x needs >= {lowest.linux_floor}): CPU builds only",
            )

    # -- GPU architecture
    if req.gpu is not None and build is not None and release is not None:
        archs = m.arch_list(release.torch, build.cuda, req.platform)
        label = req.gpu_label or req.gpu.sm
        if archs is None:
            add(
                WARNING,
                "gpu",
                f"the matrix has no arch list for torch {release.torch} + CUDA {build.cuda} "
                f"on {req.platform}",
            )
        else:
            listed = ";".join(archs.names)
            native = any(runs_on(replace(a, ptx=False), req.gpu) for a in archs.archs)
            if not archs.runs_on(req.gpu):
                add(
                    ERROR,
                    "gpu",
                    f"GPU {label} is not in the arch list of torch {release.torch} + CUDA "
                    f"{build.cuda} ({listed}): torch will refuse to run on it",
                )
            elif not native:
                add(
                    WARNING,
                    "gpu",
                    f"GPU {label} runs torch {release.torch} + CUDA {build.cuda} only through "
                    f"PTX JIT ({listed}): slow first start, needs a driver >= the toolkit "
                    "driver",
                )
            if not archs.verified:
                add(
                    NOTE,
                    "gpu",
                    f"the arch list of torch {release.torch} + CUDA {build.cuda} is "
                    f"unverified ({archs.note or 'lead only'})",
                )
    return out, release, build


def _distance(values: list[Version], wanted: Version | None, got: Version) -> float:
    if wanted is None:
        return 0.0
    i = bisect.bisect_left(values, wanted)
    pos = i if i < len(values) and values[i] == wanted else i - 0.5
    # ties: prefer the newer one
    return abs(values.index(got) - pos) - (0.25 if values.index(got) > pos else 0.0)


def _candidates(m: Matrix, req: Request) -> list[tuple[Combination, tuple]]:
    torches = [r.torch for r in m.releases]
    cudas = list(m.cuda_versions)
    wanted_torch = req.torch.minor if req.torch else None
    out = []
    for release in m.releases:
        builds: list[Build | None] = [None] if req.cpu else list(release.builds)
        if req.cuda is None and not req.cpu and req.gpu is None and req.driver is None:
            builds.append(None)
        for build in builds:
            if build is not None and (not build.verified or build.cudnn is None):
                continue
            if req.python is not None and release.supports_python(req.python):
                python = req.python.minor
            elif req.python is not None:
                python = min(
                    release.python, key=lambda p: (abs(p.padded(2)[1] - req.python.padded(2)[1]), p)
                )
            else:
                python = max(p for p in release.python if p not in release.python_experimental)
            cand = Request(
                torch=release.torch,
                cuda=build.cuda if build else None,
                cpu=build is None,
                cudnn=build.cudnn if build else None,
                python=python,
                torchvision=release.torchvision,
                driver=req.driver,
                gpu=req.gpu,
                gpu_label=req.gpu_label,
                platform=req.platform,
            )
            conflicts, _, _ = _rules(m, cand)
            if any(c.severity == ERROR for c in conflicts):
                continue
            keeps = []
            if req.torch is not None and req.torch.minor == release.torch:
                keeps.append(f"torch {release.torch}")
            if req.cuda is not None and build is not None and build.cuda == req.cuda:
                keeps.append(f"CUDA {req.cuda}")
            if req.cudnn is not None and build is not None and build.cudnn_matches(req.cudnn):
                keeps.append(f"cuDNN {req.cudnn}")
            if req.python is not None and python == req.python.minor:
                keeps.append(f"Python {python}")
            if (
                req.torchvision is not None
                and release.torchvision is not None
                and req.torchvision.minor == release.torchvision
            ):
                keeps.append(f"torchvision {release.torchvision}")
            target = next(
                (
                    t.name
                    for t in m.targets.values()
                    if t.release is release and t.cuda == (build.cuda if build else None)
                ),
                None,
            )
            combo = Combination(
                release.torch,
                release.torchvision,
                build.cuda if build else None,
                build.cudnn if build else None,
                python,
                target,
                tuple(keeps),
            )
            n_warn = sum(c.severity == WARNING for c in conflicts)
            dt = _distance(torches, wanted_torch, release.torch)
            dc = _distance(cudas, req.cuda, build.cuda) if build else 0.0
            out.append((combo, (-len(keeps), n_warn, dt, dc)))
    return out


def suggest(m: Matrix, req: Request, limit: int = 3) -> tuple[Combination, ...]:
    """The nearest valid combinations: the closest overall, then the closest that keeps the
    torch release, the CUDA version and the cuDNN version asked for."""
    cands = _candidates(m, req)
    if not cands:
        return ()
    picks = [min(cands, key=lambda c: c[1])[0]]

    def best(pred, key) -> None:
        pool = [c for c in cands if pred(c[0])]
        if pool:
            picks.append(min(pool, key=key)[0])

    if req.torch is not None:
        best(lambda c: True, lambda c: (c[1][2], c[1][0], c[1][3]))
    if req.cuda is not None:
        best(lambda c: c.cuda is not None, lambda c: (c[1][3], c[1][0], c[1][2]))
    if req.cudnn is not None:
        best(lambda c: any(k.startswith("cuDNN") for k in c.keeps), lambda c: (c[1][2], c[1][0]))
    if req.python is not None:
        best(lambda c: c.python == req.python.minor, lambda c: (c[1][0], c[1][2], c[1][3]))
    seen, out = set(), []
    for p in picks:
        key = (p.torch, p.cuda)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return tuple(out[:limit])


def check(m: Matrix, req: Request) -> CheckResult:
    """Apply every rule to ``req``; when something is wrong, add the nearest valid
    combinations."""
    conflicts, release, build = _rules(m, req)
    result = CheckResult(req, tuple(conflicts), release, build)
    if not result.ok:
        result = replace(result, suggestions=suggest(m, req))
    return result


def format_check(result: CheckResult) -> str:
    lines = [f"{result.verdict}: {result.request.describe()}"]
    for c in result.conflicts:
        lines.append(f"  {c.severity:<7} {c.field:<11} {c.message}")
    if result.build is not None and result.ok and result.release is not None:
        lines.append(
            f"  ships   cuDNN {result.build.cudnn or '?'} with torch "
            f"{result.release.torch} + CUDA {result.build.cuda}"
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
