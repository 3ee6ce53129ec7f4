"""What a Python package index publishes: the files of a project and their sha256.

``IndexHashes(index_url).files(project)`` reads the index's simple API for one project — the
JSON form (PEP 691) when the index speaks it, else the HTML form's ``#sha256=`` link
fragments (PEP 503) — and returns ``{filename: sha256}``. Answers are kept per project, so a
verification asks each project once. ``verify --check-channels`` compares the hashes of a pip
or uv lock with these; only metadata is read, never a wheel.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser

from lockgen.errors import LockgenError

_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
_TIMEOUT_S = 60


def canonical_name(name: str) -> str:
    """A project name as indexes compare it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def file_release(filename: str) -> tuple[str, str] | None:
    """(canonical project, version) of a wheel or sdist file name; None if it is neither."""
    filename = urllib.parse.unquote(filename)
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return (canonical_name(parts[0]), parts[1]) if len(parts) >= 5 else None
    for ext in (".tar.gz", ".zip"):
        if filename.endswith(ext):
            name, _, version = filename[: -len(ext)].rpartition("-")
            return (canonical_name(name), version) if name else None
    return None


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)


@dataclass
class IndexHashes:
    index_url: str
    _cache: dict[str, dict[str, str]] = field(default_factory=dict)

    def files(self, project: str) -> dict[str, str]:
        key = canonical_name(project)
        if key not in self._cache:
            self._cache[key] = self._fetch(key)
        return self._cache[key]

    def release_hashes(self, project: str, version: str) -> set[str]:
        """Every sha256 the index publishes for files of ``project`` ``version``."""
        want = (canonical_name(project), version)
        return {h for name, h in self.files(project).items() if file_release(name) == want}

    def _fetch(self, project: str) -> dict[str, str]:
        url = self.index_url.rstrip("/") + f"/{project}/"
        req = urllib.request.Request(url, headers={"Accept": _ACCEPT})
        try:
            with urllib.request.urlopen(req, timeout=_TIMEOUT_S) as resp:
                kind = resp.headers.get("Content-Type", "")
                body = resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return {}
            raise LockgenError(f"cannot read {url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise LockgenError(f"cannot read {url}: {exc}") from None
        if "json" in kind:
            try:
                data = json.loads(body)
            except ValueError:
                raise LockgenError(f"{url} did not answer JSON") from None
            return {
                f["filename"]: f["hashes"]["sha256"]
                for f in data.get("files", [])
                if "filename" in f and "sha256" in (f.get("hashes") or {})
            }
        links = _Links()
        links.feed(body)
        out = {}
        for href in links.hrefs:
            path, _, frag = href.partition("#")
            if frag.startswith("sha256="):
                out[urllib.parse.unquote(path.rsplit("/", 1)[-1])] = frag[len("sha256=") :]
        return out
