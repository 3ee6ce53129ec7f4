"""The doctor: from a probed machine and the matrix, a verdict and a fix that fixes.

Pure: ``diagnose(matrix, report)`` reads a :class:`lockgen.probe.MachineReport` and the
matrix, and touches nothing. Each section of the diagnosis is one small rule
(``DOCTOR_RULES``) over the same :class:`Machine` view; they share check's
:class:`~lockgen.check.Finding` and its driver and architecture rules
(:meth:`DriverFloor.fit <lockgen.matrix.DriverFloor.fit>`, :func:`lockgen.versions.runs_on`,
:func:`lockgen.check.gpu_driver_fit`). The fix is chosen by :func:`lockgen.check.check`: the
builds that run on these GPUs with this driver and Python, the installed torch release first.

Verdicts: ``works``, ``works-with-warnings``, ``broken``. Each finding has a ``severity``
(``ok`` / ``note`` / ``warning`` / ``error``), a stable ``code`` and a message. The fix names
the target to install (from ``lockgen/data/targets.toml``), the driver needed, and a command.

JSON output (``lockgen doctor --format json``; keys are stable, ``schema`` changes if they do)::

    {
      "schema": 1,
      "verdict": "works" | "works-with-warnings" | "broken",
      "machine": {
        "platform": "linux-64",
        "python": "3.11.9",
        "driver": {"version": "535.104.05", "source": "/proc/driver/nvidia/version",
                   "cuda_umd": "12.2" | null} | null,
        "gpus": [{"index": 0, "name": "NVIDIA GeForce RTX 3090", "capability": "8.6" | null}],
        "torch": {"version": "2.14.1+cu130", "cuda": "13.0" | null, "cudnn": "9.24.0" | null,
                  "arch_list": ["sm_75", ...], "cuda_available": false,
                  "torchvision": "0.29.1" | null, "installer": "pip" | null,
                  "libraries": [{"name": "cudnn", "path": "...", "version": "9.24.0" | null,
                                 "distribution": "nvidia-cudnn-cu13 9.24.0.43" | null,
                                 "origin": "pip" | "conda" | "nix" | "system"}],
                  "cuda_home": "/usr/local/cuda" | null,
                  "cuda_home_nvcc": "12.6" | null,
                  "environment": {"kind": "venv" | "uv" | "conda" | "pixi" | "nix" | "system",
                                  "prefix": "...", "nix_shell": false} | null} | null,
        "torch_error": "" | "ModuleNotFoundError: ...",
        "nvcc": {"version": "13.0", "path": "/usr/local/cuda/bin/nvcc" | null} | null
      },
      "findings": [{"severity": "...", "code": "...", "message": "..."}],
      "fix": {"target": "cu130" | null, "driver_min": "580.65.06" | null,
              "command": "pip install ..." | null, "message": "..."}
    }

Finding codes: driver, no-driver, gpu, no-gpus, probe, nvidia-smi-kmd, torch, torch-missing,
torch-unknown, torch-cpu-on-gpu, torch-cuda-no-driver, driver-too-old, driver-minor-compat,
gpu-driver, gpu-arch, gpu-ptx, cuda-unavailable, cudnn-mismatch, python-unsupported, library,
library-path, no-libraries, toolkit, no-toolkit, nvcc, nvcc-mismatch, nvcc-minor, environment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from lockgen.check import Match, Request, check, gpu_driver_fit
from lockgen.errors import LockgenError
from lockgen.findings import Finding, Severity
from lockgen.matrix import MVC, OK, TOO_OLD, DriverFit, Matrix, Release
from lockgen.probe import PIP, GpuInfo, LoadedLibrary, MachineReport, TorchInfo
from lockgen.targets import Target
from lockgen.versions import Capability, Driver, Version, cuda_tag, parse_cuda, runs_on

SCHEMA = 1
WORKS, WARNINGS, BROKEN = "works", "works-with-warnings", "broken"
SEVERITIES = tuple(s.value for s in Severity)
# Problems that only another torch build (or driver) fixes.
NEEDS_ANOTHER_BUILD = frozenset(
    {
        "torch-missing",
        "torch-cpu-on-gpu",
        "gpu-arch",
        "torch-cuda-no-driver",
        "driver-too-old",
        "gpu-driver",
    }
)


@dataclass(frozen=True)
class Fix:
    target: str | None = None
    driver_min: Version | None = None
    command: str | None = None
    message: str = "nothing to do"


# -- the machine as the rules see it ----------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """A probed machine read against the matrix: what every doctor rule needs."""

    m: Matrix
    report: MachineReport

    @property
    def torch(self) -> TorchInfo | None:
        return self.report.torch

    @cached_property
    def torch_cuda(self) -> Version | None:
        t = self.torch
        try:
            return parse_cuda(t.cuda) if t and t.cuda else None
        except LockgenError:
            return None

    @cached_property
    def release(self) -> Release | None:
        if self.torch is None:
            return None
        try:
            return self.m.find_release(self.torch.version)
        except LockgenError:
            return None

    @cached_property
    def gpus(self) -> tuple[GpuInfo, ...]:
        """The GPUs, a capability nvidia-smi and torch could not give taken from NVIDIA's
        GPU list by name."""
        out = []
        for g in self.report.gpus:
            if g.capability is None:
                try:
                    entry = self.m.find_gpu(g.name)
                except LockgenError:
                    entry = None
                if entry is not None:
                    g = GpuInfo(g.index, g.name, entry.capability, "the GPU list")
            out.append(g)
        return tuple(out)

    @cached_property
    def caps(self) -> tuple[Capability, ...]:
        return tuple(g.capability for g in self.gpus if g.capability is not None)

    @cached_property
    def code_archs(self) -> tuple[Capability, ...]:
        """What the installed torch carries code for: its own arch list (``sm_86`` → 8.6,
        ``compute_120`` → 12.0 with PTX), else the matrix's list of its build."""
        out = []
        for a in self.torch.arch_list if self.torch else ():
            try:
                cap = Capability.parse(a)
            except LockgenError:
                continue
            out.append(Capability(cap.major, cap.minor, cap.specific, a.startswith("compute")))
        if not out and self.release is not None and self.torch_cuda is not None:
            listed = self.m.arch_list(self.release.torch, self.torch_cuda, self.report.platform)
            return listed.archs if listed else ()
        return tuple(out)

    @cached_property
    def driver_fit(self) -> DriverFit | None:
        """How the driver meets the installed build's driver floor."""
        drv, cuda = self.report.driver, self.torch_cuda
        if drv is None or cuda is None:
            return None
        floor = self.m.driver_floor(cuda)
        return floor.fit(drv.version) if floor else None

    def runs(self, gpu: GpuInfo) -> bool:
        return any(runs_on(a, gpu.capability, self.torch_cuda) for a in self.code_archs)

    @cached_property
    def arch_misses(self) -> tuple[GpuInfo, ...]:
        """GPUs the installed build has no code for."""
        if self.torch_cuda is None or not self.code_archs:
            return ()
        return tuple(g for g in self.gpus if g.capability is not None and not self.runs(g))

    def request(self, driver: bool = True) -> Request:
        """The machine as a check request: platform, Python, GPUs and (optionally) driver."""
        drv = self.report.driver
        return Request(
            python=self.report.python.minor,
            driver=Driver(drv.version) if drv is not None and driver else None,
            gpus=self.caps,
            gpu_labels=tuple(g.name for g in self.gpus if g.capability is not None),
            platform=self.report.platform,
        )


Rule = Callable[[Machine], list[Finding]]


def _driver_rule(x: Machine) -> list[Finding]:
    drv = x.report.driver
    if drv is None:
        return [
            Finding(
                "note",
                "no-driver",
                "no NVIDIA GPU driver found (looked at /sys/module/nvidia/version, "
                "/proc/driver/nvidia/version and nvidia-smi): this machine runs PyTorch on CPU",
            )
        ]
    umd = f", supports CUDA up to {drv.cuda_umd}" if drv.cuda_umd else ""
    out = [Finding("ok", "driver", f"NVIDIA driver {drv.version} (from {drv.source}{umd})")]
    if drv.kmd_banner:
        out.append(
            Finding(
                "note",
                "nvidia-smi-kmd",
                "nvidia-smi prints the R610+ banner ('KMD Version'); tools that parse "
                "'Driver Version' (torch.utils.collect_env) will not find the driver",
            )
        )
    return out


def _gpu_list_rule(x: Machine) -> list[Finding]:
    if x.report.driver is None:
        return []
    out = []
    for g in x.gpus:
        cap = (
            f"compute capability {g.capability.major}.{g.capability.minor}"
            if g.capability
            else "compute capability unknown"
        )
        if g.capability_source == "the GPU list":
            cap += " (from NVIDIA's GPU list)"
        out.append(
            Finding("ok" if g.capability else "warning", "gpu", f"GPU {g.index}: {g.name}, {cap}")
        )
    if not x.gpus:
        out.append(
            Finding(
                "warning",
                "no-gpus",
                "the driver is loaded but no GPU could be listed (nvidia-smi missing or "
                "failing, and torch sees none)",
            )
        )
    return out


def _probe_rule(x: Machine) -> list[Finding]:
    return [Finding("note", "probe", p) for p in x.report.problems]


def _torch_rule(x: Machine) -> list[Finding]:
    t = x.torch
    if t is None and not x.report.interpreter_ok:
        # the interpreter is what is broken: installing torch into it would not help
        return [Finding("error", "interpreter", x.report.torch_error)]
    if t is None:
        return [
            Finding("error", "torch-missing", f"torch is not importable ({x.report.torch_error})")
        ]
    build = f"CUDA {t.cuda} build" if t.cuda else "CPU build"
    cudnn = f", cuDNN {t.cudnn}" if t.cudnn else ""
    archs = f", archs {' '.join(t.arch_list)}" if t.arch_list else ""
    out = [Finding("ok", "torch", f"torch {t.version} ({build}{cudnn}{archs})")]
    if x.release is None:
        out.append(Finding("note", "torch-unknown", f"torch {t.version} is not in the matrix"))
    drv = x.report.driver
    if drv is None and t.is_cuda_build:
        out.append(
            Finding(
                "warning",
                "torch-cuda-no-driver",
                f"torch is a CUDA {t.cuda} build but there is no NVIDIA driver: it runs on "
                "CPU only, and the cpu target is much smaller",
            )
        )
    elif drv is not None and x.gpus and not t.is_cuda_build:
        out.append(
            Finding(
                "warning",
                "torch-cpu-on-gpu",
                "torch is a CPU build on a machine with an NVIDIA GPU: the GPU is unused",
            )
        )
    return out


def _driver_fit_rule(x: Machine) -> list[Finding]:
    fit, drv, cuda = x.driver_fit, x.report.driver, x.torch_cuda
    if drv is None or cuda is None or x.torch is None:
        return []
    if fit is None:
        return [Finding("note", "driver", f"the matrix has no driver floor for CUDA {cuda}")]
    floor = fit.floor
    if fit.status == TOO_OLD:
        return [
            Finding(
                "error",
                "driver-too-old",
                f"driver {drv.version} is too old for torch's CUDA {cuda}: it needs >= "
                f"{floor.full or floor.minimum} (>= {floor.minimum} through minor version "
                "compatibility)",
            )
        ]
    if fit.status == MVC:
        return [
            Finding(
                "warning",
                "driver-minor-compat",
                f"driver {drv.version} is older than CUDA {cuda}'s toolkit driver "
                f"{floor.full}: works through minor version compatibility, PTX JIT may fail",
            )
        ]
    return []


def _gpu_driver_rule(x: Machine) -> list[Finding]:
    """A driver too old to know a GPU, or too new to still support it."""
    if x.report.driver is None or not x.caps:
        return []
    fit = gpu_driver_fit(x.m, x.request())
    return [Finding("error", "gpu-driver", fit.why)] if fit.why else []


def _gpu_arch_rule(x: Machine) -> list[Finding]:
    t = x.torch
    if t is None or x.torch_cuda is None or not x.code_archs:
        return []
    listed = " ".join(t.arch_list) or "from the matrix"
    out = []
    for g in x.arch_misses:
        out.append(
            Finding(
                "error",
                "gpu-arch",
                f"GPU {g.index} ({g.name}, {g.capability.sm}) is not in torch's arch list "
                f"({listed}): torch cannot run on it",
            )
        )
    for g in x.gpus:
        if g.capability is None or g in x.arch_misses:
            continue
        native = (Capability(a.major, a.minor, a.specific) for a in x.code_archs)
        if not any(runs_on(a, g.capability, x.torch_cuda) for a in native):
            out.append(
                Finding(
                    "warning",
                    "gpu-ptx",
                    f"GPU {g.index} ({g.capability.sm}) runs torch only through PTX JIT",
                )
            )
    return out


def _visibility_rule(x: Machine) -> list[Finding]:
    t = x.torch
    fit_ok = x.driver_fit is None or x.driver_fit.status != TOO_OLD
    if (
        t is None
        or x.report.driver is None
        or not x.gpus
        or not t.is_cuda_build
        or not fit_ok
        or x.arch_misses
        or t.cuda_available
    ):
        return []
    return [
        Finding(
            "warning",
            "cuda-unavailable",
            "torch.cuda.is_available() is False although driver and GPU fit: check "
            "CUDA_VISIBLE_DEVICES, container GPU access and /dev/nvidia*",
        )
    ]


def _cudnn_rule(x: Machine) -> list[Finding]:
    """A pip-installed torch that loads another cuDNN than its build ships."""
    t, r, cuda = x.torch, x.release, x.torch_cuda
    if t is None or r is None or cuda is None or not t.cudnn:
        return []
    if t.installer and not t.from_wheel:  # conda builds ship their own cuDNN
        return []
    b = r.build(cuda)
    try:
        loaded = Version.parse(t.cudnn, "cuDNN version")
    except LockgenError:
        return []
    if b is None or b.cudnn is None or b.cudnn_matches(loaded):
        return []
    return [
        Finding(
            "warning",
            "cudnn-mismatch",
            f"torch loads cuDNN {t.cudnn}, but torch {r.torch} + CUDA {cuda} ships "
            f"{b.cudnn}: another cuDNN on the library path wins",
        )
    ]


def _python_rule(x: Machine) -> list[Finding]:
    r = x.release
    if r is None or r.supports_python(x.report.python, x.report.platform):
        return []
    return [
        Finding(
            "warning",
            "python-unsupported",
            f"Python {x.report.python.minor} is not supported by torch {r.torch} "
            f"({', '.join(p.raw for p in r.python_for(x.report.platform))})",
        )
    ]


_ORIGIN_WORDS = {
    "pip": "pip wheels",
    "conda": "the conda prefix",
    "nix": "the Nix store",
    "system": "the system",
}


def _common_dir(paths: list[str]) -> str:
    parts = [p.split("/")[:-1] for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common) or "/"


def _libraries_rule(x: Machine) -> list[Finding]:
    """What the torch process really mapped, grouped by where it came from; a library from
    outside the wheels a pip-installed torch was built with is the commonest wrong load."""
    t = x.torch
    if t is None or not t.is_cuda_build:
        return []
    if not t.libraries:
        return [
            Finding(
                "note",
                "no-libraries",
                "the torch probe reported no loaded CUDA libraries (no /proc/self/maps?)",
            )
        ]
    out = []
    groups: dict[str, list[LoadedLibrary]] = {}
    for lib in t.libraries:
        groups.setdefault(lib.origin, []).append(lib)
    for origin, libs in groups.items():
        names = ", ".join(f"lib{lib.name} {lib.version or '?'}" for lib in libs)
        where = _common_dir([lib.path for lib in libs])
        out.append(
            Finding("ok", "library", f"torch loaded {names} from {_ORIGIN_WORDS[origin]} ({where})")
        )
    if t.from_wheel:
        for lib in t.libraries:
            if lib.origin != PIP:
                out.append(
                    Finding(
                        "warning",
                        "library-path",
                        f"lib{lib.name} {lib.version or ''} comes from {lib.path} "
                        f"({_ORIGIN_WORDS[lib.origin]}), not from the nvidia wheels this pip "
                        "torch depends on: LD_LIBRARY_PATH or the linker path wins; remove "
                        "that directory from LD_LIBRARY_PATH",
                    )
                )
    return out


def _toolkit_rule(x: Machine) -> list[Finding]:
    """The toolkit that would build C++/CUDA extensions, against torch's CUDA."""
    out = []
    t, cuda = x.torch, x.torch_cuda
    nvcc = x.report.cuda_home_nvcc or x.report.nvcc
    if x.report.nvcc is not None:
        where = f" ({x.report.nvcc.path})" if x.report.nvcc.path else ""
        out.append(Finding("ok", "nvcc", f"nvcc {x.report.nvcc.version}{where}"))
    if t is not None and t.cuda_home:
        got = f"nvcc {nvcc.version}" if nvcc else "no nvcc found"
        out.append(
            Finding("ok", "toolkit", f"extension builds use CUDA_HOME={t.cuda_home} ({got})")
        )
    if cuda is None:
        return out
    if nvcc is None:
        out.append(
            Finding(
                "note",
                "no-toolkit",
                f"no CUDA toolkit (nvcc) found: C++/CUDA extensions cannot be built; install "
                f"CUDA {cuda.major}.x's nvcc",
            )
        )
    elif nvcc.version.major != cuda.major:
        out.append(
            Finding(
                "warning",
                "nvcc-mismatch",
                f"nvcc is CUDA {nvcc.version} but torch is built with CUDA {cuda}: C++/CUDA "
                "extensions will not build against it",
            )
        )
    elif nvcc.version.minor != cuda.minor:
        out.append(
            Finding(
                "note",
                "nvcc-minor",
                f"nvcc is CUDA {nvcc.version}, torch CUDA {cuda}: extensions build, torch warns",
            )
        )
    return out


def _environment_rule(x: Machine) -> list[Finding]:
    env = x.torch.environment if x.torch else None
    if env is None:
        return []
    return [Finding("ok", "environment", f"Python environment: {env.describe()}")]


DOCTOR_RULES: tuple[Rule, ...] = (
    _driver_rule,
    _gpu_list_rule,
    _probe_rule,
    _torch_rule,
    _driver_fit_rule,
    _gpu_driver_rule,
    _gpu_arch_rule,
    _visibility_rule,
    _cudnn_rule,
    _python_rule,
    _libraries_rule,
    _toolkit_rule,
    _environment_rule,
)


# -- the fix ----------------------------------------------------------------------------------


def _rank(x: Machine, mt: Match) -> tuple:
    """The installed release first (then the nearest, newer on ties), a driver that runs
    the build fully before minor version compatibility, a target, the newest CUDA."""
    releases = [r.torch for r in x.m.releases]
    torch = mt.candidate.release.torch
    d = mt.driver
    if x.release is not None:
        i0, i = releases.index(x.release.torch), releases.index(torch)
        distance = abs(i - i0) - (0.5 if i > i0 else 0)
    else:
        distance = -releases.index(torch)
    return (
        distance,
        d is not None and d.status != OK,
        mt.target is None,
        bool(mt.unverified),
        tuple(-p for p in mt.candidate.cuda.padded(2)),
    )


def _target_for(x: Machine, release: Release, cuda: Version | None) -> Target | None:
    t = x.torch
    for target in x.m.targets.values():
        if target.release is not release or target.cuda != cuda or target.is_stack:
            continue
        if t is None or x.release is not release or target.torch.raw == t.base_version:
            return target
    return None


def _command(x: Machine, release: Release, cuda: Version | None, target: Target | None) -> str:
    t = x.torch
    if target is not None:
        cmd = target.pip_install_command()
    else:
        same = t is not None and x.release is release
        pins = [f"torch=={t.base_version}" if same else f'"torch=={release.torch}.*"']
        if same and t.torchvision:
            pins.append(f"torchvision=={t.torchvision.split('+')[0]}")
        elif release.torchvision is not None:
            pins.append(f'"torchvision=={release.torchvision}.*"')
        index = x.m.channels["pip"].wheel_index.format(tag=cuda_tag(cuda))
        cmd = f"pip install {' '.join(pins)} --index-url {index}"
    env = t.environment if t else None
    return "uv " + cmd if env is not None and env.kind == "uv" else cmd


def _build_words(release: Release, cuda: Version | None, x: Machine) -> str:
    t = x.torch
    version = t.base_version if t is not None and x.release is release else str(release.torch)
    return f"the {'CUDA ' + str(cuda) if cuda else 'CPU'} build of torch {version}"


def _install(
    x: Machine,
    release: Release,
    cuda: Version | None,
    why: str,
    tail: str = "",
    driver_min: Version | None = None,
) -> tuple[Fix, Target | None]:
    target = _target_for(x, release, cuda)
    named = f" (target {target.name})" if target else ""
    message = f"install {_build_words(release, cuda, x)}{named}: {why}{tail}"
    return Fix(
        target.name if target else None, driver_min, _command(x, release, cuda, target), message
    ), target


def _cpu_release(x: Machine) -> Release:
    cpu = next((t for t in x.m.targets.values() if t.is_cpu), None)
    if x.release is not None:
        return x.release
    return cpu.release if cpu else x.m.releases[-1]


def _why(codes: set[str], x: Machine, mt: Match) -> str:
    d = mt.driver
    runs = f"driver {x.report.driver.version} runs it" if x.report.driver else ""
    if d is not None and d.status == MVC:
        runs += " through minor version compatibility"
    if "gpu-arch" in codes:
        return f"its arch list includes your GPU, and {runs}"
    if "torch-cpu-on-gpu" in codes:
        return f"it uses your GPU, and {runs}"
    return runs or "it fits this machine"


def _driver_alternative(x: Machine, codes: set[str]) -> tuple[str, Version | None]:
    """Keeping the installed build with a newer driver, where that would work."""
    fit = x.driver_fit
    if "driver-too-old" not in codes or fit is None or x.arch_misses:
        return "", None
    need = fit.floor.full or fit.floor.minimum
    return f"; or upgrade the NVIDIA driver to >= {need} for the CUDA {x.torch_cuda} build", need


def _no_better_driver(x: Machine) -> str:
    if not x.arch_misses or x.torch_cuda is None:
        return ""
    sms = ", ".join(sorted({g.capability.sm for g in x.arch_misses}))
    return f"; a newer driver would not help: the CUDA {x.torch_cuda} build has no {sms} kernels"


def _gpu_minimum(x: Machine) -> Version | None:
    """The oldest driver that knows every GPU here."""
    needs = [w.minimum for c in x.caps if (w := x.m.gpu_driver(c)) and w.minimum]
    return max(needs, default=None)


def _gpu_fix(x: Machine, codes: set[str]) -> tuple[Fix, Target | None]:
    result = check(x.m, x.request())
    fits = [mt for mt in result.matches if mt.candidate.build is not None]
    if fits:
        best = min(fits, key=lambda mt: _rank(x, mt))
        tail, need = _driver_alternative(x, codes)
        release, cuda = best.candidate.release, best.candidate.cuda
        return _install(x, release, cuda, _why(codes, x, best), tail or _no_better_driver(x), need)
    # nothing runs with this driver: what would with a newer one?
    without = [mt for mt in check(x.m, x.request(driver=False)).matches if mt.candidate.build]
    if without:
        best = min(without, key=lambda mt: _rank(x, mt))
        release, cuda = best.candidate.release, best.candidate.cuda
        floor = x.m.driver_floor(cuda)
        build_need = (floor.full or floor.minimum) if floor else None
        need = max((v for v in (_gpu_minimum(x), build_need) if v), default=None)
        window = gpu_driver_fit(x.m, x.request())
        why = f" ({window.why})" if window.why else ""
        if release is x.release and cuda == x.torch_cuda:  # the installed build, newer driver
            return Fix(None, need, None, f"upgrade the NVIDIA driver to >= {need}{why}"), None
        fix, target = _install(
            x, release, cuda, f"it runs on your GPU with a driver >= {need}", driver_min=need
        )
        message = f"upgrade the NVIDIA driver to >= {need}, then {fix.message}{why}"
        return Fix(fix.target, need, fix.command, message), target
    release = _cpu_release(x)
    labels = ", ".join(g.capability.sm for g in x.gpus if g.capability)
    return _install(x, release, None, f"no PyTorch build of the matrix runs on {labels}")


def _fix(x: Machine, findings: list[Finding]) -> tuple[Fix, Target | None]:
    codes = {f.code for f in findings if f.severity in ("error", "warning")}
    t, drv = x.torch, x.report.driver
    if "interpreter" in codes:
        return Fix(message="point --python-exe at the Python interpreter to inspect"), None
    if not codes & NEEDS_ANOTHER_BUILD:
        if "driver-minor-compat" in codes and x.driver_fit is not None:
            need = x.driver_fit.floor.full
            return Fix(
                None,
                need,
                None,
                f"optional: a driver >= {need} removes the minor-version-compatibility caveats",
            ), None
        if drv is None and t is not None and not t.cuda:
            return Fix(
                message="nothing to do: no GPU here, and torch is the CPU build (the cpu target)"
            ), None
        return Fix(), None
    if drv is None or not x.caps:
        return _install(x, _cpu_release(x), None, "no GPU here, so the CPU build is all you need")
    return _gpu_fix(x, codes)


# -- the diagnosis ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Diagnosis:
    report: MachineReport
    findings: tuple[Finding, ...]
    fix: Fix
    recommended: Target | None = None

    @property
    def verdict(self) -> str:
        sev = {f.severity for f in self.findings}
        if "error" in sev:
            return BROKEN
        return WARNINGS if "warning" in sev else WORKS

    def to_json(self) -> dict:
        r = self.report
        return {
            "schema": SCHEMA,
            "verdict": self.verdict,
            "machine": {
                "platform": r.platform,
                "python": r.python.raw,
                "driver": None
                if r.driver is None
                else {
                    "version": r.driver.version.raw,
                    "source": r.driver.source,
                    "cuda_umd": r.driver.cuda_umd.raw if r.driver.cuda_umd else None,
                },
                "gpus": [
                    {
                        "index": g.index,
                        "name": g.name,
                        "capability": f"{g.capability.major}.{g.capability.minor}"
                        if g.capability
                        else None,
                    }
                    for g in r.gpus
                ],
                "torch": None if r.torch is None else _torch_json(r),
                "torch_error": r.torch_error,
                "nvcc": {"version": r.nvcc.version.raw, "path": r.nvcc.path} if r.nvcc else None,
            },
            "findings": [f.to_json() for f in self.findings],
            "fix": {
                "target": self.fix.target,
                "driver_min": self.fix.driver_min.raw if self.fix.driver_min else None,
                "command": self.fix.command,
                "message": self.fix.message,
            },
        }


def _torch_json(r: MachineReport) -> dict:
    t = r.torch
    assert t is not None
    env = t.environment
    return {
        "version": t.version,
        "cuda": t.cuda,
        "cudnn": t.cudnn,
        "arch_list": list(t.arch_list),
        "cuda_available": t.cuda_available,
        "torchvision": t.torchvision,
        "installer": t.installer,
        "libraries": [
            {
                "name": lib.name,
                "path": lib.path,
                "version": lib.version,
                "distribution": lib.distribution,
                "origin": lib.origin,
            }
            for lib in t.libraries
        ],
        "cuda_home": t.cuda_home,
        "cuda_home_nvcc": r.cuda_home_nvcc.version.raw if r.cuda_home_nvcc else None,
        "environment": None
        if env is None
        else {"kind": env.kind, "prefix": env.prefix, "nix_shell": env.nix_shell},
    }


def _recommended(x: Machine) -> Target | None:
    """The target that fits this machine best, whatever is installed."""
    if x.report.driver is None or not x.caps:
        return next((t for t in x.m.targets.values() if t.is_cpu), None)
    fits = [mt for mt in check(x.m, x.request()).matches if mt.target and mt.candidate.build]
    if not fits:
        return None
    return x.m.target(min(fits, key=lambda mt: _rank(x, mt)).target)


def diagnose(m: Matrix, report: MachineReport) -> Diagnosis:
    """Every doctor rule over the machine, then the fix."""
    x = Machine(m, report)
    findings = [f for rule in DOCTOR_RULES for f in rule(x)]
    fix, target = _fix(x, findings)
    return Diagnosis(report, tuple(findings), fix, target or _recommended(x))


def format_diagnosis(d: Diagnosis) -> str:
    verdict = {WORKS: "works", WARNINGS: "works, with warnings", BROKEN: "broken"}[d.verdict]
    lines = [f"verdict: {verdict}"]
    for f in d.findings:
        lines.append(f"  {f.severity:<7}  {f.message}")
    lines.append(f"fix: {d.fix.message}")
    if d.fix.command:
        lines.append(f"  {d.fix.command}")
    return "\n".join(lines)
