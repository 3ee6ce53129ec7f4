"""What ``check``, ``doctor`` and ``verify`` find: one :class:`Finding` (a :class:`Severity`, a
stable ``code``, a message), one JSON shape for it (``{"severity", "code", "message"}``), and
the :class:`Report` of one verified lockfile."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Severity(str, Enum):
    """How much a finding matters, least first. A member equals its value (``"error"``)."""

    OK = "ok"
    NOTE = "note"
    WARNING = "warning"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


OK, NOTE, WARNING, ERROR = Severity.OK, Severity.NOTE, Severity.WARNING, Severity.ERROR


@dataclass(frozen=True)
class Finding:
    """One thing found: its ``severity``, a stable ``code`` (the constraint or check it is
    about: ``gpu``, ``driver``, ``hash``, ...) and a message for people."""

    severity: Severity
    code: str
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "severity", Severity(self.severity))  # a misspelt one fails

    def __str__(self) -> str:
        return f"{self.severity.value.upper()} [{self.code}] {self.message}"

    def to_json(self) -> dict:
        return {"severity": self.severity.value, "code": self.code, "message": self.message}


@dataclass
class Report:
    """What ``verify`` found in one lockfile (``path``), made for ``target``."""

    path: str
    target: str | None
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == ERROR for f in self.findings)

    def error(self, code: str, message: str) -> None:
        self.findings.append(Finding(ERROR, code, message))

    def warn(self, code: str, message: str) -> None:
        self.findings.append(Finding(WARNING, code, message))

    def format(self) -> str:
        head = f"{self.path} (target {self.target or '?'}): "
        head += "OK" if self.ok else "FAILED"
        lines = [head, *(f"  {f}" for f in self.findings)]
        if self.ok and self.checked:
            lines.append(f"  checked: {', '.join(self.checked)}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "target": self.target,
            "ok": self.ok,
            "findings": [f.to_json() for f in self.findings],
            "checked": self.checked,
        }
