"""Render ``flake.nix``: one Nix dev shell per target (``nix develop .#cu121``).

Inputs: the validated matrix and targets (:mod:`lockgen.matrix`) and ``lockgen/data/nix.toml``, the
Nix facts: which pinned nixpkgs has which ``cudaPackages_X_Y`` and Python, the CUDA pieces a
shell puts into ``CUDA_HOME``, the unfree licences accepted, the binary caches.

Public API
----------
``load_nix_config(path=None) -> NixConfig``
    Reads and validates ``nix.toml`` (default: beside the matrix). Errors are
    :class:`~lockgen.errors.MatrixError` naming file, entry and problem.
``plan_shells(matrix, config) -> tuple[Shell, ...]``
    Chooses the nixpkgs input, CUDA package set, Python attribute and Nix systems of every
    target. A target whose CUDA version (or Python) no pinned nixpkgs has is a
    :class:`~lockgen.errors.LockgenError` here, at generation time.
``render_flake(matrix, config) -> str``
    The complete, deterministic text of ``flake.nix``.

What a shell provides: Python, ninja, a C++ compiler (``cudaPackages.backendStdenv``, the GCC
that nvcc of that CUDA accepts), ``CUDA_HOME`` joined from the configured CUDA pieces, and a
shellHook (:data:`SHELL_HOOK`) that links only the host driver's ``libcuda*`` / ``libnvidia*``
into a private folder on ``LD_LIBRARY_PATH`` and puts torch into ``.venv-<target>`` from the
target's hash-pinned ``envs/<target>.requirements.txt`` (only when asked: no network by
default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from lockgen.errors import LockgenError, MatrixError
from lockgen.load import fact_label, facts_dir
from lockgen.matrix import Matrix
from lockgen.provenance import Provenance, Sourced
from lockgen.tables import Table, read_toml
from lockgen.targets import Target
from lockgen.versions import Version

SCHEMA = 1
NIX_SYSTEMS = ("x86_64-linux", "aarch64-linux")
_INPUT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_REPO_RE = re.compile(r"^github:[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_REV_RE = re.compile(r"^[0-9a-f]{40}$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_NAR_HASH_RE = re.compile(r"^sha256-[A-Za-z0-9+/]{43}=$")


# --------------------------------------------------------------------------------------------
# The Nix facts


@dataclass(frozen=True)
class NixpkgsInput(Sourced):
    """A nixpkgs flake input pinned to one commit (``rev``, taken from ``branch``), and the
    CUDA package sets and Pythons it provides. ``nar_hash``, when known, is the hash
    ``flake.lock`` must record for that commit."""

    input: str
    repo: str
    rev: str
    branch: str
    cuda: tuple[Version, ...]
    python: tuple[Version, ...]
    removed_cuda: tuple[Version, ...]
    provenance: Provenance
    nar_hash: str = ""
    rev_source: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        """The flake reference: the repository at the pinned commit."""
        return f"{self.repo}/{self.rev}"

    def has(self, cuda: Version | None, python: Version) -> bool:
        return (cuda is None or cuda.minor in self.cuda) and python.minor in self.python


@dataclass(frozen=True)
class Cache(Sourced):
    url: str
    public_key: str
    provenance: Provenance


@dataclass(frozen=True)
class NixConfig:
    path: Path
    description: str
    default: str
    systems: dict[str, str]  # conda platform -> Nix system
    inputs: tuple[NixpkgsInput, ...]
    cuda_packages: tuple[str, ...]
    unfree_licenses: tuple[str, ...]
    caches: tuple[Cache, ...]

    def input(self, name: str) -> NixpkgsInput:
        return next(i for i in self.inputs if i.input == name)


def default_nix_config_path(matrix: Matrix | None = None) -> Path:
    if matrix is not None:
        return Path(matrix.path).with_name("nix.toml")
    return facts_dir() / "nix.toml"


def load_nix_config(path: str | Path | None = None, matrix: Matrix | None = None) -> NixConfig:
    file = Path(path) if path is not None else default_nix_config_path(matrix)
    top = Table(file, "top level", read_toml(file))
    if top.integer("schema") != SCHEMA:
        top.fail(f"'schema' must be {SCHEMA}")
    sources: dict[str, str] = {}
    for k, v in top.table("sources").items():
        if not isinstance(v, str) or not v:
            top.fail(f"source {k!r} must be a non-empty string")
        sources[k] = v

    fl = Table(file, "flake", top.table("flake"))
    description = fl.text("description")
    default = fl.text("default")
    systems_raw = fl.table("systems")
    fl.done()
    systems: dict[str, str] = {}
    for platform, system in systems_raw.items():
        if system not in NIX_SYSTEMS:
            raise MatrixError(
                f"{file}: flake.systems: {platform!r} maps to {system!r}; Nix "
                f"systems with CUDA are {', '.join(NIX_SYSTEMS)}"
            )
        systems[platform] = system
    if not systems:
        fl.fail("'systems' is empty")

    inputs: list[NixpkgsInput] = []
    for i, raw in enumerate(top.tables("nixpkgs")):
        label = f"nixpkgs #{i + 1}"
        if isinstance(raw, dict) and isinstance(raw.get("input"), str):
            label = f"nixpkgs {raw['input']!r}"
        e = Table(file, label, raw)
        name = e.text("input")
        if not _INPUT_RE.match(name) or name == "self":
            e.fail(f"input name {name!r} is not a valid Nix flake input name")
        repo = e.text("repo")
        if not _REPO_RE.match(repo):
            e.fail(f"repo {repo!r} must be a GitHub flake reference like 'github:NixOS/nixpkgs'")
        rev = e.text("rev")
        if not _REV_RE.match(rev):
            e.fail(
                f"rev {rev!r} must be a full 40-hex commit: inputs are pinned by revision, "
                "never by branch"
            )
        branch = e.text("branch")
        if not _BRANCH_RE.match(branch):
            e.fail(f"branch {branch!r} is not a branch name")
        nar_hash = e.text("nar_hash", required=False)
        if nar_hash and not _NAR_HASH_RE.match(nar_hash):
            e.fail(f"nar_hash {nar_hash!r} is not 'sha256-<base64>='")
        rev_source = e.strs("rev_source")
        for s in rev_source:
            if s not in sources:
                e.fail(f"unknown rev_source {s!r} (define it in [sources])")
        cuda, python = e.versions("cuda", required=False), e.versions("python")
        removed = e.versions("removed_cuda", required=False)
        for v in (*cuda, *removed):
            if len(v.raw.split(".")) != 2:
                e.fail(f"CUDA {v} must be major.minor (the cudaPackages_X_Y set)")
        both = sorted(set(cuda) & set(removed))
        if both:
            e.fail(f"CUDA {both[0]} is both in 'cuda' and 'removed_cuda'")
        if not python:
            e.fail("'python' lists no version")
        prov = e.provenance(sources)
        e.done()
        if any(x.input == name for x in inputs):
            e.fail("duplicate input name")
        inputs.append(
            NixpkgsInput(
                name,
                repo,
                rev,
                branch,
                cuda,
                python,
                removed,
                prov,
                nar_hash,
                rev_source,
            )
        )
    if not inputs:
        top.fail("no [[nixpkgs]] inputs")
    if inputs[0].input != "nixpkgs":
        raise MatrixError(
            f"{file}: the first [[nixpkgs]] input must be named 'nixpkgs' (nix "
            f"develop takes bash and the registry fallback from it)"
        )

    c = Table(file, "cuda", top.table("cuda"))
    cuda_packages = c.strs("packages")
    for p in cuda_packages:
        if not _INPUT_RE.match(p):
            c.fail(f"{p!r} is not a Nix attribute name")
    if "cuda_nvcc" not in cuda_packages:
        c.fail("'packages' must contain cuda_nvcc (extensions are compiled with nvcc)")
    licenses = c.strs("unfree_licenses")
    if not licenses:
        c.fail("'unfree_licenses' is empty: CUDA packages would not evaluate")
    c.provenance(sources)
    c.done()

    caches: list[Cache] = []
    for i, raw in enumerate(top.tables("cache")):
        e = Table(file, f"cache #{i + 1}", raw)
        url = e.text("url")
        key = e.text("public_key")
        if not url.startswith("https://"):
            e.fail(f"cache url {url!r} must be https")
        if not re.fullmatch(r"[A-Za-z0-9._-]+:[A-Za-z0-9+/]{43}=", key):
            e.fail(f"public_key {key!r} is not 'name:base64-ed25519-key='")
        prov = e.provenance(sources)
        e.done()
        caches.append(Cache(url=url, public_key=key, provenance=prov))

    for key in ("schema", "sources", "flake", "nixpkgs", "cuda", "cache"):
        top.seen.add(key)
    top.done()
    return NixConfig(
        file, description, default, systems, tuple(inputs), cuda_packages, licenses, tuple(caches)
    )


# --------------------------------------------------------------------------------------------
# Planning: which nixpkgs, CUDA set, Python and systems each target gets


@dataclass(frozen=True)
class Shell:
    target: Target
    input: NixpkgsInput
    systems: tuple[str, ...]
    system_of: dict[str, str]  # conda platform -> Nix system

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def cuda_attr(self) -> str | None:
        cuda = self.target.cuda
        return None if cuda is None else "cudaPackages_{}_{}".format(*cuda.minor.padded(2))

    @property
    def python_attr(self) -> str:
        return "python{}{}".format(*self.target.python.minor.padded(2))

    @property
    def requirements(self) -> str:
        return f"envs/{self.target.name}.requirements.txt"


def plan_shells(matrix: Matrix, config: NixConfig) -> tuple[Shell, ...]:
    if not matrix.targets:
        raise LockgenError("no targets loaded: a flake needs lockgen/data/targets.toml")
    shells = []
    for t in matrix.targets.values():
        if t.is_stack:  # no shell: STACK_NO_NIX
            continue
        systems = tuple(
            dict.fromkeys(config.systems[p] for p in t.platforms if p in config.systems)
        )
        if not systems:
            raise LockgenError(
                f"target {t.name}: none of its platforms ({', '.join(t.platforms)}) is a Nix "
                f"system in {config.path} [flake.systems] ({', '.join(config.systems)})"
            )
        found = next((i for i in config.inputs if i.has(t.cuda, t.python)), None)
        if found is None:
            want = f"cudaPackages_{'_'.join(map(str, t.cuda.minor.padded(2)))}" if t.cuda else ""
            have = "; ".join(
                f"{i.input} ({i.url}): CUDA {', '.join(v.raw for v in i.cuda) or 'none'}, "
                f"Python {', '.join(v.raw for v in i.python)}"
                for i in config.inputs
            )
            removed = [i.input for i in config.inputs if t.cuda and t.cuda.minor in i.removed_cuda]
            why = f" ({', '.join(removed)} removed it)" if removed else ""
            what = (
                f"CUDA {t.cuda} ({want}) with Python {t.python}" if t.cuda else f"Python {t.python}"
            )
            raise LockgenError(
                f"target {t.name}: no pinned nixpkgs input has {what}{why}. Inputs: {have}. "
                f"Add a [[nixpkgs]] input that has it to {config.path}, or change the target"
            )
        shells.append(Shell(t, found, systems, dict(config.systems)))
    if config.default not in matrix.targets:
        raise LockgenError(
            f"{config.path}: flake.default {config.default!r} is not a target "
            f"(targets: {', '.join(matrix.targets)})"
        )
    return tuple(shells)


# --------------------------------------------------------------------------------------------
# Rendering


def nix_str(text: str) -> str:
    """A Nix double-quoted string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def nix_indented(text: str, indent: str) -> str:
    """A Nix ``'' ... ''`` string holding ``text`` verbatim (no interpolation)."""
    body = text.replace("''", "'''").replace("${", "''${")
    lines = [(indent + line) if line else "" for line in body.splitlines()]
    return "''\n" + "\n".join(lines) + "\n" + indent[:-2] + "''"


def _list(items, indent: str) -> str:
    if not items:
        return "[ ]"
    inner = "".join(f"{indent}  {nix_str(i)}\n" for i in items)
    return "[\n" + inner + indent + "]"


# The shellHook every shell runs; the per-target values arrive as environment variables set by
# the shell derivation (GPUFIT_TARGET, GPUFIT_CUDA_VERSION, ...). Plain bash; no Nix
# interpolation (nix_indented escapes it).
SHELL_HOOK = r"""
# --- gpufit dev shell (lockgen flake) --------------------------------------------------
gpufit_say() { printf 'gpufit[%s]: %s\n' "$GPUFIT_TARGET" "$*" >&2; }

if [ -z "${GPUFIT_PROJECT_DIR:-}" ]; then
  GPUFIT_PROJECT_DIR=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
fi
export GPUFIT_PROJECT_DIR
export CC="$GPUFIT_CC_DIR/cc" CXX="$GPUFIT_CC_DIR/c++"
if [ -n "${CUDA_HOME:-}" ]; then export CUDAHOSTCXX="$CXX"; fi
# nixpkgs' 1980 timestamp breaks building wheels (zip needs >= 1980-01-01 + 2s).
unset SOURCE_DATE_EPOCH

# Host NVIDIA driver: the first folder holding libcuda.so.1 among GPUFIT_DRIVER_DIRS
# (default: NixOS /run/opengl-driver/lib, then WSL /usr/lib/wsl/lib), else `ldconfig -p`
# (GPUFIT_LDCONFIG names another ldconfig; "none" skips it). Only libcuda*, libnvidia* (and
# WSL's libdxcore*, which libcuda needs there) are linked into a private folder: the host's
# libc / libstdc++ never reach LD_LIBRARY_PATH.
gpufit_driver_dir() {
  local d ldc tag
  local IFS=:
  for d in ${GPUFIT_DRIVER_DIRS-/run/opengl-driver/lib:/usr/lib/wsl/lib}; do
    if [ -n "$d" ] && [ -e "$d/libcuda.so.1" ]; then printf '%s\n' "$d"; return 0; fi
  done
  ldc=${GPUFIT_LDCONFIG:-}
  if [ -z "$ldc" ]; then
    for d in /sbin/ldconfig /usr/sbin/ldconfig /usr/bin/ldconfig; do
      if [ -x "$d" ]; then ldc=$d; break; fi
    done
  fi
  if [ -z "$ldc" ] || [ "$ldc" = none ]; then return 1; fi
  case $(uname -m) in
    x86_64) tag=x86-64 ;;
    aarch64) tag=AArch64 ;;
    *) tag= ;;
  esac
  d=$("$ldc" -p 2>/dev/null \
    | sed -n 's/^[[:space:]]*libcuda\.so\.1 (\(.*\)) => \(.*\)$/\1|\2/p' \
    | while IFS='|' read -r info path; do
        case "$info" in *",$tag"*) printf '%s\n' "${path%/*}"; break ;; esac
      done)
  if [ -n "$d" ] && [ -e "$d/libcuda.so.1" ]; then printf '%s\n' "$d"; return 0; fi
  return 1
}

gpufit_libs=${XDG_CACHE_HOME:-$HOME/.cache}/gpufit/nix-driver-libs/$(uname -m)-$(uname -n)
if [ -n "${GPUFIT_CUDA_VERSION:-}" ]; then
  if GPUFIT_DRIVER_DIR=$(gpufit_driver_dir); then
    export GPUFIT_DRIVER_DIR
    mkdir -p "$gpufit_libs"
    rm -f "$gpufit_libs"/libcuda* "$gpufit_libs"/libnvidia* "$gpufit_libs"/libdxcore*
    gpufit_n=0
    for gpufit_f in "$GPUFIT_DRIVER_DIR"/libcuda* "$GPUFIT_DRIVER_DIR"/libnvidia* \
                    "$GPUFIT_DRIVER_DIR"/libdxcore*; do
      if [ -e "$gpufit_f" ]; then
        ln -sfn "$gpufit_f" "$gpufit_libs/${gpufit_f##*/}" && gpufit_n=$((gpufit_n + 1))
      fi
    done
    export GPUFIT_DRIVER_LIBS=$gpufit_libs
    export LD_LIBRARY_PATH="$gpufit_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    gpufit_say "host driver: $gpufit_n libraries from $GPUFIT_DRIVER_DIR linked into $gpufit_libs"
    unset gpufit_f gpufit_n
  else
    gpufit_say "no NVIDIA driver found (no libcuda.so.1 in" \
      "${GPUFIT_DRIVER_DIRS-/run/opengl-driver/lib:/usr/lib/wsl/lib} or ldconfig -p):" \
      "CUDA is unavailable here; set GPUFIT_DRIVER_DIRS to the folder holding libcuda.so.1"
  fi
fi
# Wheels (torch, numpy) need a libstdc++ and zlib: Nix's own, never the host's.
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$GPUFIT_RUNTIME_LIBS"

# PyTorch of the target: .venv-<target> (in the project folder) from the hash-pinned lock in
# the flake's own source (never the folder the user stands in), installed only when asked
# and only after that source's `lockgen verify` accepts the lock.
gpufit_venv=$GPUFIT_PROJECT_DIR/.venv-$GPUFIT_TARGET
gpufit_lock=$GPUFIT_FLAKE_SOURCE/$GPUFIT_REQUIREMENTS
if [ ! -f "$gpufit_lock" ]; then
  gpufit_say "no $GPUFIT_REQUIREMENTS in the flake's source: torch $GPUFIT_TORCH_VERSION is" \
    "not installed in this shell. Create the lock with: lockgen lock $GPUFIT_TARGET" \
    "--flavor pip (and git add it: a flake sees tracked files only)"
else
  if [ ! -x "$gpufit_venv/bin/python" ]; then
    python -m venv "$gpufit_venv" && printf '*\n' > "$gpufit_venv/.gitignore"
  fi
  gpufit_want=$(sha256sum "$gpufit_lock" | cut -d' ' -f1)
  if [ "$(cat "$gpufit_venv/.gpufit-lock" 2>/dev/null)" != "$gpufit_want" ]; then
    if [ "${GPUFIT_INSTALL:-0}" = 1 ]; then
      if ! PYTHONPATH="$GPUFIT_FLAKE_SOURCE/lockgen/src:$GPUFIT_FLAKE_SOURCE/fsatomic/src" \
        LOCKGEN_ENVS= "$gpufit_venv/bin/python" -m lockgen verify "$gpufit_lock"; then
        gpufit_say "lockgen verify rejected $GPUFIT_REQUIREMENTS: nothing installed"
      elif gpufit_say "installing $GPUFIT_REQUIREMENTS into .venv-$GPUFIT_TARGET" \
          "(verified; pip --require-hashes)" \
        && "$gpufit_venv/bin/python" -m pip install --require-hashes -r "$gpufit_lock"; then
        printf '%s\n' "$gpufit_want" > "$gpufit_venv/.gpufit-lock"
      else
        gpufit_say "pip install failed; torch may be missing or stale"
      fi
    else
      gpufit_say ".venv-$GPUFIT_TARGET does not match $GPUFIT_REQUIREMENTS; install torch" \
        "$GPUFIT_TORCH_VERSION (downloads wheels) with:" \
        "GPUFIT_INSTALL=1 nix develop .#$GPUFIT_TARGET"
    fi
  fi
  export VIRTUAL_ENV=$gpufit_venv
  export PATH="$gpufit_venv/bin:$PATH"
  unset gpufit_want
fi
unset gpufit_venv gpufit_lock gpufit_libs
""".lstrip("\n")


def _target_block(shell: Shell, matrix: Matrix) -> str:
    t = shell.target
    fields: list[tuple[str, str]] = [
        ("description", nix_str(t.description or t.summary())),
        ("nixpkgs", shell.input.input),
        ("systems", "[ " + " ".join(nix_str(s) for s in shell.systems) + " ]"),
        ("python", nix_str(shell.python_attr)),
        ("cudaPackages", nix_str(shell.cuda_attr) if shell.cuda_attr else "null"),
    ]
    if t.cuda is not None:
        # TORCH_CUDA_ARCH_LIST per system: the wheels of one build differ between platforms.
        archs = {
            shell.system_of[p]: a.torch_cuda_arch_list
            for p, a in t.arch_lists.items()
            if p in shell.system_of
        }
        inner = " ".join(f"{s} = {nix_str(archs[s])};" for s in shell.systems)
        fields.append(("archs", "{ " + inner + " }"))
    env: list[tuple[str, str]] = [
        ("GPUFIT_TARGET", t.name),
        ("GPUFIT_TORCH_VERSION", t.torch.raw),
        ("GPUFIT_TORCHVISION_VERSION", t.torchvision.raw),
        ("GPUFIT_PYTHON_VERSION", t.python.raw),
        ("GPUFIT_PIP_INDEX_URL", t.pip_source.url),
        ("GPUFIT_REQUIREMENTS", shell.requirements),
    ]
    if t.cuda is not None:
        env.append(("GPUFIT_CUDA_VERSION", t.cuda.raw))
        if t.cudnn is not None:
            env.append(("GPUFIT_CUDNN_VERSION", t.cudnn.raw))
        if t.driver_floor is not None:
            env.append(("GPUFIT_DRIVER_MIN", t.driver_floor.minimum.raw))
            if t.driver_floor.full is not None:
                env.append(("GPUFIT_DRIVER_FULL", t.driver_floor.full.raw))
    pad = " " * 10
    lines = [f"{pad}{k} = {v};" for k, v in fields]
    lines.append(f"{pad}env = {{")
    lines += [f"{pad}  {k} = {nix_str(v)};" for k, v in env]
    lines.append(f"{pad}}};")
    return f"        {t.name} = {{\n" + "\n".join(lines) + "\n        };\n"


class _FlakeTemplate(Template):
    delimiter = "@"  # Nix itself uses ${...}; a flake has no @ of its own here


# flake.nix with named holes (@name); :func:`render_flake` fills every one (a missing one is
# a KeyError, not a stray hole in the output).
FLAKE_TEMPLATE = _FlakeTemplate(
    r"""# Generated by `lockgen flake` from @generated_from;
# do not edit: change those files and run `python -m lockgen flake` (a test fails when
# this file is stale). flake.lock is written only by a networked Nix
# (.github/workflows/flake.yml), never by hand.
#
#   nix develop .#<target>   a shell for one target: @shell_names
#   nix develop              the default shell (@default)
#   GPUFIT_INSTALL=1 nix develop .#<target>
#                            also install torch from envs/<target>.requirements.txt
# More: docs/nix.md (driver discovery, GPUFIT_DRIVER_DIRS, the torch venv, caches).
#
# Binary caches: nixConfig is honoured for trusted users only; otherwise add to nix.conf:
#   extra-substituters = @substituters
#   extra-trusted-public-keys = @public_keys
{
  description = @description;

  nixConfig = {
    extra-substituters = @substituter_list;
    extra-trusted-public-keys = @public_key_list;
  };

  # Each nixpkgs is pinned to one commit of its branch (lockgen/data/nix.toml says where
  # the commit is recorded); flake.lock adds the narHash.
  inputs = {
@inputs  };

  outputs = { self, @input_names }:
    let
      # One attribute set per target (lockgen/data/targets.toml); `env` becomes the
      # shell's environment.
      targets = {
@targets      };

      # CUDA pieces joined into CUDA_HOME: nvcc and the headers torch's extension API
      # includes.
      cudaPieces = @cuda_pieces;

      # Unfree packages are accepted only under NVIDIA's CUDA licences.
      cudaLicenses = @cuda_licenses;
      licenseOk = l: (l.free or false) || builtins.elem (l.shortName or "") cudaLicenses;
      allowUnfreePredicate =
        p:
        let
          l = p.meta.license or [ ];
        in
        builtins.all licenseOk (if builtins.isList l then l else [ l ]);

      shellHook = @shell_hook;

      mkShell =
        system: name: t:
        let
          pkgs = import t.nixpkgs {
            inherit system;
            config = {
              inherit allowUnfreePredicate;
              cudaSupport = t.cudaPackages != null;
            };
          };
          cuda = if t.cudaPackages == null then null else pkgs.${t.cudaPackages};
          stdenv = if cuda == null then pkgs.stdenv else cuda.backendStdenv;
          cudaHome = pkgs.symlinkJoin {
            name = "cuda-home-${t.env.GPUFIT_CUDA_VERSION}";
            paths = builtins.concatMap (n: cuda.${n}.all or [ cuda.${n} ]) cudaPieces;
          };
        in
        (pkgs.mkShell.override { inherit stdenv; }) (
          {
            name = "gpufit-${name}";
            packages = [
              pkgs.${t.python}
              pkgs.ninja
            ]
            ++ (if cuda == null then [ ] else [ cudaHome ]);
            # the flake's own source: the lock and the lockgen that verifies it come from here
            GPUFIT_FLAKE_SOURCE = "${self}";
            GPUFIT_CC_DIR = "${stdenv.cc}/bin";
            GPUFIT_RUNTIME_LIBS = "${pkgs.stdenv.cc.cc.lib}/lib:${pkgs.zlib}/lib";
            inherit shellHook;
          }
          // t.env
          // (
            if cuda == null then
              { }
            else
              {
                CUDA_HOME = "${cudaHome}";
                CUDA_PATH = "${cudaHome}";
                TORCH_CUDA_ARCH_LIST = t.archs.${system};
              }
          )
        );

      shellsFor =
        system:
        builtins.mapAttrs (name: t: mkShell system name t) (
          builtins.removeAttrs targets (
            builtins.filter (n: !(builtins.elem system targets.${n}.systems)) (builtins.attrNames targets)
          )
        );
    in
    {
      devShells = {
@dev_shells      };
    };
}
"""  # noqa: E501 (one line of the flake is longer than the code's limit)
)


def render_flake(matrix: Matrix, config: NixConfig) -> str:
    shells = plan_shells(matrix, config)
    used = [i for i in config.inputs if any(s.input is i for s in shells)]
    if config.inputs[0] not in used:
        used.insert(0, config.inputs[0])  # `nixpkgs` always: nix develop takes bash from it
    systems = [s for s in NIX_SYSTEMS if any(s in sh.systems for sh in shells)]
    defaults = {}
    for system in systems:
        on = [sh.name for sh in shells if system in sh.systems]
        defaults[system] = config.default if config.default in on else on[0]
    facts = (matrix.path, matrix.targets_path, config.path)
    return FLAKE_TEMPLATE.substitute(
        generated_from=", ".join(fact_label(p) for p in facts if p is not None),
        shell_names=", ".join(sh.name for sh in shells),
        default=config.default,
        substituters=" ".join(c.url for c in config.caches),
        public_keys=" ".join(c.public_key for c in config.caches),
        description=nix_str(config.description),
        substituter_list=_list([c.url for c in config.caches], "    "),
        public_key_list=_list([c.public_key for c in config.caches], "    "),
        inputs="".join(_input_lines(i) for i in used),
        input_names=", ".join(i.input for i in used),
        targets="".join(_target_block(sh, matrix) for sh in shells),
        cuda_pieces=_list(config.cuda_packages, "      "),
        cuda_licenses=_list(config.unfree_licenses, "      "),
        shell_hook=nix_indented(SHELL_HOOK, " " * 8),
        dev_shells="".join(_dev_shells_lines(system, defaults[system]) for system in systems),
    )


def _input_lines(i: NixpkgsInput) -> str:
    cudas = ", ".join(v.raw for v in i.cuda) or "none"
    return f"    # {i.branch}; CUDA package sets: {cudas}\n    {i.input}.url = {nix_str(i.url)};\n"


def _dev_shells_lines(system: str, default: str) -> str:
    return (
        f"        {system} =\n"
        "          let\n"
        f"            shells = shellsFor {nix_str(system)};\n"
        "          in\n"
        f"          shells // {{ default = shells.{default}; }};\n"
    )
