"""A tiny local conda channel for the lock tests, built from scratch in a temp folder.

Packages are named, versioned and related like the real ones (a few bytes each):

* legacy ``pytorch`` + ``nvidia`` style (targets on the ``pytorch`` channel): ``pytorch 2.5.1``
  with builds ``py3.11_cuda{11.8,12.1,12.4}_cudnn9.1.0_0`` and ``py3.11_cpu_0`` (equal build
  numbers, as on the real channel), ``pytorch-mutex 1.0 cuda|cpu``, ``cpuonly``, the
  ``pytorch-cuda`` metapackage (``noarch``), ``cuda-cudart`` tied to ``cuda-version``;
* conda-forge style: ``pytorch 2.14.1`` / ``2.8.0`` with builds ``cuda130_mkl_py311_h1234567_200``
  (build number +200, depends on ``__cuda`` and ``cuda-version``) and
  ``cpu_mkl_py311_h1234567_100``, ``torchvision`` builds to match, ``cuda-version X.Y``
  (``noarch``, constrains ``__cuda >=X``);
* the rest of an environment: ``python 3.11`` (needs ``__glibc``), ``numpy``, ``ninja``, ``pip``.

``build_channel(root, platforms)`` writes ``.tar.bz2`` files (``info/index.json``,
``info/paths.json`` with ``paths_version`` 1, ``info/files`` and one payload file) and indexes
the folder with ``rattler.index.index_fs``; it returns the folder (use ``.as_uri()``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

PY = "python >=3.11,<3.12.0a0"


@dataclass(frozen=True)
class Pkg:
    name: str
    version: str
    build: str
    build_number: int = 0
    depends: tuple[str, ...] = ()
    constrains: tuple[str, ...] = ()
    noarch: bool = False
    track_features: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{self.build}.tar.bz2"


def _legacy() -> list[Pkg]:
    pkgs = [
        Pkg("pytorch-mutex", "1.0", "cuda", noarch=True),
        Pkg("pytorch-mutex", "1.0", "cpu", noarch=True),
        Pkg("cpuonly", "2.0", "0", depends=("pytorch-mutex 1.0 cpu",), noarch=True),
    ]
    for cuda, cudart in (("11.8", "11.8.89"), ("12.1", "12.1.105"), ("12.4", "12.4.127")):
        major, minor = cuda.split(".")
        nxt = f"{major}.{int(minor) + 1}"
        tag = f"cu{major}{minor}"
        pkgs += [
            Pkg(
                "cuda-version",
                cuda,
                "h0_3",
                depends=(),
                constrains=(f"__cuda >={major}", f"cudatoolkit {cuda}|{cuda}.*"),
                noarch=True,
            ),
            Pkg("cuda-cudart", cudart, "0", depends=(f"cuda-version >={cuda},<{nxt}",)),
            Pkg(
                "pytorch-cuda",
                cuda,
                "h7e8d1f5_6",
                noarch=True,
                depends=(f"cuda-cudart >={cuda},<{nxt}",),
            ),
            Pkg(
                "pytorch",
                "2.5.1",
                f"py3.11_cuda{cuda}_cudnn9.1.0_0",
                0,
                depends=(
                    PY,
                    "pytorch-mutex 1.0 cuda",
                    f"pytorch-cuda >={cuda},<{nxt}",
                    "__glibc >=2.17",
                ),
                constrains=("cpuonly <0",),
            ),
            Pkg(
                "torchvision",
                "0.20.1",
                f"py311_{tag}",
                0,
                depends=(PY, "pytorch 2.5.1", "pytorch-mutex 1.0 cuda", f"pytorch-cuda {cuda}.*"),
            ),
        ]
    pkgs += [
        Pkg(
            "pytorch",
            "2.5.1",
            "py3.11_cpu_0",
            0,
            depends=(PY, "pytorch-mutex 1.0 cpu", "__glibc >=2.17"),
        ),
        Pkg(
            "torchvision",
            "0.20.1",
            "py311_cpu",
            0,
            depends=(PY, "pytorch 2.5.1", "pytorch-mutex 1.0 cpu"),
        ),
    ]
    return pkgs


def _conda_forge() -> list[Pkg]:
    pkgs: list[Pkg] = []
    for cuda in ("12.6", "12.8", "12.9", "13.0"):
        major = cuda.split(".")[0]
        pkgs.append(
            Pkg(
                "cuda-version",
                cuda,
                "h0_3",
                constrains=(f"__cuda >={major}", f"cudatoolkit {cuda}|{cuda}.*"),
                noarch=True,
            )
        )
    for torch, vision, cudas in (
        ("2.14.1", "0.29.1", ("12.6", "13.0")),
        ("2.8.0", "0.23.0", ("12.8", "12.9")),
    ):
        for cuda in cudas:
            major = int(cuda.split(".")[0])
            nodot = cuda.replace(".", "")
            pkgs += [
                Pkg(
                    "pytorch",
                    torch,
                    f"cuda{nodot}_mkl_py311_h1234567_200",
                    200,
                    depends=(PY, "__cuda", f"cuda-version >={cuda},<{major + 1}", "__glibc >=2.17"),
                ),
                Pkg(
                    "torchvision",
                    vision,
                    f"cuda{nodot}_py311_h89abcde_0",
                    0,
                    depends=(
                        PY,
                        f"pytorch {torch} cuda*",
                        "__cuda",
                        f"cuda-version >={cuda},<{major + 1}",
                    ),
                ),
            ]
        pkgs += [
            Pkg(
                "pytorch", torch, "cpu_mkl_py311_h1234567_100", 100, depends=(PY, "__glibc >=2.17")
            ),
            Pkg(
                "torchvision",
                vision,
                "cpu_py311_h89abcde_0",
                0,
                depends=(PY, f"pytorch {torch} cpu*"),
            ),
        ]
    return pkgs


def _base() -> list[Pkg]:
    return [
        Pkg("python", "3.11.9", "hb806964_0_cpython", 0, depends=("__glibc >=2.17",)),
        Pkg("numpy", "2.1.3", "py311h71ddf71_0", 0, depends=(PY,)),
        Pkg("ninja", "1.12.1", "h297d8ca_0", 0),
        Pkg("pip", "24.3.1", "pyh8b19718_0", 0, depends=(PY,), noarch=True),
    ]


def all_packages() -> list[Pkg]:
    return _base() + _legacy() + _conda_forge()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_package(folder: Path, pkg: Pkg, subdir: str) -> Path:
    """One ``.tar.bz2`` conda package with a single text payload file."""
    folder.mkdir(parents=True, exist_ok=True)
    payload_path = f"share/lockgen-test/{pkg.name}-{pkg.version}-{pkg.build}.txt"
    payload = f"{pkg.name} {pkg.version} {pkg.build}\n".encode()
    index = {
        "name": pkg.name,
        "version": pkg.version,
        "build": pkg.build,
        "build_number": pkg.build_number,
        "depends": list(pkg.depends),
        "constrains": list(pkg.constrains),
        "subdir": "noarch" if pkg.noarch else subdir,
        "license": "BSD-3-Clause",
        "timestamp": 1_700_000_000_000,
        **({"noarch": "generic"} if pkg.noarch else {}),
        **({"track_features": pkg.track_features} if pkg.track_features else {}),
        **pkg.extra,
    }
    if not pkg.noarch:
        index["platform"], index["arch"] = {
            "linux-64": ("linux", "x86_64"),
            "linux-aarch64": ("linux", "aarch64"),
            "win-64": ("win", "x86_64"),
        }[subdir]
    paths = {
        "paths_version": 1,
        "paths": [
            {
                "_path": payload_path,
                "path_type": "hardlink",
                "sha256": hashlib.sha256(payload).hexdigest(),
                "size_in_bytes": len(payload),
            }
        ],
    }
    out = folder / pkg.filename
    with tarfile.open(out, "w:bz2") as tar:
        _tar_add(tar, "info/index.json", json.dumps(index, indent=2).encode())
        _tar_add(tar, "info/paths.json", json.dumps(paths, indent=2).encode())
        _tar_add(tar, "info/files", (payload_path + "\n").encode())
        _tar_add(tar, payload_path, payload)
    return out


def build_channel(
    root: Path, platforms: tuple[str, ...] = ("linux-64",), packages: list[Pkg] | None = None
) -> Path:
    """Write and index the channel under ``root``; returns ``root``."""
    from rattler.index import index_fs

    root.mkdir(parents=True, exist_ok=True)
    (root / "noarch").mkdir(exist_ok=True)
    for pkg in packages if packages is not None else all_packages():
        subdirs = ("noarch",) if pkg.noarch else platforms
        for subdir in subdirs:
            write_package(root / subdir, pkg, subdir)
    for subdir in platforms:
        (root / subdir).mkdir(exist_ok=True)
    asyncio.run(index_fs(root, write_zst=False, write_shards=False))
    return root


def render_and_lock(matrix, envs: Path, channel: Path, cache: Path, names=None) -> dict:
    """Render and lock targets (every one with a conda channel by default) against the local
    channel; {name: result}."""
    from lockgen.formats.conda import render_target
    from lockgen.solve import RattlerSolver, lock_target

    out = {}
    for name in names or [n for n, t in matrix.targets.items() if t.has_conda]:
        target = matrix.target(name)
        render_target(matrix, target, envs, allow_unverified=True)
        out[name] = lock_target(
            matrix,
            target,
            envs,
            RattlerSolver(cache_dir=cache),
            channels=[channel.as_uri()],
            allow_unverified=True,
        )
    return out
