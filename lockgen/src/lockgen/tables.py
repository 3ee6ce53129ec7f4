"""A facts file's TOML, read with type checks: :func:`read_toml` reads a file,
:class:`Table` one table of it (every error names the file, the table and the problem, as a
:class:`~lockgen.errors.MatrixError`), :func:`check_top` its top level (``schema = 1`` and no
unknown key). The matrix, GPU, targets and Nix loaders all read through it."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from lockgen.errors import LockgenError, MatrixError
from lockgen.matrix import PLATFORMS
from lockgen.provenance import Provenance
from lockgen.versions import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SCHEMA = 1


class Table:
    """Reads one TOML table with type checks; every error names file, entry and problem."""

    def __init__(self, file: Path, label: str, data: object):
        self.file, self.label = file, label
        if not isinstance(data, dict):
            self.fail(f"expected a table, got {type(data).__name__}")
        self.data: dict[str, Any] = dict(data)  # type: ignore[arg-type]
        self.seen: set[str] = set()

    def fail(self, problem: str) -> NoReturn:
        raise MatrixError(f"{self.file}: {self.label}: {problem}")

    def _get(self, key: str, required: bool) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if required:
                self.fail(f"missing key {key!r}")
            return None
        return self.data[key]

    def text(self, key: str, required: bool = True, default: str = "") -> str:
        v = self._get(key, required)
        if v is None:
            return default
        if not isinstance(v, str):
            self.fail(f"{key!r} must be a string, got {v!r}")
        return v

    def flag(self, key: str) -> bool:
        v = self._get(key, True)
        if not isinstance(v, bool):
            self.fail(f"{key!r} must be true or false, got {v!r}")
        return v

    def integer(self, key: str) -> int:
        v = self._get(key, True)
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(f"{key!r} must be an integer, got {v!r}")
        return v

    def strs(self, key: str, required: bool = True) -> tuple[str, ...]:
        v = self._get(key, required)
        if v is None:
            return ()
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            self.fail(f"{key!r} must be a string or a list of strings, got {v!r}")
        return tuple(v)

    def version(self, key: str, required: bool = True) -> Version | None:
        v = self._get(key, required)
        if v is None or v == "":
            if required:
                self.fail(f"{key!r} must not be empty")
            return None
        return self.as_version(v, key)

    def versions(self, key: str, required: bool = True) -> tuple[Version, ...]:
        return tuple(self.as_version(x, key) for x in self.strs(key, required))

    def as_version(self, v: object, key: str) -> Version:
        if not isinstance(v, str):
            self.fail(f'{key!r} must be a version string like "2.1", got {v!r}')
        try:
            parsed = Version.parse(v)
        except LockgenError:
            self.fail(f"bad version {v!r} in {key!r}")
        if parsed.local:
            self.fail(f"bad version {v!r} in {key!r}: no local '+' part allowed here")
        return parsed

    def platform_versions(self, key: str) -> dict[str, tuple[Version, ...]]:
        """An optional ``{platform = ["3.10", ...]}`` table."""
        out: dict[str, tuple[Version, ...]] = {}
        for platform, raw in self.table(key, required=False).items():
            if platform not in PLATFORMS:
                self.fail(f"{key}: unknown platform {platform!r} (known: {', '.join(PLATFORMS)})")
            if not isinstance(raw, list) or not raw:
                self.fail(f"{key}.{platform} must be a non-empty list of versions")
            out[platform] = tuple(self.as_version(x, f"{key}.{platform}") for x in raw)
        return out

    def table(self, key: str, required: bool = True) -> dict[str, Any]:
        v = self._get(key, required)
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.fail(f"{key!r} must be a table")
        return v

    def tables(self, key: str) -> list[Any]:
        v = self._get(key, False)
        if v is None:
            return []
        if not isinstance(v, list):
            self.fail(f"{key!r} must be an array of tables ([[{key}]])")
        return v

    def provenance(self, sources: Mapping[str, str]) -> Provenance:
        src = self.strs("source")
        if not src:
            self.fail("'source' must name at least one source")
        for s in src:
            if s not in sources:
                self.fail(f"unknown source {s!r} (define it in [sources])")
        return Provenance(src, self.flag("verified"), self.text("note", required=False))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            self.fail(
                f"unknown key {unknown[0]!r}"
                + (f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else "")
            )


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise MatrixError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise MatrixError(f"{path}: is a folder, not a TOML file") from None
    except OSError as exc:
        raise MatrixError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise MatrixError(f"{path}: not UTF-8 text: {exc}") from None
    except RecursionError:
        raise MatrixError(f"{path}: not valid TOML: nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        raise MatrixError(f"{path}: not valid TOML: {exc}") from None


def check_top(top: Table, allowed: Iterable[str] = ("schema",)) -> None:
    for key in allowed:
        top.seen.add(key)
    schema = top.data.get("schema")
    if schema != SCHEMA:
        top.fail(f"'schema' must be {SCHEMA}, got {schema!r}")
    top.done()
