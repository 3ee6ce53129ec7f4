"""What ``lockgen verify`` adds for the lock of an LLM stack target (a target with ``stack``
pins in ``targets.toml``): the checks of ``lockgen check --with``, run on what the lock
installs.

``check_stack_lock(report, target, installed, stack=None)``; ``installed`` is, per machine
(platform and Python) the target promises, ``{canonical name: version}`` of what the lock
installs there. On each machine:

* every pin of the target's ``stack`` is installed at its version;
* every installed package the stack facts (``lockgen/data/stack*.toml``) know is judged
  against the target's torch build as ``check --with`` judges it: its release's Python and
  torch requirements, a wheel for the platform and Python, and above all that a wheel with a
  CUDA binary links torch's CUDA major (xformers' PyPI wheel links CUDA 12, bitsandbytes
  bundles one library per CUDA version, vllm's follows PyPI torch's), and that a binary built
  for one torch ABI has it;
* a release the facts do not hold is refused, unless every file of every release the facts
  hold is pure Python: what its binary links would be a guess;
* a package PyPI serves no wheel of for the machine is refused: it would be compiled on the
  installing machine, against whatever CUDA toolkit is there, so no lock can promise it.

Each problem is reported once, with the machines it holds on. The facts the verdict rests
on that were not read from an artifact are named in a note, and so is a package the facts do
not know whose name says it is for another CUDA major than torch's
(``nvidia-cutlass-dsl-libs-cu12`` beside a CUDA 13 torch): nothing is known of what it loads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lockgen.check import Request
from lockgen.errors import LockgenError
from lockgen.findings import ERROR, NOTE, WARNING, Finding, Report
from lockgen.formats.locks import Machine
from lockgen.index import canonical_name
from lockgen.specifiers import key
from lockgen.stack import Stack, StackRelease, load_stack
from lockgen.stack_check import TorchBuild, judge
from lockgen.targets import Target

CHECKED = "stack packages: CUDA major and torch ABI of each binary, pins"


def stack_pin(pin: str) -> tuple[str, str]:
    """``("trl", "1.16.0")`` of the pin ``trl[vllm]==1.16.0``."""
    spec, _, version = pin.partition("==")
    return canonical_name(spec.partition("[")[0]), version


def _named_cuda(name: str) -> int | None:
    """The CUDA major a wheel's name says it is for: ``nvidia-nccl-cu13`` → 13,
    ``cupy-cuda12x`` → 12; None when it names none."""
    got = re.search(r"(?:^|-)cu(?:da)?(\d{2})x?(?:-|$)", name)
    return int(got.group(1)) if got else None


def _pure_python(releases: tuple[StackRelease, ...]) -> bool:
    return all(a.is_sdist or a.platform == "any" for r in releases for a in r.artifacts)


def same_version(a: str, b: str) -> bool:
    """``0.0.35`` and ``0.0.35.0`` are one release; a version the stack facts' final-release
    grammar does not read (a pre-release, say) is the same only as itself."""
    try:
        return key(a) == key(b)
    except LockgenError:
        return a == b


def _release(stack: Stack, name: str, version: str) -> StackRelease | None:
    return next((r for r in stack.releases[name] if same_version(r.version, version)), None)


def _judge_one(
    stack: Stack, target: Target, machine: Machine, name: str, version: str
) -> tuple[list[Finding], tuple[str, ...]]:
    """What is wrong with ``name==version`` on the machine, and the unverified facts used."""
    label = f"{name} {version}"
    release = _release(stack, name, version)
    if release is None:
        if _pure_python(stack.releases[name]):
            return [], ()
        held = ", ".join(r.version for r in stack.releases[name])
        return [
            Finding(
                ERROR,
                "stack",
                f"{label}: the stack facts hold no such release (they hold {held}), so what "
                "its binary links is not known: pin a release they hold, or refresh them "
                "(lockgen refresh-stack)",
            )
        ], ()
    rel = target.release
    tb = TorchBuild(rel.torch, target.cuda, True, machine.python, rel.torchvision)
    pick = judge(stack, release, tb, Request(platform=machine.platform), (), ())
    found = [f for f in pick.findings if f.severity in (ERROR, WARNING)]
    chosen = next((a for a in release.artifacts if a.file == pick.file), None)
    if chosen is not None and chosen.is_sdist and _has_binary(stack, name, version):
        found = [f for f in found if f.code != "build"]  # what building it needs: moot here
        found.append(
            Finding(
                ERROR,
                "stack",
                f"{label}: PyPI has no wheel of it for this machine: it would be compiled "
                "where it is installed, against whatever CUDA toolkit is there, which no lock "
                "can promise",
            )
        )
    return found, pick.unverified


def _has_binary(stack: Stack, name: str, version: str) -> bool:
    binding = stack.binding(name, version)
    return binding is None or binding.kind != "none" or not _pure_python(stack.releases[name])


def _check_pins(report: Report, target: Target, installed) -> None:
    for pin in target.stack:
        name, version = stack_pin(pin)
        for machine, names in installed.items():
            got = names.get(name)
            if got is None or not same_version(got, version):
                what = f"locks {name} {got}" if got else f"does not install {name}"
                report.error(
                    "stack",
                    f"target {target.name} pins {pin}, but on {machine} the lock {what} "
                    f"(re-lock: lockgen lock {target.name})",
                )


def check_stack_lock(
    report: Report,
    target: Target,
    installed: Mapping[Machine, Mapping[str, str]],
    stack: Stack | None = None,
) -> None:
    """See the module docstring."""
    stack = stack or load_stack()
    _check_pins(report, target, installed)
    where: dict[Finding, list[str]] = {}
    unverified: dict[str, None] = {}
    for machine, names in installed.items():
        for name, version in sorted(names.items()):
            if name not in stack.releases:
                continue
            found, facts = _judge_one(stack, target, machine, name, version)
            unverified.update(dict.fromkeys(facts))
            for f in found:  # the machine is named once, after the message
                f = Finding(
                    f.severity, f.code, f.message.replace(f" on Python {machine.python}", "")
                )
                where.setdefault(f, []).append(str(machine))
    every = len(installed)
    for f, machines in where.items():
        on = "" if len(machines) == every else f" (on {', '.join(machines)})"
        report.findings.append(
            Finding(f.severity, "stack" if f.severity == ERROR else f.code, f.message + on)
        )
    for name in sorted({n for names in installed.values() for n in names} - set(stack.releases)):
        named = _named_cuda(name)
        if named is not None and target.cuda is not None and named != target.cuda.major:
            report.findings.append(
                Finding(
                    NOTE,
                    "stack",
                    f"{name} is named for CUDA {named} (torch is a CUDA {target.cuda.major} "
                    "build); the stack facts hold nothing on it, so it is not judged",
                )
            )
    if unverified:
        report.findings.append(
            Finding(NOTE, "stack", "rests on unverified facts: " + "; ".join(unverified))
        )
