"""Probe this machine: NVIDIA driver, GPUs, the installed torch and what it loaded, the
toolkit that would build extensions, the Python environment.

The only part of lockgen's doctor flow that touches the machine, and every touch is
injectable so tests can feed recorded outputs:

* ``root``: the folder that stands for ``/`` when reading ``/sys`` and ``/proc``;
* ``run``: a command runner ``run(argv, timeout) -> CommandResult`` used for ``nvidia-smi``,
  ``nvcc`` and the torch probe; a missing binary gives ``CommandResult.not_found``, a hang
  gives ``timed_out`` — never an exception;
* ``torch_info``: optionally, a callable returning :class:`TorchInfo` directly.

Public API
----------
``Prober(root="/", run=run_command, python_exe=sys.executable, python_version=None,
platform=None, torch_info=None, timeout=10.0, which=shutil.which).probe() -> MachineReport``
``parse_driver_file(text)``, ``parse_nvidia_smi_banner(text)``, ``parse_gpu_query(text)``,
``parse_gpu_list(text)``, ``parse_nvcc(text)``, ``cudnn_from_int(n)``,
``parse_torch_probe(text)``, ``library_version(name, raw)``, ``environment_from(raw)`` — the
parsers, pure.

The torch probe runs in a child of the inspected interpreter: it imports torch, touches cuDNN
and cuBLAS, and reports from its own ``/proc/self/maps`` which libcudart / libcublas /
libcublasLt / libcudnn / libnccl it really mapped (path, version from the library itself,
the pip wheel that installed the file), torch's ``CUDA_HOME`` (the toolkit extension builds
use) and the facts that tell venv / uv / conda / pixi / Nix environments apart.

Driver lookup order (as uv does it): ``/sys/module/nvidia/version``, then
``/proc/driver/nvidia/version``, then the ``nvidia-smi`` banner, which reads both the old
``Driver Version: … CUDA Version: …`` and the R610+ ``KMD Version: … CUDA UMD Version: …``.
"""

from __future__ import annotations

import json
import os
import platform as _platform
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lockgen.errors import LockgenError
from lockgen.versions import Capability, Version

SYS_DRIVER = "sys/module/nvidia/version"
PROC_DRIVER = "proc/driver/nvidia/version"
NVIDIA_SMI = ("nvidia-smi",)
NVIDIA_SMI_QUERY = ("nvidia-smi", "--query-gpu=index,name,compute_cap", "--format=csv,noheader")
NVIDIA_SMI_LIST = ("nvidia-smi", "-L")
NVCC = ("nvcc", "--version")


# what any probed command prints (nvidia-smi on a 16-GPU box, the torch probe) is a few KiB
MAX_COMMAND_OUTPUT = 1 << 20


@dataclass(frozen=True)
class CommandResult:
    """The outcome of one command. ``returncode`` is None when it could not run, was stopped
    for taking too long (``timed_out``) or for printing more than
    :data:`MAX_COMMAND_OUTPUT` bytes (``overflowed``)."""

    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    not_found: bool = False
    timed_out: bool = False
    overflowed: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0


Runner = Callable[[Sequence[str], float], CommandResult]


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass


def run_command(argv: Sequence[str], timeout: float) -> CommandResult:
    """Run a command with a timeout and a cap on what it prints; a missing binary, a hang or
    endless output is a result, not a crash. The command runs in its own process group, so
    stopping it stops what it started too."""
    if shutil.which(argv[0]) is None:
        return CommandResult(None, not_found=True)
    try:
        p = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return CommandResult(None, stderr=exc.strerror or str(exc), not_found=True)
    out: dict[str, bytes] = {}
    overflow = threading.Event()

    def pump(name: str, stream) -> None:
        data = bytearray()
        while chunk := stream.read1(65536):
            data += chunk
            if len(data) > MAX_COMMAND_OUTPUT:
                overflow.set()
                _kill_group(p)
                break
        stream.close()
        out[name] = bytes(data[:MAX_COMMAND_OUTPUT])

    pumps = [
        threading.Thread(target=pump, args=(n, st), daemon=True)
        for n, st in (("stdout", p.stdout), ("stderr", p.stderr))
    ]
    for t in pumps:
        t.start()
    timed_out = False
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(p)
        p.wait()
    for t in pumps:
        t.join(5)
    if timed_out or overflow.is_set():
        return CommandResult(None, timed_out=timed_out, overflowed=overflow.is_set())
    text = {k: v.decode("utf-8", errors="replace") for k, v in out.items()}
    return CommandResult(p.returncode, text.get("stdout", ""), text.get("stderr", ""))


@dataclass(frozen=True)
class DriverInfo:
    version: Version
    source: str
    cuda_umd: Version | None = None
    kmd_banner: bool = False


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    capability: Capability | None
    capability_source: str = ""


PIP, CONDA, NIX, SYSTEM = "pip", "conda", "nix", "system"


@dataclass(frozen=True)
class LoadedLibrary:
    """A CUDA library the torch process mapped: ``name`` (cudart, cublas, cublasLt, cudnn,
    nccl), ``path``, ``version`` (as the library reports it), ``distribution`` (the pip wheel
    that installed the file) and ``origin``: pip, conda, nix or system."""

    name: str
    path: str
    version: str | None
    distribution: str | None
    origin: str


@dataclass(frozen=True)
class PythonEnvironment:
    """The environment the inspected interpreter runs in: ``kind`` is venv, uv, conda,
    pixi, nix or system; ``nix_shell`` when inside ``nix develop`` / ``nix-shell``."""

    kind: str
    prefix: str
    nix_shell: bool = False

    def describe(self) -> str:
        names = {
            "uv": "uv virtual environment",
            "venv": "virtual environment",
            "conda": "conda environment",
            "pixi": "pixi environment",
            "nix": "Nix store Python",
            "system": "system Python",
        }
        shell = ", inside a Nix shell" if self.nix_shell and self.kind != "nix" else ""
        return f"{names.get(self.kind, self.kind)} at {self.prefix}{shell}"


@dataclass(frozen=True)
class TorchInfo:
    version: str
    cuda: str | None
    cudnn: str | None = None
    arch_list: tuple[str, ...] = ()
    cuda_available: bool = False
    devices: tuple[tuple[str, str], ...] = ()
    torchvision: str | None = None
    libraries: tuple[LoadedLibrary, ...] = ()
    cuda_home: str | None = None
    environment: PythonEnvironment | None = None
    installer: str | None = None

    @property
    def from_wheel(self) -> bool:
        """Installed by pip or uv (so its CUDA libraries should come from wheels)."""
        return (self.installer or "").lower() in ("pip", "uv")

    @property
    def is_cuda_build(self) -> bool:
        return self.cuda is not None

    @property
    def base_version(self) -> str:
        """``2.14.1+cu130`` → ``2.14.1``."""
        return self.version.split("+")[0]

    def library(self, name: str) -> LoadedLibrary | None:
        return next((lib for lib in self.libraries if lib.name == name), None)


@dataclass(frozen=True)
class NvccInfo:
    version: Version
    path: str | None = None


@dataclass(frozen=True)
class MachineReport:
    platform: str
    python: Version
    driver: DriverInfo | None
    gpus: tuple[GpuInfo, ...]
    torch: TorchInfo | None
    torch_error: str = ""
    nvcc: NvccInfo | None = None
    problems: tuple[str, ...] = field(default=())
    nvidia_smi_found: bool = False
    cuda_home_nvcc: NvccInfo | None = None  # the nvcc of torch's CUDA_HOME, when not PATH's
    interpreter_ok: bool = True  # False: the interpreter itself could not run the probe


# ------------------------------------------------------------------------------------------
# Parsers (pure)

_DRIVER_FILE_RE = re.compile(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)?)\s")
_BANNER_DRIVER_RE = re.compile(r"\b(Driver|KMD) Version:\s*(\d+\.\d+(?:\.\d+)?)")
_BANNER_CUDA_RE = re.compile(r"\bCUDA (?:UMD )?Version:\s*(\d+\.\d+)")
_GPU_LIST_RE = re.compile(r"^GPU (\d+):\s*(.+?)\s*(?:\(UUID:.*\))?$")
_NVCC_RE = re.compile(r"release (\d+\.\d+)")


def parse_driver_file(text: str) -> Version | None:
    """``/sys/module/nvidia/version`` (just ``535.104.05``) or ``/proc/driver/nvidia/version``
    (``NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 …``)."""
    t = text.strip()
    if re.fullmatch(r"\d+\.\d+(?:\.\d+)?", t):
        return Version.parse(t)
    m = _DRIVER_FILE_RE.search(t + " ")
    return Version.parse(m.group(1)) if m else None


def parse_nvidia_smi_banner(text: str) -> tuple[Version | None, Version | None, bool]:
    """(driver, CUDA version the driver supports, whether the R610+ KMD banner was used)."""
    d = _BANNER_DRIVER_RE.search(text)
    c = _BANNER_CUDA_RE.search(text)
    driver = Version.parse(d.group(2)) if d else None
    return driver, (Version.parse(c.group(1)) if c else None), bool(d and d.group(1) == "KMD")


def parse_gpu_query(text: str) -> list[GpuInfo]:
    """``--query-gpu=index,name,compute_cap --format=csv,noheader`` lines."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        try:
            cap = Capability.parse(parts[-1])
        except LockgenError:
            cap = None
        gpus.append(
            GpuInfo(int(parts[0]), ", ".join(parts[1:-1]), cap, "nvidia-smi" if cap else "")
        )
    return gpus


def parse_gpu_list(text: str) -> list[GpuInfo]:
    """``nvidia-smi -L`` lines: ``GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-…)``."""
    gpus = []
    for line in text.splitlines():
        m = _GPU_LIST_RE.match(line.strip())
        if m:
            gpus.append(GpuInfo(int(m.group(1)), m.group(2), None))
    return gpus


def parse_nvcc(text: str) -> Version | None:
    m = _NVCC_RE.search(text)
    return Version.parse(m.group(1)) if m else None


def cudnn_from_int(n: int | None) -> str | None:
    """``torch.backends.cudnn.version()`` → dotted: 92400 → 9.24.0, 8902 → 8.9.2."""
    if not n:
        return None
    if n >= 90000:
        return f"{n // 10000}.{n % 10000 // 100}.{n % 100}"
    return f"{n // 1000}.{n % 1000 // 100}.{n % 100}"


def conda_platform(system: str, machine: str) -> str:
    system, machine = system.lower(), machine.lower()
    arch = {"x86_64": "64", "amd64": "64", "aarch64": "aarch64", "arm64": "arm64"}.get(
        machine, machine
    )
    if system.startswith("linux"):
        return f"linux-{arch}"
    if system.startswith("win"):
        return f"win-{arch}"
    if system.startswith("darwin"):
        return f"osx-{arch}"
    return f"{system}-{arch}"


# The torch probe runs in a child interpreter: importing torch can take seconds, crash, or
# print warnings; the child's JSON on stdout is the only thing read back. Every step past the
# import is allowed to fail on its own.
TORCH_SCRIPT = r"""
import json, os, re, sys
try:
    import torch
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    raise SystemExit(0)
info = {"version": str(torch.__version__), "cuda": torch.version.cuda}
try:
    info["cudnn"] = torch.backends.cudnn.version()  # loads libcudnn
except Exception:
    info["cudnn"] = None
try:
    torch.backends.cuda.preferred_blas_library()  # cuBLAS: a dependency of libtorch_cuda
except Exception:
    pass
try:
    from importlib import metadata
    info["torchvision"] = metadata.version("torchvision")
except Exception:
    info["torchvision"] = None
try:
    from importlib import metadata
    info["installer"] = (metadata.distribution("torch").read_text("INSTALLER") or "").strip()
except Exception:
    info["installer"] = None
archs = []
try:
    archs = list(torch.cuda.get_arch_list())
    if not archs and torch.version.cuda:
        archs = torch._C._cuda_getArchFlags().split()
except Exception:
    pass
info["arch_list"] = archs
devices = []
try:
    info["cuda_available"] = bool(torch.cuda.is_available())
    for i in range(torch.cuda.device_count() if info["cuda_available"] else 0):
        cap = torch.cuda.get_device_capability(i)
        devices.append([torch.cuda.get_device_name(i), f"{cap[0]}.{cap[1]}"])
except Exception:
    info["cuda_available"] = False
info["devices"] = devices

def owners():
    out = {}
    try:
        from importlib import metadata
        for dist in metadata.distributions():
            name = (dist.metadata["Name"] or "").lower()
            if not name.startswith(("nvidia", "cuda")):
                continue
            for f in dist.files or ():
                if ".so" in f.name:
                    out[os.path.realpath(str(dist.locate_file(f)))] = f"{name} {dist.version}"
    except Exception:
        pass
    return out

def version_code(name, path):
    import ctypes
    lib = ctypes.CDLL(path)
    if name == "cudart":
        v = ctypes.c_int()
        return v.value if lib.cudaRuntimeGetVersion(ctypes.byref(v)) == 0 else None
    if name == "cublas":
        parts = []
        for kind in (0, 1, 2):
            v = ctypes.c_int()
            if lib.cublasGetProperty(kind, ctypes.byref(v)) != 0:
                return None
            parts.append(v.value)
        return parts
    if name == "cublasLt":
        lib.cublasLtGetVersion.restype = ctypes.c_size_t
        return lib.cublasLtGetVersion()
    if name == "cudnn":
        lib.cudnnGetVersion.restype = ctypes.c_size_t
        return lib.cudnnGetVersion()
    if name == "nccl":
        v = ctypes.c_int()
        return v.value if lib.ncclGetVersion(ctypes.byref(v)) == 0 else None
    return None

libraries = []
try:
    pattern = re.compile(r"/lib(cudart|cublasLt|cublas|cudnn|nccl)\.so[.0-9]*$")
    seen = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split(None, 5)[-1].strip() if line.count(" ") >= 5 else ""
            m = pattern.search(path)
            if m and path not in seen:
                seen.add(path)
                libraries.append({"name": m.group(1), "path": path})
    own = owners()
    for lib in libraries:
        try:
            lib["version"] = version_code(lib["name"], lib["path"])
        except Exception:
            lib["version"] = None
        lib["distribution"] = own.get(os.path.realpath(lib["path"]))
except Exception:
    pass
info["libraries"] = libraries
try:
    from torch.utils import cpp_extension
    info["cuda_home"] = cpp_extension.CUDA_HOME
except Exception:
    info["cuda_home"] = None
uv = None
try:
    with open(os.path.join(sys.prefix, "pyvenv.cfg")) as cfg:
        for line in cfg:
            key, _, value = line.partition("=")
            if key.strip() == "uv":
                uv = value.strip()
except OSError:
    pass
info["environment"] = {
    "prefix": sys.prefix,
    "base_prefix": sys.base_prefix,
    "conda_meta": os.path.isdir(os.path.join(sys.prefix, "conda-meta")),
    "uv": uv,
    "env": {k: os.environ.get(k) for k in ("VIRTUAL_ENV", "CONDA_PREFIX", "PIXI_PROJECT_ROOT",
                                            "PIXI_ENVIRONMENT_NAME", "IN_NIX_SHELL")},
}
print(json.dumps(info))
"""


def library_version(name: str, raw: object) -> str | None:
    """What a library's own version call returned → dotted: cudart 13000 → 13.0, cublas
    [13, 1, 1] → 13.1.1, cublasLt 130101 → 13.1.1, cudnn 92400 → 9.24.0, nccl 23007 →
    2.30.7."""
    if isinstance(raw, list) and len(raw) == 3 and all(isinstance(x, int) for x in raw):
        return ".".join(map(str, raw))
    if not isinstance(raw, int) or isinstance(raw, bool) or raw <= 0:
        return None
    if name == "cudart":
        return f"{raw // 1000}.{raw % 1000 // 10}"
    if name == "cudnn":
        return cudnn_from_int(raw)
    return f"{raw // 10000}.{raw % 10000 // 100}.{raw % 100}"


def environment_from(raw: object) -> PythonEnvironment | None:
    """The child's environment facts → which manager made it."""
    if not isinstance(raw, dict):
        return None
    prefix = str(raw.get("prefix") or "")
    env = raw.get("env") if isinstance(raw.get("env"), dict) else {}
    nix_shell = bool(env.get("IN_NIX_SHELL"))
    if "/.pixi/envs/" in prefix or env.get("PIXI_ENVIRONMENT_NAME"):
        kind = "pixi"
    elif raw.get("conda_meta"):
        kind = CONDA
    elif raw.get("uv"):
        kind = "uv"
    elif prefix and prefix != raw.get("base_prefix"):
        kind = "venv"
    elif prefix.startswith("/nix/store/"):
        kind = NIX
    else:
        kind = SYSTEM
    return PythonEnvironment(kind, prefix, nix_shell)


def library_origin(path: str, distribution: str | None, env: PythonEnvironment | None) -> str:
    """pip (a wheel installed it), conda (it lies in the conda/pixi prefix), nix (the Nix
    store) or system (anything else: /usr/lib, /usr/local/cuda, LD_LIBRARY_PATH)."""
    if distribution or "/site-packages/torch/lib/" in path:
        return PIP
    if path.startswith("/nix/store/"):
        return NIX
    if env is not None and env.kind in (CONDA, "pixi") and path.startswith(env.prefix + "/"):
        return CONDA
    return SYSTEM


def _libraries(raw: object, env: PythonEnvironment | None) -> tuple[LoadedLibrary, ...]:
    out = []
    for item in raw if isinstance(raw, list) else ():
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            continue
        name = str(item.get("name", ""))
        dist = item.get("distribution") if isinstance(item.get("distribution"), str) else None
        out.append(
            LoadedLibrary(
                name,
                item["path"],
                library_version(name, item.get("version")),
                dist,
                library_origin(item["path"], dist, env),
            )
        )
    return tuple(out)


def _probe_shape_problem(data: object) -> str:
    """What is wrong with the shape of the torch probe's JSON ("" when nothing)."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"

    def is_strs(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    rules = {
        "version": (lambda v: isinstance(v, str), "a string"),
        "cuda": (lambda v: v is None or isinstance(v, str), "a string or null"),
        "cudnn": (
            lambda v: v is None or (isinstance(v, (int, str)) and not isinstance(v, bool)),
            "a number, a string or null",
        ),
        "arch_list": (lambda v: v is None or is_strs(v), "a list of strings"),
        "devices": (
            lambda v: (
                v is None
                or (isinstance(v, list) and all(isinstance(d, list) and len(d) == 2 for d in v))
            ),
            "a list of [name, capability] pairs",
        ),
    }
    for key, (ok, want) in rules.items():
        if key in data and not ok(data[key]):
            return f"{key!r} is {data[key]!r}, not {want}"
    return ""


def parse_torch_probe(text: str) -> tuple[TorchInfo | None, str]:
    """The torch probe's JSON → (TorchInfo, "") or (None, why not)."""
    last = next((ln for ln in reversed(text.strip().splitlines()) if ln.startswith("{")), "")
    try:
        data = json.loads(last)
    except (json.JSONDecodeError, RecursionError):
        return None, "the torch probe printed no result"
    problem = _probe_shape_problem(data)
    if problem:
        return None, f"the torch probe printed a result lockgen cannot read: {problem}"
    if "error" in data:
        return None, str(data["error"])
    cudnn = data.get("cudnn")
    env = environment_from(data.get("environment"))
    return TorchInfo(
        version=str(data.get("version", "")),
        cuda=data.get("cuda"),
        cudnn=cudnn_from_int(cudnn) if isinstance(cudnn, int) else cudnn,
        arch_list=tuple(data.get("arch_list") or ()),
        cuda_available=bool(data.get("cuda_available")),
        devices=tuple((str(n), str(c)) for n, c in data.get("devices") or ()),
        torchvision=data.get("torchvision") if isinstance(data.get("torchvision"), str) else None,
        libraries=_libraries(data.get("libraries"), env),
        cuda_home=data.get("cuda_home") if isinstance(data.get("cuda_home"), str) else None,
        environment=env,
        installer=data.get("installer") if isinstance(data.get("installer"), str) else None,
    ), ""


class Prober:
    """Looks at a machine through injectable windows (see the module docstring)."""

    def __init__(
        self,
        root: str | Path = "/",
        run: Runner = run_command,
        python_exe: str = sys.executable,
        python_version: str | None = None,
        platform: str | None = None,
        torch_info: Callable[[], tuple[TorchInfo | None, str]] | None = None,
        timeout: float = 10.0,
        torch_timeout: float = 120.0,
        which: Callable[[str], str | None] = shutil.which,
    ):
        self.root = Path(root)
        self.run = run
        self.python_exe = python_exe
        self.python_version = python_version or ".".join(map(str, sys.version_info[:3]))
        self.platform = platform or conda_platform(sys.platform, _platform.machine())
        self.torch_info = torch_info
        self.timeout = timeout
        self.torch_timeout = torch_timeout
        self.which = which
        self.problems: list[str] = []

    def _read(self, rel: str) -> str | None:
        try:
            return (self.root / rel).read_text(errors="replace")
        except OSError:
            return None

    def _run(self, argv: Sequence[str], timeout: float | None = None) -> CommandResult:
        try:
            res = self.run(argv, timeout or self.timeout)
        except Exception as exc:  # a runner must not take the doctor down
            why = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.problems.append(f"{argv[0]} failed: {why}")
            return CommandResult(None, stderr=why)
        if res.timed_out:
            limit = timeout or self.timeout
            self.problems.append(f"`{' '.join(argv[:2])}` timed out after {limit:g} s")
        if res.overflowed:
            self.problems.append(
                f"`{' '.join(argv[:2])}` printed more than {MAX_COMMAND_OUTPUT >> 20} MiB: stopped"
            )
        return res

    def driver_and_gpus(self) -> tuple[DriverInfo | None, list[GpuInfo], bool]:
        driver = None
        for rel in (SYS_DRIVER, PROC_DRIVER):
            text = self._read(rel)
            if text is not None:
                v = parse_driver_file(text)
                if v is not None:
                    driver = DriverInfo(v, "/" + rel)
                    break
                self.problems.append(f"/{rel} has no driver version in it")
        banner = self._run(NVIDIA_SMI)
        smi_found = not banner.not_found
        if banner.ok:
            v, umd, kmd = parse_nvidia_smi_banner(banner.stdout)
            if driver is None and v is not None:
                driver = DriverInfo(v, "nvidia-smi", umd, kmd)
            elif driver is not None:
                driver = DriverInfo(driver.version, driver.source, umd, kmd)
            if v is None:
                self.problems.append("nvidia-smi printed no driver version")
        elif smi_found and not banner.timed_out:
            msg = (banner.stdout + banner.stderr).strip().splitlines()
            self.problems.append(f"nvidia-smi failed: {msg[0] if msg else banner.returncode}")
        gpus: list[GpuInfo] = []
        if banner.ok:
            q = self._run(NVIDIA_SMI_QUERY)
            gpus = parse_gpu_query(q.stdout) if q.ok else []
            if not gpus:
                lst = self._run(NVIDIA_SMI_LIST)
                gpus = parse_gpu_list(lst.stdout) if lst.ok else []
        return driver, gpus, smi_found

    _interpreter_failed = False

    def torch(self) -> tuple[TorchInfo | None, str]:
        if self.torch_info is not None:
            return self.torch_info()
        res = self._run([self.python_exe, "-c", TORCH_SCRIPT], self.torch_timeout)
        self._interpreter_failed = res.not_found or res.overflowed
        if res.not_found:
            why = f": {res.stderr.strip()}" if res.stderr.strip() else ""
            return None, f"the interpreter {self.python_exe} cannot be run{why}"
        if res.timed_out:
            return None, "importing torch timed out"
        if res.overflowed:
            return None, (
                f"{self.python_exe} printed more than {MAX_COMMAND_OUTPUT >> 20} MiB instead of "
                "the torch probe's answer: is it a Python interpreter?"
            )
        if not res.ok:
            tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
            return None, f"the torch probe failed: {tail}"
        return parse_torch_probe(res.stdout)

    def nvcc(self) -> NvccInfo | None:
        """The nvcc on PATH, with its version."""
        res = self._run(NVCC)
        v = parse_nvcc(res.stdout) if res.ok else None
        return NvccInfo(v, self.which(NVCC[0])) if v else None

    def cuda_home_nvcc(self, torch: TorchInfo | None, nvcc: NvccInfo | None) -> NvccInfo | None:
        """The nvcc extension builds would use (torch's CUDA_HOME), where it is not the one on
        PATH."""
        if torch is None or not torch.cuda_home:
            return None
        exe = f"{torch.cuda_home.rstrip('/')}/bin/nvcc"
        if nvcc is not None and nvcc.path == exe:
            return None
        res = self._run((exe, "--version"))
        v = parse_nvcc(res.stdout) if res.ok else None
        return NvccInfo(v, exe) if v else None

    def probe(self) -> MachineReport:
        self.problems = []
        driver, gpus, smi_found = self.driver_and_gpus()
        torch, torch_error = self.torch()
        interpreter_ok = not self._interpreter_failed
        # GPUs that nvidia-smi could not name a capability for: ask torch, by index.
        if torch is not None and torch.devices:
            for i, g in enumerate(gpus):
                if g.capability is None and i < len(torch.devices):
                    gpus[i] = GpuInfo(
                        g.index, g.name, Capability.parse(torch.devices[i][1]), "torch"
                    )
            if not gpus:
                gpus = [
                    GpuInfo(i, n, Capability.parse(c), "torch")
                    for i, (n, c) in enumerate(torch.devices)
                ]
        nvcc = self.nvcc()
        home_nvcc = self.cuda_home_nvcc(torch, nvcc)
        return MachineReport(
            platform=self.platform,
            python=Version.parse(self.python_version, "Python version"),
            driver=driver,
            gpus=tuple(gpus),
            torch=torch,
            torch_error=torch_error,
            nvcc=nvcc,
            problems=tuple(self.problems),
            nvidia_smi_found=smi_found,
            cuda_home_nvcc=home_nvcc,
            interpreter_ok=interpreter_ok,
        )
