"""``lockgen doctor --stack``: the LLM stack installed beside torch, and whether it loads.

For each package of the stack facts that is installed in the inspected interpreter: its
version, the CUDA majors its compiled libraries link (their ELF ``DT_NEEDED``, read from disk
by lockgen itself), whether it imports in a child process of its own (forked from one
interpreter that imported torch once, :data:`IMPORT_ALL`; its "undefined symbol", "cannot
open shared object file" and "can't load C++/CUDA extensions" messages caught), and a fix as
one pip line, chosen by :func:`lockgen.stack_check.check_stack` against the installed torch.
The interpreter is run through the doctor's :class:`~lockgen.probe.Prober` (``run``,
``python_exe``), so tests replay it.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lockgen.check import Request
from lockgen.findings import ERROR, NOTE, OK, WARNING, Finding
from lockgen.matrix import Matrix
from lockgen.probe import CommandResult, Prober
from lockgen.pypi import PypiError, cuda_majors, file_needed
from lockgen.stack import Stack
from lockgen.stack_check import With, check_stack
from lockgen.versions import Version, parse_cuda

INVENTORY = r"""
import json, sys
import importlib.metadata as md
out = {}
for name in json.loads(sys.argv[1]):
    try:
        d = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    libs = [str(d.locate_file(f)) for f in (d.files or ())
            if str(f).endswith(".so") or ".so." in str(f)]
    out[name] = {"version": d.version, "libs": libs}
try:
    import torch
    out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda}
except Exception as exc:
    out["torch"] = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
"""
# Every import in one interpreter that imports torch once and forks a child per package, all
# at once: each child imports only its package (isolated: a crash, a hang or a half-loaded
# module stays in it), its stdout and stderr captured at the file descriptors (C++ extensions
# print there). One torch import instead of one per package, and the imports side by side.
IMPORT_ALL = r"""
import json, os, signal, sys, tempfile, traceback
try:
    import torch  # noqa: F401
except Exception:
    pass
limit = int(sys.argv[2])
children = {}
for name, module in json.loads(sys.argv[1]).items():
    cap = tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.dup2(cap.fileno(), 1)
            os.dup2(cap.fileno(), 2)
            signal.alarm(limit)
            __import__(module)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    children[name] = (pid, cap)
out = {}
for name, (pid, cap) in children.items():
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    cap.seek(0)
    text = cap.read().decode("utf-8", "replace")
    cap.close()
    out[name] = {"status": status, "output": text[-20000:]}
print(json.dumps(out))
"""
ALARM = getattr(signal, "SIGALRM", 14)  # what ends an import that outlives its time
IMPORTS = {
    "xformers": "xformers.ops",
    "flash-attn": "flash_attn",
    "liger-kernel": "liger_kernel",
    "torchao": "torchao",
    "torchaudio": "torchaudio",
    "bitsandbytes": "bitsandbytes",
    "deepspeed": "deepspeed",
    "vllm": "vllm",
    "gpufit": "gpufit",
}
PATTERNS = (
    (ERROR, "abi", re.compile(r"undefined symbol: \S+")),
    (ERROR, "load", re.compile(r"\S+: cannot open shared object file")),
    (WARNING, "load", re.compile(r"can't load C\+\+/CUDA extensions[^\n]*")),
    (WARNING, "load", re.compile(r"Skipping import of cpp extensions[^\n]*")),
)
PYTORCH_INDEX = "https://download.pytorch.org/whl/cu{}"


@dataclass(frozen=True)
class Installed:
    name: str
    version: str
    cuda: tuple[int, ...]  # the CUDA majors its libraries link
    findings: tuple[Finding, ...]
    fix: str | None

    def to_json(self) -> dict:
        return {
            "package": self.name,
            "version": self.version,
            "cuda": list(self.cuda),
            "findings": [f.to_json() for f in self.findings],
            "fix": self.fix,
        }


def _lib_cuda(libs: Sequence[str], needed: Callable[[str], tuple[str, ...]]) -> tuple[int, ...]:
    majors: set[int] = set()
    for lib in libs:
        try:
            majors.update(cuda_majors(needed(lib)))
        except (OSError, PypiError):
            continue  # not ELF, or unreadable: nothing said about it
    return tuple(sorted(majors))


def _import_all(prober: Prober, names: Sequence[str]) -> dict[str, CommandResult] | None:
    """How ``import MODULE`` went for each of ``names`` that has a module to import, all in
    one run of :data:`IMPORT_ALL`; None when that run gives no answer (no ``os.fork``, say):
    then each is imported in a process of its own."""
    modules = {n: IMPORTS[n] for n in names if n in IMPORTS}
    if not modules:
        return {}
    limit = max(1, int(prober.torch_timeout))
    argv = [prober.python_exe, "-c", IMPORT_ALL, json.dumps(modules), str(limit)]
    res = prober.run(argv, prober.torch_timeout * (len(modules) + 1))
    try:
        got = json.loads(res.stdout) if res.ok else None
        return {
            n: CommandResult(
                0 if got[n]["status"] == 0 else 1,
                "",
                str(got[n]["output"]),
                timed_out=got[n]["status"] == -ALARM,
            )
            for n in modules
        }
    except (ValueError, TypeError, KeyError):
        return None


def _import_findings(prober: Prober, name: str, res: CommandResult | None = None) -> list[Finding]:
    """What ``import MODULE`` of the package said: ``res`` when :func:`_import_all` ran it,
    else a process of its own."""
    module = IMPORTS.get(name)
    if module is None:
        return []
    if res is None:
        res = prober.run([prober.python_exe, "-c", f"import {module}"], prober.torch_timeout)
    text = res.stdout + res.stderr
    found = [
        Finding(sev, code, f"{name}: {m.group(0)}")
        for sev, code, rx in PATTERNS
        if (m := rx.search(text))
    ]
    if res.timed_out:
        found.append(Finding(ERROR, "import", f"import {module} timed out"))
    elif not res.ok and not any(f.severity == ERROR for f in found):
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        found.append(Finding(ERROR, "import", f"import {module} failed: {tail}"))
    if not found:
        found.append(Finding(OK, "import", f"import {module} works"))
    return found


def _pip_line(args: Sequence[str]) -> str:
    """A check request's arguments as the pip line that installs that set."""
    pkgs: list[str] = []
    index = ""
    it = iter(args)
    for a in it:
        v = next(it, "")
        if a == "--torch":
            pkgs.insert(0, f"'torch=={v}.*'")
        elif a == "--cuda":
            cuda = parse_cuda(v)
            index = (
                f" --extra-index-url {PYTORCH_INDEX.format(cuda.raw.replace('.', ''))}"
                if cuda
                else ""
            )
        elif a == "--with":
            pkgs.append(f"'{v}'" if "[" in v else v)
    return "pip install " + " ".join(pkgs) + index


def _fix(
    m: Matrix,
    stack: Stack,
    torch: Version,
    cuda: Version | None,
    name: str,
    version: str,
    linked: tuple[int, ...],
) -> tuple[list[Finding], str | None]:
    known = any(r.version == version for r in stack.releases.get(name, ()))
    req = Request(torch=torch.minor, cuda=cuda, cpu=cuda is None)
    res = check_stack(m, stack, req, [With(name, (), version if known else None)])
    out: list[Finding] = []
    major = cuda.major if cuda is not None else None
    mismatch = major is not None and bool(linked) and major not in linked
    if mismatch:
        have = "/".join(map(str, linked))
        out.append(
            Finding(
                ERROR,
                "cuda",
                f"{name} {version} links CUDA {have} libraries; torch {torch} is a CUDA "
                f"{major} build: its compiled part will not load",
            )
        )
    others = [f for f in res.conflicts if f.severity == ERROR and f.code != "load"]
    out += others
    if mismatch and not others:  # the same release, built for torch's CUDA, on the PyTorch index
        for o in stack.off(name, version):
            if o.cuda == major and o.where == "PyTorch index":
                note = "" if o.verified else "  # unverified: " + ", ".join(o.source)
                pip = f"pip install --force-reinstall --no-deps {name}=={version}"
                return out, f"{pip} --index-url {o.index}{note}"
    if res.ok and not mismatch:
        return out, None
    fix = _pip_line(res.suggestions[0]) if res.suggestions else None
    return out, fix


def diagnose_stack(
    m: Matrix,
    stack: Stack,
    prober: Prober,
    needed: Callable[[str], tuple[str, ...]] | None = None,
) -> tuple[list[Finding], list[Installed]]:
    names = [n for n in stack.packages if n in stack.releases]
    res = prober.run([prober.python_exe, "-c", INVENTORY, json.dumps(names)], prober.torch_timeout)
    try:
        inv = json.loads(res.stdout) if res.ok else None
    except ValueError:
        inv = None
    if not isinstance(inv, dict):
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return [Finding(ERROR, "probe", f"could not list the installed packages: {tail}")], []
    t = inv.pop("torch", {})
    if "version" not in t:
        return [
            Finding(ERROR, "torch-missing", f"torch does not import: {t.get('error', '?')}")
        ], []
    torch = Version.parse(t["version"].split("+")[0], "torch version")
    cuda = parse_cuda(t["cuda"]) if t.get("cuda") else None
    head = [Finding(NOTE, "torch", f"torch {t['version']} (CUDA {cuda or 'none: CPU build'})")]
    found = []
    imported = _import_all(prober, sorted(inv)) or {}
    for name in sorted(inv):
        info = inv[name]
        linked = _lib_cuda(info.get("libs", ()), needed or file_needed)
        fixes, fix = _fix(m, stack, torch, cuda, name, info["version"], linked)
        findings = fixes + _import_findings(prober, name, imported.get(name))
        found.append(Installed(name, info["version"], linked, tuple(findings), fix))
    return head, found


def format_stack_doctor(head: Sequence[Finding], found: Sequence[Installed]) -> str:
    lines = [f"{f.severity:<7} {f.code:<9} {f.message}" for f in head]
    if not found and len(head) == 1:
        lines.append("none of the stack's packages is installed")
    for p in found:
        cuda = f", links CUDA {'/'.join(map(str, p.cuda))}" if p.cuda else ""
        lines.append(f"{p.name} {p.version}{cuda}")
        lines += [f"  {f.severity:<7} {f.code:<7} {f.message}" for f in p.findings]
        if p.fix:
            lines.append(f"  fix: {p.fix}")
    return "\n".join(lines)


def broken(head: Sequence[Finding], found: Sequence[Installed]) -> bool:
    return any(f.severity == ERROR for f in head) or any(
        f.severity == ERROR for p in found for f in p.findings
    )


def run_stack_doctor(m: Matrix, prober: Prober, fmt: str, out) -> int:
    from lockgen.stack import load_stack

    head, found = diagnose_stack(m, load_stack(), prober)
    if fmt == "json":
        data = {
            "torch": [f.to_json() for f in head],
            "packages": [p.to_json() for p in found],
            "broken": broken(head, found),
        }
        json.dump(data, out, indent=2)
        out.write("\n")
    else:
        out.write(format_stack_doctor(head, found) + "\n")
    return 1 if broken(head, found) else 0
