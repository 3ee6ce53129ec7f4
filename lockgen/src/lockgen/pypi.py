"""Reading a package's facts from PyPI without downloading its files whole.

Every network call goes through one :data:`Get` (``get(url, headers) -> bytes``), so tests
replay recorded responses. What is read:

- the JSON simple index (``/simple/<name>/``, PEP 691): file names, sizes, upload times;
- a file's core metadata: PEP 658 ``<file>.metadata`` when the index has it, else the
  ``*.dist-info/METADATA`` member of the wheel through HTTP range requests;
- the zip central directory of a wheel (its tail), then one member's local header and as much
  of its deflated bytes as it takes to read an ELF shared object's ``DT_NEEDED`` entries (the
  program headers, the dynamic segment, the string table), capped at :data:`ELF_READ_CAP`.
"""

from __future__ import annotations

import email.parser
import json
import re
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from lockgen.errors import LockgenError

Get = Callable[[str, Mapping[str, str]], bytes]
SIMPLE = "https://pypi.org/simple"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
ELF_READ_CAP = 48 << 20
"""The most compressed bytes read of one member to reach its dynamic section."""
CHUNK = 1 << 20


class PypiError(LockgenError):
    """PyPI could not be read, or what it served is not what was expected."""


def urllib_get(url: str, headers: Mapping[str, str]) -> bytes:
    """The real network: one GET with a timeout; an HTTP or network error is a PypiError."""
    req = urllib.request.Request(url, headers={"User-Agent": "lockgen", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = resp.read()
            if "Range" in headers and resp.status != 206:
                raise PypiError(f"{url}: the server ignored the range request")
            return body
    except urllib.error.HTTPError as exc:
        raise PypiError(f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise PypiError(f"{url}: {getattr(exc, 'reason', exc)}") from None


# -- the index --------------------------------------------------------------------------------


@dataclass(frozen=True)
class File:
    filename: str
    url: str
    size: int
    uploaded: str  # YYYY-MM-DD
    has_metadata: bool  # PEP 658

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")

    @property
    def tags(self) -> tuple[str, str, str]:
        """A wheel's (python, abi, platform) tags; ("source", "", "") for an sdist."""
        if not self.is_wheel:
            return ("source", "", "")
        parts = self.filename[: -len(".whl")].split("-")
        return (parts[-3], parts[-2], parts[-1])


def index_files(get: Get, name: str) -> list[File]:
    body = get(f"{SIMPLE}/{name}/", {"Accept": SIMPLE_JSON})
    try:
        data = json.loads(body)
        return [
            File(
                f["filename"],
                f["url"],
                int(f.get("size") or 0),
                str(f.get("upload-time") or "")[:10],
                bool(f.get("core-metadata") or f.get("data-dist-info-metadata")),
            )
            for f in data["files"]
            if not f.get("yanked")
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise PypiError(f"{SIMPLE}/{name}/: not a PEP 691 JSON index ({exc})") from None


def file_version(name: str, filename: str) -> str:
    """The version part of a distribution file name (``xformers-0.0.35-py39-...whl``)."""
    stem = filename[: -len(".whl")] if filename.endswith(".whl") else filename
    for ext in (".tar.gz", ".zip", ".tar.bz2"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    prefix = re.sub(r"[-_.]+", "_", name).lower() + "-"
    norm = re.sub(r"[-_.]+", "_", stem.split("-")[0]).lower() + "-"
    if norm != prefix:
        return ""
    return stem.split("-")[1] if "-" in stem else ""


# -- ranges and zips --------------------------------------------------------------------------


class Remote:
    """A file on PyPI's file host, read by byte range."""

    def __init__(self, get: Get, url: str, size: int):
        self.get, self.url, self.size = get, url, size
        self.fetched = 0

    def read(self, start: int, length: int) -> bytes:
        end = min(self.size, start + length) - 1
        if end < start:
            return b""
        body = self.get(self.url, {"Range": f"bytes={start}-{end}"})
        if len(body) != end - start + 1:
            raise PypiError(f"{self.url}: asked for {end - start + 1} bytes, got {len(body)}")
        self.fetched += len(body)
        return body


@dataclass(frozen=True)
class Member:
    name: str
    method: int
    compressed: int
    size: int
    offset: int  # of its local header


def _zip64_extra(extra: bytes, fields: list[int]) -> list[int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            vals = list(fields)
            q = pos + 4
            for i, v in enumerate(vals):
                if v == 0xFFFFFFFF and q + 8 <= pos + 4 + n:
                    vals[i] = struct.unpack_from("<Q", extra, q)[0]
                    q += 8
            return vals
        pos += 4 + n
    return fields


def members(remote: Remote) -> dict[str, Member]:
    """The central directory of a zip, read from its tail (and, if longer, its own range)."""
    for tail_len in (min(remote.size, 4096), min(remote.size, 65536 + 22)):
        tail = remote.read(remote.size - tail_len, tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at >= 0:
            break
    else:
        raise PypiError(f"{remote.url}: no zip end-of-central-directory record")
    cd_size, cd_offset = struct.unpack_from("<II", tail, at + 12)
    if cd_offset == 0xFFFFFFFF and at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":
        eocd64 = struct.unpack_from("<Q", tail, at - 12)[0]
        rec = remote.read(eocd64, 56)
        cd_size, cd_offset = struct.unpack_from("<QQ", rec, 40)
    start_in_tail = cd_offset - (remote.size - tail_len)
    if start_in_tail >= 0:
        cd = tail[start_in_tail : start_in_tail + cd_size]
    else:
        cd = remote.read(cd_offset, cd_size)
    out: dict[str, Member] = {}
    pos = 0
    while pos + 46 <= len(cd) and cd[pos : pos + 4] == b"PK\x01\x02":
        method = struct.unpack_from("<H", cd, pos + 10)[0]
        comp, size, nlen, xlen, clen = struct.unpack_from("<IIHHH", cd, pos + 20)
        offset = struct.unpack_from("<I", cd, pos + 42)[0]
        name = cd[pos + 46 : pos + 46 + nlen].decode("utf-8", "replace")
        extra = cd[pos + 46 + nlen : pos + 46 + nlen + xlen]
        size, comp, offset = _zip64_extra(extra, [size, comp, offset])
        out[name] = Member(name, method, comp, size, offset)
        pos += 46 + nlen + xlen + clen
    if not out:
        raise PypiError(f"{remote.url}: empty or unreadable zip central directory")
    return out


def _member_chunks(remote: Remote, m: Member, cap: int) -> Iterator[bytes]:
    """The member's uncompressed bytes, chunk by chunk, reading at most ``cap`` compressed."""
    head = remote.read(m.offset, 30)
    if head[:4] != b"PK\x03\x04":
        raise PypiError(f"{remote.url}: {m.name}: no local file header at {m.offset}")
    nlen, xlen = struct.unpack_from("<HH", head, 26)
    start, left = m.offset + 30 + nlen + xlen, m.compressed
    if m.method not in (0, 8):
        raise PypiError(f"{remote.url}: {m.name}: compression method {m.method} not supported")
    inflate = zlib.decompressobj(-15) if m.method == 8 else None
    read = 0
    while left > 0:
        if read >= cap:
            raise PypiError(f"{remote.url}: {m.name}: gave up after {cap >> 20} MiB compressed")
        n = min(CHUNK, left)
        raw = remote.read(start, n)
        start, left, read = start + n, left - n, read + n
        yield inflate.decompress(raw) if inflate else raw


def read_member(remote: Remote, m: Member, cap: int = 4 << 20) -> bytes:
    return b"".join(_member_chunks(remote, m, cap))


# -- ELF --------------------------------------------------------------------------------------


class _Prefix:
    """The uncompressed prefix of a member, grown on demand."""

    def __init__(self, chunks: Iterator[bytes], label: str):
        self.chunks, self.buf, self.label = chunks, bytearray(), label

    def read(self, off: int, n: int) -> bytes:
        while len(self.buf) < off + n:
            chunk = next(self.chunks, None)
            if chunk is None:
                raise PypiError(f"{self.label}: truncated (needs byte {off + n})")
            self.buf += chunk
        return bytes(self.buf[off : off + n])


def elf_needed(remote: Remote, m: Member, cap: int = ELF_READ_CAP) -> tuple[str, ...]:
    """The ``DT_NEEDED`` entries of a 64-bit little-endian ELF member, in order."""
    p = _Prefix(_member_chunks(remote, m, cap), f"{remote.url}!{m.name}")
    return parse_needed(p.read, p.label)


def file_needed(path: str) -> tuple[str, ...]:
    """The ``DT_NEEDED`` entries of a shared object on disk (its headers only are read)."""
    with open(path, "rb") as fh:

        def read(off: int, n: int) -> bytes:
            fh.seek(off)
            got = fh.read(n)
            if len(got) != n:
                raise PypiError(f"{path}: ELF truncated (needs byte {off + n})")
            return got

        return parse_needed(read, path)


def parse_needed(read: Callable[[int, int], bytes], label: str) -> tuple[str, ...]:
    """``DT_NEEDED`` of a 64-bit little-endian ELF file read by ``read(offset, length)``:
    the program headers, the dynamic segment, then its string table."""
    head = read(0, 64)
    if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        raise PypiError(f"{label}: not a 64-bit little-endian ELF file")
    phoff = struct.unpack_from("<Q", head, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    ph = read(phoff, phentsize * phnum)
    loads, dynamic = [], None
    for i in range(phnum):
        ptype, _flags, off, vaddr, _pa, filesz = struct.unpack_from("<IIQQQQ", ph, i * phentsize)
        if ptype == 1:
            loads.append((vaddr, off, filesz))
        elif ptype == 2:
            dynamic = (off, filesz)
    if dynamic is None:
        return ()
    dyn = read(dynamic[0], dynamic[1])
    needed, strtab, strsz = [], None, 0
    for pos in range(0, len(dyn) - 15, 16):
        tag, val = struct.unpack_from("<qQ", dyn, pos)
        if tag == 0:
            break
        if tag == 1:
            needed.append(val)
        elif tag == 5:
            strtab = val
        elif tag == 10:
            strsz = val
    if strtab is None:
        raise PypiError(f"{label}: dynamic section without a string table")
    base = next((off + strtab - va for va, off, sz in loads if va <= strtab < va + sz), None)
    if base is None:
        raise PypiError(f"{label}: string table outside every loaded segment")
    table = read(base, strsz)
    return tuple(table[n : table.index(b"\0", n)].decode() for n in needed)


CUDA_LIB = re.compile(r"lib(?:cudart|nvrtc|cublas|cublasLt|cusparse|cufft|curand)\.so\.(\d+)")


def cuda_majors(needed: tuple[str, ...]) -> tuple[int, ...]:
    """The CUDA majors a shared object links (``libcudart.so.12`` -> 12)."""
    return tuple(sorted({int(m.group(1)) for n in needed if (m := CUDA_LIB.fullmatch(n))}))


# -- metadata ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metadata:
    requires_python: str
    requires_dist: tuple[str, ...]


def parse_metadata(text: bytes) -> Metadata:
    msg = email.parser.BytesParser().parsebytes(text, headersonly=True)
    return Metadata(
        str(msg.get("Requires-Python") or "").strip(),
        tuple(str(r).strip() for r in msg.get_all("Requires-Dist") or ()),
    )


def metadata(get: Get, f: File) -> tuple[Metadata, str]:
    """A file's core metadata, and how it was read (``pep658`` or ``range``)."""
    if f.has_metadata:
        return parse_metadata(get(f.url + ".metadata", {})), "pep658"
    remote = Remote(get, f.url, f.size)
    if not f.is_wheel:
        if not f.filename.endswith(".tar.gz"):
            raise PypiError(f"{f.filename}: an sdist that is not a .tar.gz")
        return parse_metadata(sdist_pkg_info(remote)), "range"
    names = members(remote)
    meta = next((n for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
    if meta is None:
        raise PypiError(f"{f.filename}: no .dist-info/METADATA member")
    return parse_metadata(read_member(remote, names[meta])), "range"


def _gzip_chunks(remote: Remote, cap: int) -> Iterator[bytes]:
    """A .tar.gz's uncompressed bytes from its start, read 64 KiB first, then growing."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    start, step = 0, 1 << 16
    while start < min(remote.size, cap):
        raw = remote.read(start, step)
        start, step = start + len(raw), min(step * 2, CHUNK)
        yield inflate.decompress(raw)


def sdist_pkg_info(remote: Remote, cap: int = 16 << 20) -> bytes:
    """The top-level ``PKG-INFO`` of a ``.tar.gz`` sdist, read from its start by range
    requests (tar members are in order; PKG-INFO sits near the front)."""
    p = _Prefix(_gzip_chunks(remote, cap), remote.url)
    pos = 0
    while True:
        head = p.read(pos, 512)
        if head == b"\0" * 512:
            break
        name = head[:100].split(b"\0")[0].decode("utf-8", "replace")
        prefix = head[345:500].split(b"\0")[0].decode("utf-8", "replace")
        size = int(head[124:136].split(b"\0")[0].strip() or b"0", 8)
        full = f"{prefix}/{name}" if prefix else name
        body = pos + 512
        if re.fullmatch(r"[^/]+/PKG-INFO", full) and head[156:157] in (b"0", b"\0"):
            return p.read(body, size)
        pos = body + (size + 511) // 512 * 512
    raise PypiError(f"{remote.url}: no top-level PKG-INFO")
