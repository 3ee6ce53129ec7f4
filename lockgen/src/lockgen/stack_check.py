"""``lockgen check --with PKG[==VER]``: will the LLM stack install, load and run beside torch?

Pure functions of data: no I/O.

The torch part of the request is judged by :func:`lockgen.check.check`; its fitting builds
become the torch builds the stack is tried against: the PyPI build of each release (what
``pip install torch`` gives) unless ``--cuda`` names another (then it comes from the PyTorch
index). For each torch build and Python, every package asked for (and each stack package an
asked-for extra pins, ``trl[vllm]``) gets the newest release (or the one asked for) that
installs (Requires-Python, the torch it declares, a file for the platform and Python), loads
(the CUDA major its binary links against torch's, how it binds to torch's ABI) and runs on the
GPU (its compute-capability floor). "compatible" only when one torch build and one release of
every package pass, named with the files they install; otherwise each error says why and the
suggestions are requests that themselves pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from lockgen.check import CheckResult, Request, check
from lockgen.errors import LockgenError
from lockgen.findings import ERROR, NOTE, WARNING, Finding
from lockgen.matrix import Matrix
from lockgen.specifiers import contains, normalize
from lockgen.stack import Artifact, Stack, StackRelease
from lockgen.versions import Version

FA_URL = "https://github.com/Dao-AILab/flash-attention/releases/download/v{v}/{f}"


class UnknownPackage(LockgenError):
    """A --with name the stack facts do not know: a usage error."""


@dataclass(frozen=True)
class With:
    name: str
    extras: tuple[str, ...] = ()
    version: str | None = None

    @classmethod
    def parse(cls, text: str, stack: Stack) -> With:
        m = re.fullmatch(
            r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*(?:==\s*(\S+))?", text
        )
        if not m:
            raise UnknownPackage(
                f"--with {text!r}: expected PKG, PKG==VERSION or PKG[extra]==VERSION"
            )
        name = normalize(m.group(1))
        if name not in stack.releases:
            raise UnknownPackage(
                f"--with {text}: unknown package {name!r} "
                f"(known: {', '.join(sorted(stack.releases))})"
            )
        version = m.group(3)
        if version is not None and version not in {r.version for r in stack.releases[name]}:
            known = ", ".join(r.version for r in stack.releases[name])
            raise UnknownPackage(
                f"--with {text}: {name} {version} is not in the facts (known: {known})"
            )
        extras = tuple(normalize(x) for x in (m.group(2) or "").split(",") if x.strip())
        return cls(name, extras, version)

    def __str__(self) -> str:
        ex = f"[{','.join(self.extras)}]" if self.extras else ""
        return f"{self.name}{ex}" + (f"=={self.version}" if self.version else "")


@dataclass(frozen=True)
class TorchBuild:
    torch: Version  # the minor release
    cuda: Version | None
    pypi: bool  # the build PyPI serves (else the PyTorch index)
    python: Version
    torchvision: Version | None = None  # the release paired with this torch (a minor)

    def describe(self) -> str:
        where = "PyPI" if self.pypi else "the PyTorch index"
        build = f"CUDA {self.cuda}" if self.cuda else "CPU"
        return f"torch {self.torch} ({build} build from {where}) on Python {self.python}"


@dataclass(frozen=True)
class Pick:
    """One package's release, the file it installs and what was found."""

    release: StackRelease
    file: str
    where: str
    findings: tuple[Finding, ...]
    unverified: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not any(f.severity == ERROR for f in self.findings)

    def to_json(self) -> dict:
        return {
            "package": self.release.package,
            "version": self.release.version,
            "file": self.file,
            "from": self.where,
            "unverified": list(self.unverified),
        }


@dataclass(frozen=True)
class StackResult:
    request: Request
    withs: tuple[With, ...]
    torch_result: CheckResult
    conflicts: tuple[Finding, ...]
    torch: TorchBuild | None = None
    picks: tuple[Pick, ...] = ()
    suggestions: tuple[tuple[str, ...], ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.torch is not None and not any(c.severity == ERROR for c in self.conflicts)

    @property
    def verdict(self) -> str:
        if not self.ok:
            return "incompatible"
        warn = any(c.severity == WARNING for c in self.conflicts)
        return "compatible with warnings" if warn else "compatible"

    @property
    def unverified(self) -> tuple[str, ...]:
        own = (u for p in self.picks for u in p.unverified)
        return tuple(dict.fromkeys([*self.torch_result.unverified, *own]))

    def to_json(self) -> dict:
        t = self.torch
        return {
            "request": self.request.describe(),
            "with": [str(w) for w in self.withs],
            "verdict": self.verdict,
            "ok": self.ok,
            "torch": None
            if t is None
            else {
                "torch": t.torch.raw,
                "cuda": t.cuda.raw if t.cuda else None,
                "from": "pypi" if t.pypi else "pytorch-index",
                "python": t.python.raw,
            },
            "packages": [p.to_json() for p in self.picks],
            "unverified": list(self.unverified),
            "conflicts": [c.to_json() for c in self.conflicts],
            "suggestions": [list(s) for s in self.suggestions],
        }


# -- one package against one torch build --------------------------------------------------------


def _platform_ok(a: Artifact, platform: str) -> bool:
    p = a.platform
    if p == "any":
        return True
    return {
        "linux-64": "linux" in p and "x86_64" in p,
        "linux-aarch64": "linux" in p and "aarch64" in p,
        "win-64": p == "win_amd64",
        "osx-arm64": p.startswith("macosx") and "arm64" in p,
    }.get(platform, False)


def _python_ok(a: Artifact, py: Version) -> bool:
    minor = py.padded(2)
    for tag in a.python.split("."):
        m = re.fullmatch(r"(cp|py)(\d)(\d*)t?", tag)
        if not m:
            continue
        want = (int(m.group(2)), int(m.group(3) or 0))
        if m.group(1) == "py" or a.abi == "abi3":
            if minor[0] == want[0] and (not m.group(3) or minor >= want):
                return True
        elif minor == want and not tag.endswith("t"):
            return True
    return False


def _torch_ok(spec: str, torch: Version) -> str | None:
    """The torch patch release of ``torch`` (a minor) that ``spec`` accepts, if any."""
    base = torch.padded(2)
    for patch in range(10):
        v = f"{base[0]}.{base[1]}.{patch}"
        if contains(spec, v):
            return v
    return None


def _requires(r: StackRelease, extras: Sequence[str], name: str):
    return [q for q in r.requires if q.name == name and (q.extra is None or q.extra in extras)]


def judge(
    stack: Stack,
    r: StackRelease,
    tb: TorchBuild,
    req: Request,
    extras: Sequence[str],
    pins: Sequence[tuple[str, str]],
) -> Pick:
    """One release against one torch build: installs, loads, runs on the GPUs asked (also
    what ``lockgen verify`` runs on each package of a stack lock)."""
    name, v = r.package, r.version
    out: list[Finding] = []
    unverified: list[str] = []
    label = f"{name} {v}"
    for spec, who in pins:
        if not contains(spec, v):
            out.append(Finding(ERROR, "install", f"{label}: outside {spec} (asked by {who})"))
    if r.requires_python and not contains(r.requires_python, tb.python.raw):
        out.append(Finding(ERROR, "install", f"{label} needs Python {r.requires_python}"))
    for q in _requires(r, extras, "torch"):
        if q.spec and _torch_ok(q.spec, tb.torch) is None:
            out.append(
                Finding(ERROR, "install", f"{label} requires torch{q.spec}: torch {tb.torch} asked")
            )
    for q in _requires(r, extras, "torchvision"):
        if q.spec and tb.torchvision is not None and _torch_ok(q.spec, tb.torchvision) is None:
            out.append(
                Finding(
                    ERROR,
                    "install",
                    f"{label} requires torchvision{q.spec}: torch {tb.torch} pairs with "
                    f"torchvision {tb.torchvision}",
                )
            )
    files = [a for a in r.artifacts if not a.is_sdist and _platform_ok(a, req.platform)]
    files = [a for a in files if _python_ok(a, tb.python)]
    sdist = next((a for a in r.artifacts if a.is_sdist), None)
    art = files[0] if files else None
    binding = stack.binding(name, v)
    if binding is not None and not binding.verified:
        unverified.append(f"how {name} binds to torch ({', '.join(binding.source)})")
    if art is None and sdist is None:
        out.append(
            Finding(
                ERROR, "install", f"{label} has no file for {req.platform} and Python {tb.python}"
            )
        )
        return Pick(r, "", "PyPI", tuple(out), tuple(unverified))
    chosen = art or sdist
    assert chosen is not None
    where, file = chosen.where, chosen.file
    if art is None:
        out += _from_source(stack, r, tb, req, unverified)
    elif art.cuda:
        out += _cuda_load(stack, r, art, tb, unverified)
    out += _abi(binding, label, tb)
    floor = stack.gpu_floor(name, v)
    if floor is not None and req.gpus:
        if not floor.verified:
            unverified.append(f"{name}'s GPU floor ({', '.join(floor.source)})")
        for g, gl in zip(req.gpus, req.labels, strict=False):
            if g.canonical < floor.capability.canonical:
                out.append(
                    Finding(
                        ERROR,
                        "gpu",
                        f"{label} needs compute capability >= {floor.capability}; {gl} is {g}",
                    )
                )
    return Pick(r, file, where, tuple(out), tuple(unverified))


def _cuda_load(
    stack: Stack, r: StackRelease, art: Artifact, tb: TorchBuild, unverified: list[str]
) -> list[Finding]:
    label = f"{r.package} {r.version}"
    libs = ", ".join(art.needed) or "its CUDA libraries"
    if tb.cuda is None:
        return [
            Finding(
                ERROR,
                "load",
                f"{label}: its wheel links {libs} (CUDA {art.cuda[0]}); torch is the CPU build",
            )
        ]  # type: ignore[index]
    if tb.cuda.major in (art.cuda or ()):
        return []
    fix = [o for o in stack.off(r.package, r.version) if o.cuda == tb.cuda.major]
    hint = "".join(
        f"; the {o.where} has a CUDA {o.cuda} build: "
        + (
            f"pip install {r.package}=={r.version} --index-url {o.index}"
            if o.where == "PyTorch index"
            else f"from {o.index}"
        )
        + ("" if o.verified else " (unverified: " + ", ".join(o.source) + ")")
        for o in fix
    )
    majors = "/".join(str(c) for c in art.cuda or ())
    return [
        Finding(
            ERROR,
            "load",
            f"{label}: the PyPI wheel {art.file} links {libs} (CUDA {majors}) but {tb.describe()} "
            f"is a CUDA {tb.cuda.major} build: its C++/CUDA extension will not load{hint}",
        )
    ]


def _abi(binding, label: str, tb: TorchBuild) -> list[Finding]:
    if binding is None or not binding.torch:
        return []
    if _torch_ok(binding.torch, tb.torch) is not None:
        return []
    if binding.kind == "exact-undeclared":
        return [
            Finding(
                WARNING,
                "load",
                f"{label}: its kernels are built for torch{binding.torch}; with torch "
                f"{tb.torch} it skips them and runs without (it does not declare this)",
            )
        ]
    return [
        Finding(
            ERROR,
            "load",
            f"{label}: its binary needs torch{binding.torch} (ABI); torch {tb.torch} asked",
        )
    ]


def _from_source(
    stack: Stack, r: StackRelease, tb: TorchBuild, req: Request, unverified: list[str]
) -> list[Finding]:
    label = f"{r.package} {r.version}"
    if r.package == "flash-attn":
        return _flash_attn(stack, r, tb, req, unverified)
    b = stack.binding(r.package, r.version)
    if b is not None and b.kind == "jit":
        if tb.cuda is None:
            cuda = "no CUDA ops: torch is the CPU build"
        elif tb.cuda.major in (11, 12):
            cuda = f"an nvcc {tb.cuda.major}.x (its minor may differ from torch's {tb.cuda})"
        else:  # its builder lists no CUDA 13 minors that may differ
            cuda = f"nvcc {tb.cuda} exactly (torch's CUDA; DS_SKIP_CUDA_CHECK=1 skips the check)"
        return [
            Finding(
                NOTE,
                "build",
                f"{label}: PyPI serves the sdist only; its ops compile at first use with "
                f"ninja and {cuda}",
            )
        ]
    if b is not None and b.kind == "source":
        kernels = (
            f"its CUDA kernels need a CUDA {tb.cuda.major} toolkit (torch's major) and "
            "TORCH_CUDA_ARCH_LIST or a visible GPU, else it builds the CPU ops only"
            if tb.cuda
            else "torch is the CPU build: the CPU ops only"
        )
        return [Finding(NOTE, "build", f"{label}: built against the installed torch; {kernels}")]
    return [
        Finding(
            WARNING,
            "build",
            f"{label}: no wheel for {req.platform} and Python {tb.python}; pip builds the sdist",
        )
    ]


def _flash_attn(
    stack: Stack, r: StackRelease, tb: TorchBuild, req: Request, unverified: list[str]
) -> list[Finding]:
    label = f"{r.package} {r.version}"
    if tb.cuda is None:
        return [
            Finding(
                ERROR,
                "build",
                f"{label} needs a CUDA build of torch (setup.py reads torch.version.cuda)",
            )
        ]
    py = "cp{}{}".format(*tb.python.padded(2))
    tmajor, tminor = tb.torch.padded(2)
    abi = "TRUE" if (tmajor, tminor) >= (2, 7) else "FALSE"
    machine = "x86_64" if req.platform == "linux-64" else "aarch64"
    wheel = (
        f"flash_attn-{r.version}+cu{tb.cuda.major}torch{tmajor}.{tminor}cxx11abi{abi}"
        f"-{py}-{py}-linux_{machine}.whl"
    )
    url = FA_URL.format(v=r.version, f=wheel)
    for o in stack.off("flash-attn", r.version):
        if (
            o.cuda == tb.cuda.major
            and _torch_ok(o.torch, tb.torch)
            and contains(o.python, tb.python.raw)
            and machine == "x86_64"
        ):
            unverified.append(f"flash-attn's GitHub wheels ({', '.join(o.source)})")
            return [
                Finding(
                    NOTE,
                    "build",
                    f"{label}: PyPI has the sdist only; its setup.py downloads the "
                    f"prebuilt wheel {url} (needs github.com; offline it compiles instead)",
                )
            ]
    return [
        Finding(
            WARNING,
            "build",
            f"{label}: PyPI has the sdist only and no prebuilt wheel exists for torch {tb.torch}, "
            f"CUDA {tb.cuda.major}, {py} ({url} is not published), so pip compiles it from source: "
            f"install torch first and use --no-build-isolation; needs nvcc for CUDA "
            f"{tb.cuda.major} (>= 11.7), ninja and about 5 GB of RAM per job (MAX_JOBS); "
            f"about 2 h without ninja on "
            f"few cores, minutes on 64. Offline, the download fails (it sets no timeout) and it "
            f"compiles silently; without nvcc the install fails",
        )
    ]


# -- the whole set ----------------------------------------------------------------------------


def _torch_builds(m: Matrix, req: Request, base: CheckResult) -> list[TorchBuild]:
    """The torch builds to try: what ``pip install torch`` gives (the PyPI build) unless
    ``--cuda`` names another or the PyPI build does not fit the machine; newest Python first."""
    out, other = [], []
    for mt in base.matches:
        rel, b = mt.candidate.release, mt.candidate.build
        cuda = b.cuda if b else None
        pypi = cuda is None or cuda == rel.pypi_default_cuda
        for py in sorted(mt.python, reverse=True):
            tb = TorchBuild(rel.torch, cuda, pypi, py, rel.torchvision)
            (out if pypi else other).append(tb)
    if req.cuda is not None or req.cpu:
        return out + other
    pypi_minors = {tb.torch for tb in out}
    return out + [tb for tb in other if tb.torch not in pypi_minors]


def _pulled(stack: Stack, withs: Sequence[With]) -> list[With]:
    """The asked-for packages, then the stack packages their extras require."""
    names = {w.name for w in withs}
    out = list(withs)
    for w in withs:
        for r in (
            stack.releases[w.name][:1]
            if w.version is None
            else [x for x in stack.releases[w.name] if x.version == w.version]
        ):
            for q in r.requires:
                if q.extra in w.extras and q.name in stack.releases and q.name not in names:
                    names.add(q.name)
                    out.append(With(q.name))
    return out


def _try(
    stack: Stack, req: Request, tb: TorchBuild, withs: Sequence[With]
) -> tuple[list[Pick], list[Pick]]:
    """The chosen release of each package for one torch build (newest that passes), and for
    the ones none passes, the release asked for (or the newest) with its findings."""
    picks: list[Pick] = []
    failed: list[Pick] = []
    pins: dict[str, list[tuple[str, str]]] = {}  # name: (spec, who asks) from the picks so far
    for w in withs:
        cands = [r for r in stack.releases[w.name] if w.version in (None, r.version)]
        judged = [
            _against(judge(stack, r, tb, req, w.extras, pins.get(w.name, ())), picks, w.extras)
            for r in cands
        ]
        best = next((p for p in judged if p.ok), None)
        if best is None:
            # the newest release the picks' pins allow tells more than one outside them
            inside = [p for p in judged if not any(" (asked by " in f.message for f in p.findings)]
            failed.append((inside or judged)[0])
            continue
        picks.append(best)
        label = f"{best.release.package} {best.release.version}"
        for q in _stack_requires(stack, best.release, w.extras):
            pins.setdefault(q.name, []).append((q.spec, label))
    return picks, failed


def _stack_requires(stack: Stack, r: StackRelease, extras: Sequence[str]):
    """What ``r`` (with ``extras``) requires of the other stack packages (not torch or
    torchvision, judged against the torch build): ``vllm 0.31.0`` → ``transformers<5.18.0``."""
    return [
        q
        for q in r.requires
        if (q.extra is None or q.extra in extras)
        and q.spec
        and q.name in stack.releases
        and q.name not in ("torch", "torchvision")
    ]


def _against(p: Pick, picks: Sequence[Pick], extras: Sequence[str]) -> Pick:
    """``p`` with an error for each package already picked that its requirements exclude (a
    vllm that caps transformers below the transformers asked for)."""
    chosen = {x.release.package: x.release.version for x in picks}
    stack_reqs = [
        q for q in p.release.requires if (q.extra is None or q.extra in extras) and q.spec
    ]
    out = [
        Finding(
            ERROR,
            "install",
            f"{p.release.package} {p.release.version} requires {q.name}{q.spec}: "
            f"{q.name} {chosen[q.name]} asked",
        )
        for q in stack_reqs
        if q.name in chosen and not contains(q.spec, chosen[q.name])
    ]
    return replace(p, findings=p.findings + tuple(out)) if out else p


def check_stack(
    m: Matrix, stack: Stack, req: Request, withs: Sequence[With], suggest: bool = True
) -> StackResult:
    base = check(m, req)
    withs = tuple(withs)
    if not base.ok:
        return StackResult(req, withs, base, base.conflicts)
    every = _pulled(stack, withs)
    first_fail: list[Pick] | None = None
    for tb in _torch_builds(m, req, base):
        picks, failed = _try(stack, req, tb, every)
        if not failed:
            found = [f for p in picks for f in p.findings]
            return StackResult(req, withs, base, tuple(found), tb, tuple(picks))
        if first_fail is None:
            first_fail = failed
    errors = tuple(f for p in first_fail or () for f in p.findings if f.severity == ERROR)
    if not errors:
        errors = (
            Finding(ERROR, "python", "no torch build fits every package on the Python asked"),
        )
    sugg = _suggest(m, stack, req, withs) if suggest else ()
    return StackResult(req, withs, base, errors, suggestions=sugg)


# -- suggestions ------------------------------------------------------------------------------


def request_args(req: Request, withs: Sequence[With]) -> tuple[str, ...]:
    """The ``lockgen check`` arguments of a request."""
    args: list[str] = []
    if req.torch:
        args += ["--torch", req.torch.raw]
    if req.cpu:
        args += ["--cuda", "cpu"]
    elif req.cuda:
        args += ["--cuda", req.cuda.raw]
    if req.python:
        args += ["--python", req.python.raw]
    if req.driver:
        args += ["--driver", str(req.driver)]
    for g in req.gpus:
        args += ["--gpu", g.sm]
    if req.platform != "linux-64":
        args += ["--platform", req.platform]
    for w in withs:
        args += ["--with", str(w)]
    return tuple(args)


def _suggest(
    m: Matrix, stack: Stack, req: Request, withs: Sequence[With], limit: int = 3
) -> tuple[tuple[str, ...], ...]:
    """Requests that pass, changing as little as possible: another CUDA build of the torch
    asked for, then another torch release, then the packages' newest fitting releases."""
    tries: list[tuple[Request, tuple[With, ...]]] = []
    asked = tuple(withs)
    loose = tuple(With(w.name, w.extras) for w in withs)
    same = [r for r in m.releases if req.torch is None or r.torch == req.torch.minor]
    for rel in same:
        for b in sorted(rel.builds, key=lambda b: b.cuda, reverse=True):
            if b.verified and b.cuda != req.cuda:
                tries.append((replace(req, cuda=b.cuda, cpu=False), asked))
    if loose != asked:
        tries.append((req, loose))
    wanted = req.torch.minor.padded(2) if req.torch else (99, 0)
    others = sorted(
        (r for r in m.releases if req.torch is None or r.torch != req.torch.minor),
        key=lambda r: (
            abs(r.torch.padded(2)[1] - wanted[1]) + 100 * abs(r.torch.major - wanted[0]),
            -r.torch.padded(2)[1],
        ),
    )
    for w in dict.fromkeys((asked, loose)):
        for rel in others:
            tries.append((replace(req, torch=rel.torch, cuda=None, cpu=False), w))
    out: list[tuple[str, ...]] = []
    for r, w in tries:
        if len(out) >= limit:
            break
        res = check_stack(m, stack, r, w, suggest=False)
        if res.ok and res.torch is not None:
            # name the versions found, so the suggestion is one concrete set
            named = tuple(
                With(
                    p.release.package,
                    next((x.extras for x in w if x.name == p.release.package), ()),
                    p.release.version,
                )
                for p in res.picks
                if any(x.name == p.release.package for x in w)
            )
            args = request_args(
                replace(r, torch=Version.parse(res.torch.torch.raw), python=req.python), named
            )
            if args not in out:
                out.append(args)
    return tuple(out)


def format_stack(res: StackResult) -> str:
    asked = res.request.describe().replace("(nothing)", "any torch")
    head = f"{res.verdict}: {asked} with {', '.join(str(w) for w in res.withs)}"
    if res.unverified:
        head += f"  [unverified: {'; '.join(res.unverified)}]"
    lines = [head]
    for c in res.conflicts:
        lines.append(f"  {c.severity:<7} {c.code:<8} {c.message}")
    if res.torch is not None:
        lines.append(f"builds: {res.torch.describe()}")
        for p in res.picks:
            lines.append(f"  {p.release.package} {p.release.version}: {p.file} (from {p.where})")
    if res.suggestions:
        lines.append("these pass instead:")
        for s in res.suggestions:
            lines.append("  lockgen check " + " ".join(_quote(a) for a in s))
    elif not res.ok:
        lines.append("no torch build of the matrix and release of these packages fit together")
    return "\n".join(lines)


def _quote(a: str) -> str:
    return a if re.fullmatch(r"[A-Za-z0-9_.=+/:-]+", a) else f"'{a}'"


def run_with(m: Matrix, req: Request, specs: Sequence[str], fmt: str, out) -> int:
    """``lockgen check ... --with SPEC``: 0 when compatible, 1 when not; an unknown package
    raises :class:`UnknownPackage` (a usage error, exit 2)."""
    import json

    from lockgen.stack import load_stack

    stack = load_stack()
    res = check_stack(m, stack, req, [With.parse(s, stack) for s in specs])
    if fmt == "json":
        json.dump(res.to_json(), out, indent=2)
        out.write("\n")
    else:
        out.write(format_stack(res) + "\n")
    return 0 if res.ok else 1
