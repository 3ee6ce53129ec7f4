"""conda-lock lockfiles, read and written through conda-lock's own models.

Everything here goes through ``conda_lock`` itself so that ``conda-lock install`` /
``conda-lock render`` accept what lockgen writes and lockgen reads what conda-lock writes:

* the lock *specification* comes from ``conda_lock.src_parser.make_lock_spec`` reading
  ``envs/<target>.yml`` (with ``--channel`` overrides exactly as ``conda-lock lock --channel``
  applies them);
* the per-platform ``content_hash`` is ``conda_lock.content_hash.compute_content_hashes`` of
  that specification and the virtual-package repo built from
  ``envs/<target>.virtual-packages.yml`` by
  ``conda_lock.virtual_package.virtual_package_repo_from_specification`` — the same two calls
  ``conda-lock lock -f ENV --virtual-package-spec VP`` makes. (Semantics, for reference: per
  platform, sha256 of the sorted-keys JSON of the channels, the platform's dependency specs
  sorted by (manager, name), and the virtual packages' fake repodata for that platform and
  noarch.) So a lock made by lockgen and one made by conda-lock from the same inputs carry
  the same hashes, and editing either input makes ``verify`` report the lock as stale;
* files are written with ``conda_lock.lockfile.write_conda_lock_file`` (version 1 format) and
  read with ``parse_conda_lock_file``.

conda-lock filters virtual packages out of the lockfile, so what a lock was solved for is
kept in ``metadata.custom_metadata`` under the ``lockgen.*`` keys (:data:`META_TARGET` etc.).
"""

from __future__ import annotations

import functools
import json
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lockgen.errors import LockgenError
from lockgen.output import write_text

if TYPE_CHECKING:  # pragma: no cover
    from conda_lock.lockfile.v2prelim.models import LockedDependency, Lockfile
    from conda_lock.models.lock_spec import LockSpecification

META_TARGET = "lockgen.target"
META_CUDA = "lockgen.cuda"  # the __cuda the solve assumed ("" for a CPU target)
META_VIRTUAL_PACKAGES = "lockgen.virtual_packages"  # JSON {platform: {name: "version"}}
META_ENGINE = "lockgen.engine"
META_CHANNEL_OVERRIDES = "lockgen.channel_overrides"  # JSON list, [] when none
META_CHANNEL_SUPPORT = "lockgen.channel_support"  # supplied / unknown (render's verdict)


def _require_conda_lock():
    """Import conda-lock (quietly: its vendored conda warns about its own deprecations)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            import conda_lock.content_hash  # noqa: F401
            import conda_lock.lockfile  # noqa: F401
            import conda_lock.src_parser  # noqa: F401
            import conda_lock.virtual_package  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LockgenError("this command needs conda-lock (pip install conda-lock==4.0.3)") from exc


def lock_spec(env_file: Path, channel_overrides: Sequence[str] = ()) -> LockSpecification:
    """The conda-lock specification of an environment file, as ``conda-lock lock`` sees it."""
    _require_conda_lock()
    from conda_lock.lookup import DEFAULT_MAPPING_URL
    from conda_lock.src_parser import make_lock_spec

    if not env_file.exists():
        raise LockgenError(
            f"{env_file} does not exist: run `lockgen render "
            f"{env_file.name.removesuffix('.yml')}` first"
        )
    load_yaml(env_file)  # refuses aliases before conda-lock's own reader expands them
    try:
        return make_lock_spec(
            src_files=[env_file],
            channel_overrides=list(channel_overrides) or None,
            mapping_url=DEFAULT_MAPPING_URL,
        )
    except Exception as exc:
        raise LockgenError(f"{env_file}: conda-lock cannot read it: {exc}") from exc


def read_virtual_packages(vp_file: Path) -> dict[str, dict[str, str]]:
    """``{platform: {name: "version[ build]"}}`` from a conda-lock virtual-package spec."""
    if not vp_file.exists():
        raise LockgenError(f"{vp_file} does not exist: run `lockgen render` first")
    data = load_yaml(vp_file) or {}
    try:
        out: dict[str, dict[str, str]] = {}
        for platform, sub in (data.get("subdirs") or {}).items():
            out[platform] = {k: str(v) for k, v in ((sub or {}).get("packages") or {}).items()}
    except (AttributeError, TypeError) as exc:
        raise LockgenError(f"{vp_file} is not a virtual-package spec: {exc}") from None
    return out


def content_hashes(spec: LockSpecification, vp_file: Path) -> dict[str, str]:
    """conda-lock's per-platform content hash of ``spec`` + the virtual-package spec file."""
    _require_conda_lock()
    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.virtual_package import virtual_package_repo_from_specification

    repo = virtual_package_repo_from_specification(vp_file)
    return compute_content_hashes(spec, repo)


def build_lockfile(
    packages: Sequence[LockedDependency],
    spec: LockSpecification,
    hashes: Mapping[str, str],
    sources: Sequence[str],
    custom: Mapping[str, str],
) -> Lockfile:
    _require_conda_lock()
    from conda_lock.lockfile.v1.models import LockMeta, TimeMeta
    from conda_lock.lockfile.v2prelim.models import Lockfile

    return Lockfile(
        package=list(packages),
        metadata=LockMeta(
            content_hash=dict(hashes),
            channels=list(spec.channels),
            platforms=list(spec.platforms),
            sources=list(sources),
            time_metadata=TimeMeta.create(),
            custom_metadata=dict(custom),
        ),
    )


def lockfile_text(lock: Lockfile, name: str) -> str:
    """The file conda-lock would write for ``lock`` under the file name ``name``."""
    _require_conda_lock()
    from conda_lock.lockfile import write_conda_lock_file

    lock = lock.model_copy(deep=True)
    with tempfile.TemporaryDirectory(prefix="lockgen-") as tmp:
        path = Path(tmp) / name
        write_conda_lock_file(lock, path, metadata_choices=None)
        return path.read_text()


def write_lockfile(lock: Lockfile, path: Path) -> Path:
    """Write atomically: on any failure the previous file at ``path`` is left untouched."""
    return write_text(path, lambda: lockfile_text(lock, path.name))


_MAX_LOCK_BYTES = 256 * 2**20  # far above any real lock (a CUDA lock is well under 1 MiB)


def load_yaml(path: Path) -> object:
    """The YAML document of a lockfile or spec, read with :func:`no_alias_loader` (no
    anchors, no aliases: a kilobyte of nested aliases would otherwise expand to gigabytes);
    any problem is a :class:`LockgenError` naming the file."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise LockgenError(f"{path} does not exist")
    if not path.is_file():
        raise LockgenError(f"{path} is not a file")
    try:
        if path.stat().st_size > _MAX_LOCK_BYTES:
            raise LockgenError(f"{path} is over {_MAX_LOCK_BYTES >> 20} MiB: not a lockfile")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise LockgenError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise LockgenError(f"{path} is not UTF-8 text: {exc}") from None
    try:
        return yaml.load(text, Loader=no_alias_loader())
    except yaml.YAMLError as exc:
        raise LockgenError(f"{path} is not readable YAML: {exc}") from None
    except RecursionError:
        raise LockgenError(f"{path}: YAML nested too deeply") from None


@functools.cache
def no_alias_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses anchors and aliases (built on first use: PyYAML
    comes with the ``lock`` extra)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses anchors (``&a``) and aliases (``*a``)."""

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    "YAML anchors and aliases are not allowed in a lockfile",
                    event.start_mark,
                )
            return super().compose_node(parent, index)

    return _Loader


def read_lockfile(path: Path) -> Lockfile:
    """Parse a conda-lock lockfile as ``conda_lock.lockfile.parse_conda_lock_file`` does
    (versions 1 and 2), from YAML read by :func:`load_yaml`."""
    _require_conda_lock()
    from conda_lock.lockfile import lockfile_v1_to_v2
    from conda_lock.lockfile.v1.models import Lockfile as LockfileV1
    from conda_lock.lockfile.v2prelim.models import Lockfile

    path = Path(path)
    content = load_yaml(path)
    if not isinstance(content, dict):
        raise LockgenError(f"{path} is not a conda-lock lockfile: not a YAML mapping")
    version = content.pop("version", None)
    try:
        if version == 1:
            lock = lockfile_v1_to_v2(LockfileV1.model_validate(content))
        elif version == 2:
            lock = Lockfile.model_validate(content)
        else:
            raise LockgenError(
                f"{path} is not a conda-lock lockfile: version {version!r} (lockgen reads 1 and 2)"
            )
        lock.toposort_inplace()
    except LockgenError:
        raise
    except Exception as exc:
        raise LockgenError(f"{path} is not a conda-lock lockfile: {exc}") from None
    return lock


def custom(lock: Lockfile) -> dict[str, str]:
    return dict(lock.metadata.custom_metadata or {})


def recorded_virtual_packages(lock: Lockfile) -> dict[str, dict[str, str]]:
    raw = custom(lock).get(META_VIRTUAL_PACKAGES)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {}


def recorded_channel_overrides(lock: Lockfile) -> list[str]:
    raw = custom(lock).get(META_CHANNEL_OVERRIDES)
    try:
        return list(json.loads(raw)) if raw else []
    except ValueError:
        return []
