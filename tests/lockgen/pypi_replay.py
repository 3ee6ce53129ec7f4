"""Recorded PyPI responses for lockgen's refresh-stack tests, replayed offline.

``Replay(folder)`` is a :data:`lockgen.pypi.Get` that answers from ``folder/responses.json``
(``"URL|Range" -> body file``); a request that was not recorded fails the test.

Recording (needs PyPI): ``python tests/lockgen/pypi_replay.py FOLDER PACKAGE...`` runs
``refresh(..., releases=1)`` through the real network and keeps every response, the JSON
index trimmed to the files of the release read (the rest of a response is kept byte for
byte). ``... FOLDER --member PACKAGE FILENAME MEMBER`` keeps what reading one member's ELF
``DT_NEEDED`` takes (its local header and deflated bytes), and the member's central-directory
entry (name, method, sizes, offset) in ``member.json``, without the central directory itself.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

from lockgen import pypi
from lockgen.stack_refresh import recent_releases, refresh


def _key(url: str, headers: Mapping[str, str]) -> str:
    return f"{url}|{headers.get('Range', '')}"


class Replay:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "responses.json").read_text())
        self.asked: list[str] = []

    def __call__(self, url: str, headers: Mapping[str, str]) -> bytes:
        k = _key(url, headers)
        self.asked.append(k)
        if k not in self.index:
            raise AssertionError(f"not recorded: {k}")
        return (self.folder / self.index[k]).read_bytes()


def _trim_index(name: str, body: bytes) -> bytes:
    data = json.loads(body)
    files = [pypi.File(f["filename"], f["url"], 0, "", False) for f in data["files"]]
    keep = {f.filename for fs in recent_releases(name, files, 1).values() for f in fs}
    data["files"] = [f for f in data["files"] if f["filename"] in keep]
    data["versions"] = sorted({pypi.file_version(name, f) for f in keep})
    return json.dumps(data, indent=1).encode()


def _recorder(folder: Path, index: dict[str, str]) -> pypi.Get:
    folder.mkdir(parents=True, exist_ok=True)

    def get(url: str, headers: Mapping[str, str]) -> bytes:
        if _key(url, headers) in index:  # asked again: the same bytes
            return (folder / index[_key(url, headers)]).read_bytes()
        body = pypi.urllib_get(url, headers)
        if url.startswith(pypi.SIMPLE):
            body = _trim_index(url.rstrip("/").rsplit("/", 1)[1], body)
        name = f"{len(index):03d}.bin"
        (folder / name).write_bytes(body)
        index[_key(url, headers)] = name
        return body

    return get


def record(folder: Path, packages: list[str]) -> None:
    index: dict[str, str] = {}
    refresh(_recorder(folder, index), packages, 1)
    (folder / "responses.json").write_text(json.dumps(index, indent=1) + "\n")


def record_member(folder: Path, package: str, filename: str, member: str) -> None:
    f = next(f for f in pypi.index_files(pypi.urllib_get, package) if f.filename == filename)
    m = pypi.members(pypi.Remote(pypi.urllib_get, f.url, f.size))[member]
    index: dict[str, str] = {}
    needed = pypi.elf_needed(pypi.Remote(_recorder(folder, index), f.url, f.size), m)
    (folder / "responses.json").write_text(json.dumps(index, indent=1) + "\n")
    facts = {"url": f.url, "size": f.size, "member": m.__dict__, "needed": needed}
    (folder / "member.json").write_text(json.dumps(facts, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[2] == "--member":
        record_member(Path(sys.argv[1]), *sys.argv[3:6])
    else:
        record(Path(sys.argv[1]), sys.argv[2:])
