"""The doctor: from a probed machine and the matrix, a verdict and the fix.

Pure: ``diagnose(matrix, report)`` reads a :class:`lockgen.probe.MachineReport` and the
matrix, and touches nothing.

Verdicts: ``works``, ``works-with-warnings``, ``broken``. Each finding has a ``severity``
(``ok`` / ``note`` / ``warning`` / ``error``), a stable ``code`` and a message. The fix names
the target to install (from ``envs/targets.toml``), the driver needed, and a command.

JSON output (``lockgen doctor --json``; keys are stable, ``schema`` changes if they do)::

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
                  "arch_list": ["sm_75", ...], "cuda_available": false} | null,
        "torch_error": "" | "ModuleNotFoundError: ...",
        "nvcc": {"version": "13.0"} | null
      },
      "findings": [{"severity": "...", "code": "...", "message": "..."}],
      "fix": {"target": "cu130" | null, "driver_min": "580.65.06" | null,
              "command": "pip install ..." | null, "message": "..."}
    }

Finding codes: driver, no-driver, gpu, no-gpus, probe, nvidia-smi-kmd, torch, torch-missing,
torch-unknown, torch-cpu-on-gpu, torch-cuda-no-driver, driver-too-old,
driver-minor-compat, gpu-arch, gpu-ptx, cuda-unavailable, cudnn-mismatch,
python-unsupported, nvcc, nvcc-mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

from lockgen.errors import LockgenError
from lockgen.matrix import Matrix, Target
from lockgen.probe import MachineReport, TorchInfo
from lockgen.versions import Capability, Version, parse_cuda, runs_on

SCHEMA = 1
WORKS, WARNINGS, BROKEN = "works", "works-with-warnings", "broken"
SEVERITIES = ("ok", "note", "warning", "error")


@dataclass(frozen=True)
class Finding:
    severity: str
    code: str
    message: str


@dataclass(frozen=True)
class Fix:
    target: str | None = None
    driver_min: Version | None = None
    command: str | None = None
    message: str = "nothing to do"


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
        t = r.torch
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
                "torch": None
                if t is None
                else {
                    "version": t.version,
                    "cuda": t.cuda,
                    "cudnn": t.cudnn,
                    "arch_list": list(t.arch_list),
                    "cuda_available": t.cuda_available,
                },
                "torch_error": r.torch_error,
                "nvcc": {"version": r.nvcc.version.raw} if r.nvcc else None,
            },
            "findings": [
                {"severity": f.severity, "code": f.code, "message": f.message}
                for f in self.findings
            ],
            "fix": {
                "target": self.fix.target,
                "driver_min": self.fix.driver_min.raw if self.fix.driver_min else None,
                "command": self.fix.command,
                "message": self.fix.message,
            },
        }


def _torch_archs(t: TorchInfo) -> tuple[Capability, ...]:
    """``sm_86`` → 8.6; ``compute_120`` → 12.0 with PTX."""
    out = []
    for a in t.arch_list:
        try:
            cap = Capability.parse(a)
        except LockgenError:
            continue
        out.append(Capability(cap.major, cap.minor, cap.specific, a.startswith("compute")))
    return tuple(out)


def recommend(m: Matrix, report: MachineReport) -> tuple[Target | None, Version | None]:
    """The target for this machine and, when the driver holds it back, the driver needed.

    Among the targets whose arch list runs every GPU: the newest CUDA the driver supports
    fully, else the newest it supports through minor version compatibility, else ``cpu``
    plus the driver the best GPU target would need.
    """
    targets = list(m.targets.values())
    cpu = next((t for t in targets if t.is_cpu), None)
    caps = [g.capability for g in report.gpus if g.capability is not None]
    if report.driver is None or not report.gpus:
        return cpu, None
    fitting = [
        t
        for t in targets
        if not t.is_cpu and t.arch_list is not None and all(t.arch_list.runs_on(c) for c in caps)
    ]
    if not fitting:
        return cpu, None

    def key(t: Target) -> tuple:
        return (t.cuda, t.release.torch)

    by_status: dict[str, list[Target]] = {"ok": [], "minor-version-compat": [], "too-old": []}
    for t in fitting:
        assert t.driver_floor is not None
        by_status[t.driver_floor.status(report.driver.version)].append(t)
    if by_status["ok"]:
        return max(by_status["ok"], key=key), None
    if by_status["minor-version-compat"]:
        return max(by_status["minor-version-compat"], key=key), None
    best = max(fitting, key=key)
    assert best.driver_floor is not None
    return cpu, best.driver_floor.full or best.driver_floor.minimum


def diagnose(m: Matrix, report: MachineReport) -> Diagnosis:
    findings: list[Finding] = []

    def add(sev: str, code: str, msg: str) -> None:
        findings.append(Finding(sev, code, msg))

    drv = report.driver
    t = report.torch
    torch_cuda = parse_cuda(t.cuda) if t and t.cuda else None
    target, driver_needed = recommend(m, report)

    # -- driver and GPUs
    if drv is None:
        add(
            "note",
            "no-driver",
            "no NVIDIA GPU driver found (looked at /sys/module/nvidia/version, "
            "/proc/driver/nvidia/version and nvidia-smi): this machine runs PyTorch on CPU",
        )
    else:
        umd = f", supports CUDA up to {drv.cuda_umd}" if drv.cuda_umd else ""
        add("ok", "driver", f"NVIDIA driver {drv.version} (from {drv.source}{umd})")
        if drv.kmd_banner:
            add(
                "note",
                "nvidia-smi-kmd",
                "nvidia-smi prints the R610+ banner ('KMD Version'); tools that parse "
                "'Driver Version' (torch.utils.collect_env) will not find the driver",
            )
        for g in report.gpus:
            cap = (
                f"compute capability {g.capability.major}.{g.capability.minor}"
                if g.capability
                else "compute capability unknown"
            )
            add("ok" if g.capability else "warning", "gpu", f"GPU {g.index}: {g.name}, {cap}")
        if not report.gpus:
            add(
                "warning",
                "no-gpus",
                "the driver is loaded but no GPU could be listed (nvidia-smi missing or "
                "failing, and torch sees none)",
            )
    for p in report.problems:
        add("note", "probe", p)

    # -- torch
    release = None
    if t is None:
        add("error", "torch-missing", f"torch is not importable ({report.torch_error})")
    else:
        build = f"CUDA {t.cuda} build" if t.cuda else "CPU build"
        cudnn = f", cuDNN {t.cudnn}" if t.cudnn else ""
        archs = f", archs {' '.join(t.arch_list)}" if t.arch_list else ""
        add("ok", "torch", f"torch {t.version} ({build}{cudnn}{archs})")
        try:
            release = m.find_release(t.version)
        except LockgenError:
            release = None
        if release is None:
            add("note", "torch-unknown", f"torch {t.version} is not in the matrix")

        if drv is None and t.is_cuda_build:
            add(
                "warning",
                "torch-cuda-no-driver",
                f"torch is a CUDA {t.cuda} build but there is no NVIDIA driver: it runs on "
                "CPU only, and the cpu target is much smaller",
            )
        elif drv is not None and report.gpus and not t.is_cuda_build:
            add(
                "warning",
                "torch-cpu-on-gpu",
                "torch is a CPU build on a machine with an NVIDIA GPU: the GPU is unused",
            )

        driver_ok = True
        if drv is not None and torch_cuda is not None:
            floor = m.driver_floor(torch_cuda)
            if floor is None:
                add("note", "driver", f"the matrix has no driver floor for CUDA {torch_cuda}")
            else:
                status = floor.status(drv.version)
                if status == "too-old":
                    driver_ok = False
                    add(
                        "error",
                        "driver-too-old",
                        f"driver {drv.version} is too old for torch's CUDA {torch_cuda}: it "
                        f"needs >= {floor.full or floor.minimum} (>= {floor.minimum} through "
                        "minor version compatibility)",
                    )
                elif status == "minor-version-compat":
                    add(
                        "warning",
                        "driver-minor-compat",
                        f"driver {drv.version} is older than CUDA {torch_cuda}'s toolkit "
                        f"driver {floor.full}: works through minor version compatibility, "
                        "PTX JIT may fail",
                    )

        arch_ok = True
        if torch_cuda is not None and report.gpus:
            code_archs = _torch_archs(t)
            if not code_archs and release is not None:
                listed = m.arch_list(release.torch, torch_cuda, report.platform)
                code_archs = listed.archs if listed else ()
            for g in report.gpus:
                if g.capability is None or not code_archs:
                    continue
                if not any(runs_on(a, g.capability) for a in code_archs):
                    arch_ok = False
                    add(
                        "error",
                        "gpu-arch",
                        f"GPU {g.index} ({g.name}, {g.capability.sm}) is not in torch's arch "
                        f"list ({' '.join(t.arch_list) or 'from the matrix'}): torch cannot "
                        "run on it",
                    )
                elif not any(
                    runs_on(Capability(a.major, a.minor, a.specific), g.capability)
                    for a in code_archs
                ):
                    add(
                        "warning",
                        "gpu-ptx",
                        f"GPU {g.index} ({g.capability.sm}) runs torch only through PTX JIT",
                    )
        if (
            drv is not None
            and report.gpus
            and t.is_cuda_build
            and driver_ok
            and arch_ok
            and not t.cuda_available
        ):
            add(
                "warning",
                "cuda-unavailable",
                "torch.cuda.is_available() is False although driver and GPU fit: check "
                "CUDA_VISIBLE_DEVICES, container GPU access and /dev/nvidia*",
            )

        if release is not None and torch_cuda is not None and t.cudnn:
            b = release.build(torch_cuda)
            loaded = Version.parse(t.cudnn, "cuDNN version")
            if b is not None and b.cudnn is not None and not b.cudnn_matches(loaded):
                add(
                    "warning",
                    "cudnn-mismatch",
                    f"torch loads cuDNN {t.cudnn}, but torch {release.torch} + CUDA "
                    f"{torch_cuda} ships {b.cudnn}: another cuDNN on the library path wins",
                )
        if release is not None and not release.supports_python(report.python):
            add(
                "warning",
                "python-unsupported",
                f"Python {report.python.minor} is not supported by torch {release.torch} "
                f"({', '.join(p.raw for p in release.python)})",
            )

    if report.nvcc is not None:
        add("ok", "nvcc", f"nvcc {report.nvcc.version}")
        if torch_cuda is not None and report.nvcc.version.major != torch_cuda.major:
            add(
                "warning",
                "nvcc-mismatch",
                f"nvcc is CUDA {report.nvcc.version} but torch is built with CUDA "
                f"{torch_cuda}: C++/CUDA extensions will not build against it",
            )

    return Diagnosis(
        report, tuple(findings), _fix(m, report, findings, target, driver_needed), target
    )


def _fix(
    m: Matrix,
    report: MachineReport,
    findings: list[Finding],
    target: Target | None,
    driver_needed: Version | None,
) -> Fix:
    codes = {f.code for f in findings if f.severity in ("error", "warning")}
    cmd = target.pip_install_command() if target else None
    name = target.name if target else None
    t = report.torch
    drv = report.driver
    if "driver-too-old" in codes and t is not None and t.cuda:
        floor = m.driver_floor(parse_cuda(t.cuda))  # type: ignore[arg-type]
        need = floor.full or floor.minimum if floor else None
        alt = f", or install target {name} which this driver runs" if name else ""
        return Fix(
            name,
            need,
            cmd,
            f"upgrade the NVIDIA driver to >= {need} for torch's CUDA {t.cuda}{alt}",
        )
    if codes & {"torch-missing", "torch-cpu-on-gpu", "gpu-arch", "torch-cuda-no-driver"}:
        if target is None:
            return Fix(message="no target of envs/targets.toml fits this machine")
        why = {
            "gpu-arch": "its arch list includes your GPU",
            "torch-cpu-on-gpu": "it uses your GPU",
            "torch-cuda-no-driver": "no GPU here: the CPU build is all you need",
        }
        reason = next(
            (
                why[c]
                for c in ("gpu-arch", "torch-cpu-on-gpu", "torch-cuda-no-driver")
                if c in codes
            ),
            "",
        )
        extra = (
            f"; with a driver >= {driver_needed} a CUDA target would fit" if driver_needed else ""
        )
        return Fix(
            name,
            driver_needed,
            cmd,
            f"install target {name}" + (f" ({reason})" if reason else "") + extra,
        )
    if "driver-minor-compat" in codes and t is not None and t.cuda and drv is not None:
        floor = m.driver_floor(parse_cuda(t.cuda))  # type: ignore[arg-type]
        need = floor.full if floor else None
        return Fix(
            None,
            need,
            None,
            f"optional: a driver >= {need} removes the minor-version-compatibility caveats",
        )
    if drv is None and t is not None and not t.cuda:
        return Fix(
            message="nothing to do: no GPU here, and torch is the CPU build (the cpu target)"
        )
    return Fix()


def format_diagnosis(d: Diagnosis) -> str:
    verdict = {WORKS: "works", WARNINGS: "works, with warnings", BROKEN: "broken"}[d.verdict]
    lines = [f"verdict: {verdict}"]
    for f in d.findings:
        lines.append(f"  {f.severity:<7}  {f.message}")
    lines.append(f"fix: {d.fix.message}")
    if d.fix.command:
        lines.append(f"  {d.fix.command}")
    return "\n".join(lines)
