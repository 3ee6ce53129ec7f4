"""The requirement, marker, version and file-name grammar that pip installs by (``packaging``).

lockgen depends on ``packaging``. Where a bare venv runs lockgen from its source instead of an
installed lockgen (the Nix shell verifies its pip lock that way, with the venv pip will install
into), ``packaging`` is absent but pip's own copy of it is there: that copy is the very grammar
the lock will be installed by, so it is used. Imported only by the checks that need it, so
``lockgen check`` never pays for it.
"""

try:
    from packaging import markers, requirements, utils, version
except ImportError:  # pragma: no cover - exercised by tests/lockgen/test_trust.py in a subprocess
    from pip._vendor.packaging import markers, requirements, utils, version

__all__ = ["markers", "requirements", "utils", "version"]
