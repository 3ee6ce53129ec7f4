"""lockgen's one dynamic piece of metadata: its dependency on fsatomic, the repository's atomic
file writer, which is a sibling folder of this one and not published on any index. It is
required by its path (a ``file:`` URL), so that ``pip install ./lockgen``, ``pipx install
./lockgen`` and ``uvx --from ./lockgen`` all work from a checkout on their own, and no index is
ever asked for a package of that name.
"""

from pathlib import Path

from setuptools import setup

FSATOMIC = Path(__file__).resolve().parent.parent / "fsatomic"
if not (FSATOMIC / "pyproject.toml").is_file():
    raise SystemExit(f"lockgen: build it from its checkout: {FSATOMIC} (fsatomic) is missing")

# packaging: verify reads requirements, markers, versions and file names as pip and uv do
setup(
    install_requires=[
        f"fsatomic @ {FSATOMIC.as_uri()}",
        "packaging>=22",
        "tomli>=2; python_version < '3.11'",
    ]
)
