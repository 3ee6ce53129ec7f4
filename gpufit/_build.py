"""How to build gpufit's compiled operators: find the CUDA toolkit, pick architectures, list
sources and flags. Used by setup.py (ahead-of-time build) and by gpufit._backend (JIT build),
so both make the same decisions. Imports torch lazily and nothing from gpufit itself.

CUDA kernels are built only when something asks for them: TORCH_CUDA_ARCH_LIST, or a visible
GPU (its own architecture only). Otherwise the build is CPU-only and says how to get CUDA.

Run as a script, it shows a build's progress (see ``watch_build``); scripts/setup.sh does
    python gpufit/_build.py --log .venv/gpufit-build.log -- pip install ... -e .
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

CSRC = Path(__file__).resolve().parent.parent / "csrc"


class BuildConfigError(RuntimeError):
    """The requested build cannot be made; the message says why and what to change."""


@dataclass(frozen=True)
class BuildPlan:
    with_cuda: bool
    summary: str
    cuda_home: Path | None = None
    cuda_version: str | None = None
    arch_list: str = ""  # TORCH_CUDA_ARCH_LIST form: "7.5;8.0;9.0+PTX"
    include_dirs: tuple[Path, ...] = (CSRC,)

    @property
    def arch_tag(self) -> str:
        """The arch list without separators that a shell would split on."""
        return self.arch_list.replace(";", ",")


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False).stdout


def _toolkit_root_from_nvcc(nvcc: str) -> Path | None:
    """The toolkit root of an nvcc, also when the nvcc on PATH is a wrapper script.

    nvcc's dry run prints the folder it really lives in (`#$ TOP=<root>/bin/..`), which is
    right where resolving the path of a wrapper script would land one level off.
    """
    out = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match:
        root = Path(match.group(1).strip()).resolve()
        if (root / "bin" / "nvcc").is_file():
            return root
    real = Path(nvcc).resolve()
    if real.parent.name == "bin" and (real.parent.parent / "include" / "cuda.h").is_file():
        return real.parent.parent
    return None


def find_cuda_home() -> tuple[Path | None, str]:
    """(toolkit root or None, how it was found or why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            root = Path(value)
            if not (root / "bin" / "nvcc").is_file():
                raise BuildConfigError(
                    f"{var}={value} has no bin/nvcc; point {var} at a CUDA toolkit root "
                    "(the folder holding bin/nvcc) or unset it"
                )
            return root.resolve(), f"{var}={value}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root_from_nvcc(nvcc)
        if root is not None:
            return root, f"nvcc on PATH ({nvcc} -> {root})"
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").is_file():
        return default.resolve(), f"{default}"
    return None, "no nvcc on PATH, CUDA_HOME unset and no /usr/local/cuda"


def nvcc_version(cuda_home: Path) -> str:
    match = re.search(r"release (\d+\.\d+)", _run([str(cuda_home / "bin" / "nvcc"), "--version"]))
    if not match:
        raise BuildConfigError(f"cannot read the version of {cuda_home / 'bin' / 'nvcc'}")
    return match.group(1)


def nvcc_archs(cuda_home: Path) -> set[str]:
    """Compute capabilities this nvcc can compile for, as "8.0", "9.0", ..."""
    out = _run([str(cuda_home / "bin" / "nvcc"), "--list-gpu-arch"])
    return {f"{int(m) // 10}.{int(m) % 10}" for m in re.findall(r"compute_(\d+)", out)}


def _arch_key(arch: str) -> tuple[int, int]:
    major, minor = arch.split("+")[0].split(".")
    return int(major), int(minor)


# Printed when nothing asks for CUDA kernels: how to get them.
CUDA_BUILD_HINT = (
    "for the CUDA kernels too: TORCH_CUDA_ARCH_LIST=8.0 ./scripts/setup.sh "
    "(a visible GPU selects its own arch)"
)


def requested_arch_list() -> tuple[str, str] | None:
    """(TORCH_CUDA_ARCH_LIST, where it came from), or None when nothing asks for CUDA kernels.

    TORCH_CUDA_ARCH_LIST if set, else the architectures of the visible GPUs. With neither, a
    build would compile CUDA kernels this machine cannot run (minutes per architecture), so the
    build is CPU-only and says how to ask for CUDA.
    """
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return os.environ["TORCH_CUDA_ARCH_LIST"].strip(), "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():
        caps = sorted(
            {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        )
        return ";".join(f"{a}.{b}" for a, b in caps), "the visible GPUs"
    return None


# Names torch.utils.cpp_extension accepts in TORCH_CUDA_ARCH_LIST besides numbers.
_ARCH_NAMES = {"Maxwell", "Pascal", "Volta", "Turing", "Ampere", "Ada", "Hopper"}
_ARCH_NUMBER = re.compile(r"(\d+)\.(\d+)[af]?(\+PTX)?")


def check_arch_list(arch_list: str, source: str, supported: set[str], version: str) -> None:
    """Refuse what torch or this nvcc cannot build, naming it: torch's build would otherwise
    stop with a traceback, or nvcc with a fatal error minutes into the build."""
    wanted = [a for a in re.split(r"[;\s]+", arch_list) if a]
    problem = None
    if not wanted:
        problem = "names no architecture"
    bad = [a for a in wanted if not (_ARCH_NUMBER.fullmatch(a) or a.split("+")[0] in _ARCH_NAMES)]
    if bad:
        problem = f"{', '.join(bad)} is not an architecture like 8.0, 9.0a, 12.0+PTX or Ampere"
    numbers = [m.group(1, 2) for m in map(_ARCH_NUMBER.fullmatch, wanted) if m]
    unsupported = [f"{a}.{b}" for a, b in numbers if supported and f"{a}.{b}" not in supported]
    if not problem and unsupported:
        known = ", ".join(sorted(supported, key=_arch_key))
        problem = f"nvcc {version} cannot compile for {', '.join(unsupported)} (it targets {known})"
    if problem:
        raise BuildConfigError(f"archs {arch_list!r} (from {source}): {problem}")


def plan_build() -> BuildPlan:
    import torch

    if os.environ.get("GPUFIT_FORCE_CPU", "") not in ("", "0"):
        return BuildPlan(False, "CPU-only build (GPUFIT_FORCE_CPU is set)")
    if torch.version.cuda is None:
        return BuildPlan(False, f"CPU-only build (torch {torch.__version__} is a CPU build)")
    requested = requested_arch_list()
    if requested is None:
        return BuildPlan(
            False,
            f"CPU-only build (no GPU visible, TORCH_CUDA_ARCH_LIST unset); {CUDA_BUILD_HINT}",
        )
    arch_list, arch_source = requested
    cuda_home, how = find_cuda_home()
    if cuda_home is None:
        return BuildPlan(False, f"CPU-only build ({how})")
    version = nvcc_version(cuda_home)
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise BuildConfigError(
            f"the CUDA toolkit at {cuda_home} is {version} but torch {torch.__version__} was "
            f"built with CUDA {torch.version.cuda}; the majors must match. Point CUDA_HOME at a "
            f"CUDA {torch.version.cuda.split('.')[0]}.x toolkit, or set GPUFIT_FORCE_CPU=1"
        )
    check_arch_list(arch_list, arch_source, nvcc_archs(cuda_home), version)
    return BuildPlan(
        True,
        f"CUDA build with nvcc {version} from {how}, archs {arch_list} (from {arch_source})",
        cuda_home=cuda_home,
        cuda_version=version,
        arch_list=arch_list,
    )


def apply(plan: BuildPlan) -> None:
    """Make torch.utils.cpp_extension use the plan's toolkit and architectures."""
    if not plan.with_cuda:
        return
    os.environ["CUDA_HOME"] = str(plan.cuda_home)
    os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = str(plan.cuda_home)  # read once at import time


def sources(with_cuda: bool) -> list[Path]:
    # CPU kernels, autograd and registration in csrc/, CUDA kernels in csrc/cuda/ (an op's .cpp
    # and .cu share a stem, and setuptools names objects by stem within a folder).
    found = sorted(CSRC.glob("*.cpp"))
    if with_cuda:
        found += sorted((CSRC / "cuda").glob("*.cu"))
    return found


def defines(plan: BuildPlan) -> list[str]:
    # The arch list goes in unquoted and is stringified in C++: no quoting survives both the
    # setuptools and the JIT ninja paths the same way.
    archs = plan.arch_tag or "none"
    return [f"-DGPUFIT_WITH_CUDA={int(plan.with_cuda)}", f"-DGPUFIT_CUDA_ARCHS_TOKENS={archs}"]


def compile_args(plan: BuildPlan) -> dict[str, list[str]]:
    # -g0: Python's own flags ask for debug info, which makes each C++ compile ~40 % slower
    # (measured 37 s -> 22 s for linear_ce.cpp on one core); these flags come after Python's.
    args = {"cxx": ["-O3", "-g0", *defines(plan)]}
    if plan.with_cuda:
        args["nvcc"] = ["-O3", "-lineinfo"]
    return args


# ---------------------------------------------------------------- progress of a build

# ninja prints "[n/m] <command>" as each compile finishes (on a pipe it never redraws a line)
_NINJA_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]\s+(\S+)(.*)$")
_SOURCE_SUFFIXES = (".cpp", ".cc", ".cxx", ".c", ".cu")


def progress_line(line: str, root: Path = CSRC.parent) -> str | None:
    """What a person should see of one line of build output: ninja's step as "[n/m] nvcc
    csrc/cuda/x.cu", gpufit's own one-line plan, or nothing (kept in the log only)."""
    line = line.rstrip()
    step = _NINJA_STEP.match(line)
    if step:
        done, total, program, rest = step.groups()
        sources = [t for t in rest.split() if t.endswith(_SOURCE_SUFFIXES)]
        what = sources[-1] if sources else program
        try:
            what = str(Path(what).resolve().relative_to(root.resolve()))
        except ValueError:
            pass
        tool = "nvcc" if Path(program).name == "nvcc" else "c++"
        return f"[{done}/{total}] {tool} {what}"
    text = line.strip()
    if text.startswith("gpufit: "):
        return text.removeprefix("gpufit: ")
    return None


def _failure_excerpt(lines: list[str], limit: int = 40) -> list[str]:
    """The compiler's complaint: from ninja's first FAILED line on, else the last lines."""
    for i, line in enumerate(lines):
        if "FAILED:" in line:
            return lines[i : i + limit]
    return lines[-limit // 2 :]


def watch_build(cmd: list[str], log: Path, out: TextIO = sys.stdout, tick_s: float = 15.0) -> int:
    """Run a build command, keep its whole output in ``log`` and show its progress on ``out``:
    what each compile step finished, gpufit's plan line, and an elapsed-time line whenever
    nothing was shown for ``tick_s`` seconds. On failure, shows the compiler's error and where
    the full log is. Returns the command's exit status."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    lines: queue.Queue[str | None] = queue.Queue()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    shown: set[str] = set()
    steps = ""
    last_shown = start

    def show(text: str) -> None:
        nonlocal last_shown
        out.write(f"  {time.monotonic() - start:4.0f} s  {text}\n")
        out.flush()
        last_shown = time.monotonic()

    with log.open("w") as f:
        while True:
            try:
                line = lines.get(timeout=max(0.05, tick_s - (time.monotonic() - last_shown)))
            except queue.Empty:
                show(f"still running{f' ({steps} compiled)' if steps else ''}")
                continue
            if line is None:
                break
            f.write(line)
            seen.append(line.rstrip("\n"))
            text = progress_line(line)
            if text is None or text in shown:
                continue
            shown.add(text)
            step = _NINJA_STEP.match(line)
            if step:
                steps = f"{step.group(1)}/{step.group(2)}"
            show(text)
    status = proc.wait()
    elapsed = time.monotonic() - start
    if status == 0:
        out.write(f"  done in {elapsed:.0f} s (full log: {log})\n")
    else:
        out.write("".join(f"  | {line}\n" for line in _failure_excerpt(seen)))
        out.write(f"  failed (exit status {status}) after {elapsed:.0f} s; full log: {log}\n")
    out.flush()
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python gpufit/_build.py",
        description="Run a build or install command and show its progress; the full output "
        "goes to --log.",
    )
    parser.add_argument("--log", type=Path, required=True, help="file for the full output")
    parser.add_argument("--tick", type=float, default=15.0, help="seconds between time lines")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the build command after --")
    return watch_build(cmd, args.log, tick_s=args.tick)


if __name__ == "__main__":
    sys.exit(main())
