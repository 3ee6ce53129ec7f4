"""What lockgen verify finds."""

from __future__ import annotations

from dataclasses import dataclass, field

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Finding:
    level: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper()} [{self.check}] {self.message}"


@dataclass
class Report:
    path: str
    target: str | None
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.level == ERROR for f in self.findings)

    def error(self, check: str, message: str) -> None:
        self.findings.append(Finding(ERROR, check, message))

    def warn(self, check: str, message: str) -> None:
        self.findings.append(Finding(WARNING, check, message))

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
            "findings": [f.__dict__ for f in self.findings],
            "checked": self.checked,
        }
