"""Every way a matrix or targets file can be wrong gets an error naming file, entry, problem.

Each case copies the real envs/ files, breaks one thing, and loads them.
"""

from pathlib import Path

import pytest
from checkout import FACTS

from lockgen.cli import main
from lockgen.errors import MatrixError
from lockgen.load import load_matrix

MATRIX = (FACTS / "matrix.toml").read_text()
TARGETS = (FACTS / "targets.toml").read_text()
GPUS = (FACTS / "gpus.toml").read_text()

REL_21 = 'torch = "2.1"\ntorchvision = "0.16"\n'


def write(tmp_path: Path, matrix: str = MATRIX, targets: str = TARGETS, gpus: str = GPUS) -> Path:
    (tmp_path / "matrix.toml").write_text(matrix)
    (tmp_path / "targets.toml").write_text(targets)
    (tmp_path / "gpus.toml").write_text(gpus)
    return tmp_path / "matrix.toml"


def replace_once(text: str, old: str, new: str) -> str:
    assert old in text, f"fixture text not found: {old!r}"
    return text.replace(old, new, 1)


def test_unbroken_copy_loads(tmp_path):
    m = load_matrix(write(tmp_path))
    assert "cu121" in m.targets and m.find_gpu("H100") is not None


MATRIX_CASES = {
    "unknown key": (
        lambda s: replace_once(s, REL_21, REL_21 + 'colour = "red"\n'),
        "release 2.1: unknown key 'colour'",
    ),
    "bad version": (
        lambda s: replace_once(s, 'cudnn = "8.9.2.26"\nstatus', 'cudnn = "8.9.x"\nstatus'),
        "release 2.1 build 12.1: bad version '8.9.x' in 'cudnn'",
    ),
    "torchvision mismatch": (
        lambda s: replace_once(s, REL_21, 'torch = "2.1"\ntorchvision = "0.15"\n'),
        "release 2.1: torchvision 0.15 does not match torch 2.1 (expected 0.16)",
    ),
    "version not a string": (
        lambda s: replace_once(s, REL_21, 'torch = 2.1\ntorchvision = "0.16"\n'),
        "must be a version string",
    ),
    "patch release row": (
        lambda s: replace_once(s, REL_21, 'torch = "2.1.2"\ntorchvision = "0.16"\n'),
        "'torch' must be a minor release",
    ),
    "missing key": (
        lambda s: replace_once(
            s,
            'cuda = "11.6"\ncudnn = "8.3.2.44"\nstatus = "stable"\n',
            'cuda = "11.6"\ncudnn = "8.3.2.44"\n',
        ),
        "release 1.13 build 11.6: missing key 'status'",
    ),
    "bad status": (
        lambda s: replace_once(
            s, 'cudnn = "8.3.2.44"\nstatus = "stable"', 'cudnn = "8.3.2.44"\nstatus = "beta"'
        ),
        "'status' must be one of stable, experimental",
    ),
    "unknown source": (
        lambda s: replace_once(
            s,
            'cudnn = "8.3.2.44"\nstatus = "stable"\nsource = "release-md"',
            'cudnn = "8.3.2.44"\nstatus = "stable"\nsource = "blog"',
        ),
        "unknown source 'blog'",
    ),
    "verified not a bool": (
        lambda s: replace_once(
            s, 'source = "release-md"\nverified = true', 'source = "release-md"\nverified = "yes"'
        ),
        "'verified' must be true or false",
    ),
    "duplicate release": (
        lambda s: (
            s
            + "\n[[release]]\n"
            + REL_21
            + 'released = "x"\npython = ["3.11"]\nplatforms = ["linux-64"]\n'
            + 'torchvision_python = ["3.11"]\npypi_default = { cuda = "12.1", cudnn = "1" }\n'
            'source = "pypi"\nverified = true\n[[release.build]]\ncuda = "12.1"\ncudnn = "1"\n'
            'status = "stable"\nsource = "pypi"\nverified = true\n'
        ),
        "release 2.1: duplicate release",
    ),
    "pypi default not a build": (
        lambda s: replace_once(
            s,
            'pypi_default = { cuda = "12.1", cudnn = "8.9.2.26" }',
            'pypi_default = { cuda = "12.4", cudnn = "8.9.2.26" }',
        ),
        "release 2.1: pypi_default CUDA 12.4 is not one of its builds (11.8, 12.1)",
    ),
    "pypi default cudnn disagrees": (
        lambda s: replace_once(
            s,
            'pypi_default = { cuda = "12.1", cudnn = "8.9.2.26" }',
            'pypi_default = { cuda = "12.1", cudnn = "8.9.7" }',
        ),
        "pypi_default cuDNN 8.9.7 differs from build 12.1's cuDNN 8.9.2.26",
    ),
    "build without driver entry": (
        lambda s: replace_once(s, '[[cuda]]\nversion = "11.6"', '[[cuda]]\nversion = "11.5"'),
        "release 1.13 build 11.6: no [[cuda]] entry gives the driver for CUDA 11.6",
    ),
    "toolkit driver below floor": (
        lambda s: replace_once(
            s, 'version = "12.1"\nlinux = "530.30.02"', 'version = "12.1"\nlinux = "520.1"'
        ),
        "cuda 12.1: toolkit driver 520.1 is below the CUDA 12 floor 525.60.13",
    ),
    "bad arch": (
        lambda s: replace_once(s, 'archs = ["8.0", "9.0"]', 'archs = ["8.0", "sm_xx"]'),
        "archs #10: bad compute capability 'sm_xx'",
    ),
    "ptx not last": (
        lambda s: replace_once(s, 'archs = ["8.0", "9.0"]', 'archs = ["8.0+PTX", "9.0"]'),
        "only the last arch may carry +PTX",
    ),
    "arch list for a missing release": (
        lambda s: replace_once(
            s,
            'torch_min = "2.12"\ntorch_max = "2.15"\nplatforms = '
            '["linux-aarch64"]\narchs = ["8.0", "9.0"]',
            'torch_min = "2.12"\ntorch_max = "2.99"\nplatforms = '
            '["linux-aarch64"]\narchs = ["8.0", "9.0"]',
        ),
        "archs #10: torch 2.99 is not a release of the matrix",
    ),
    "unknown platform": (
        lambda s: replace_once(
            s,
            'platforms = ["linux-aarch64"]\narchs = ["8.0", "9.0"]',
            'platforms = ["amiga"]\narchs = ["8.0", "9.0"]',
        ),
        "unknown platform 'amiga'",
    ),
    "wrong schema": (
        lambda s: replace_once(s, "schema = 1", "schema = 7"),
        "top level: 'schema' must be 1, got 7",
    ),
    "unknown top-level table": (
        lambda s: replace_once(s, "schema = 1", "schema = 1\nextra = 3"),
        "top level: unknown key 'extra'",
    ),
    "not toml": (lambda s: s + "\n[[release]\n", "not valid TOML"),
    "python wheels for an unknown platform": (
        lambda s: replace_once(
            s, "python_platforms = { linux-aarch64", "python_platforms = { amiga-68k"
        ),
        "release 1.13: python_platforms: unknown platform 'amiga-68k'",
    ),
    "torchvision python missing": (
        lambda s: replace_once(
            s,
            'torchvision_python = ["3.8", "3.9", "3.10", "3.11"]\n',
            "",
        ),
        "release 2.0: missing key 'torchvision_python'",
    ),
}


@pytest.mark.parametrize("case", list(MATRIX_CASES))
def test_bad_matrix(tmp_path, case):
    mutate, message = MATRIX_CASES[case]
    path = write(tmp_path, matrix=mutate(MATRIX))
    with pytest.raises(MatrixError) as err:
        load_matrix(path)
    assert str(err.value).startswith(str(path) + ":")
    assert message in str(err.value)


CU121 = (
    '[target.cu121]\ndescription = "CUDA 12.1 on the last release of the legacy pytorch channel"\n'
)

TARGET_CASES = {
    "resolves to no release": (
        lambda s: replace_once(s, CU121 + 'torch = "2.5.1"', CU121 + 'torch = "2.99.1"'),
        "target 'cu121': torch 2.99.1 resolves to no release of the matrix",
    ),
    "no such build": (
        lambda s: replace_once(s, 'cuda = "12.1"', 'cuda = "12.6"'),
        "target 'cu121': torch 2.5 has no CUDA 12.6 build (builds: 11.8, 12.1, 12.4)",
    ),
    "torchvision mismatch": (
        lambda s: replace_once(
            s,
            CU121 + 'torch = "2.5.1"\ntorchvision = "0.20.1"',
            CU121 + 'torch = "2.5.1"\ntorchvision = "0.19.1"',
        ),
        "target 'cu121': torchvision 0.19.1 does not match torch 2.5.1",
    ),
    "python unsupported": (
        lambda s: replace_once(
            s,
            'pythons = ["3.9", "3.10", "3.11", "3.12"]\ncuda = "12.1"',
            'pythons = ["3.7", "3.11"]\ncuda = "12.1"',
        ),
        "target 'cu121': torch 2.5 + torchvision 0.20 have no linux-64 wheels for Python 3.7",
    ),
    "torchvision lacks a python": (
        lambda s: replace_once(
            s,
            'pythons = ["3.9", "3.10", "3.11", "3.12"]\ncuda = "12.1"',
            'pythons = ["3.11", "3.13"]\ncuda = "12.1"',
        ),
        "have no linux-64 wheels for Python 3.13 (torch: 3.9, 3.10, 3.11, 3.12, 3.13; "
        "torchvision: 3.9, 3.10, 3.11, 3.12)",
    ),
    "python not among pythons": (
        lambda s: replace_once(
            s,
            'pythons = ["3.9", "3.10", "3.11", "3.12"]\ncuda = "12.1"',
            'pythons = ["3.10"]\ncuda = "12.1"',
        ),
        "target 'cu121': python 3.11 is not one of its 'pythons'",
    ),
    "no arch list on a platform": (
        lambda s: replace_once(
            s,
            'cuda = "12.4"\nconda_channel = "pytorch"\nplatforms = ["linux-64"]',
            'cuda = "12.4"\nconda_channel = "pytorch"\nplatforms = ["linux-64", "linux-aarch64"]',
        ),
        "target 'cu124': no arch list in the matrix for torch 2.5 + CUDA 12.4 on linux-aarch64",
    ),
    "cudnn mismatch": (
        lambda s: replace_once(s, 'cudnn = "9.24.0.43"', 'cudnn = "9.1.0.70"'),
        "target 'cu130': cuDNN 9.1.0.70 does not match the matrix",
    ),
    "legacy channel after 2.5": (
        lambda s: replace_once(
            s,
            'cuda = "12.6"\nplatforms',
            'cuda = "12.6"\nconda_channel = "pytorch"\nplatforms',
        ),
        "target 'cu126': channel 'pytorch' has no torch after 2.5",
    ),
    "unknown channel": (
        lambda s: replace_once(
            s, 'cuda = "12.1"\nconda_channel = "pytorch"', 'cuda = "12.1"\nconda_channel = "pip"'
        ),
        "target 'cu121': conda_channel 'pip' is not a conda channel",
    ),
    "unknown key": (
        lambda s: replace_once(s, 'cuda = "12.1"', 'cuda = "12.1"\ncdua = "12.1"'),
        "target 'cu121': unknown key 'cdua'",
    ),
    "bad cuda": (
        lambda s: replace_once(s, 'cuda = "12.1"', 'cuda = "twelve"'),
        "target 'cu121': bad CUDA version 'twelve'",
    ),
    "release without torchvision": (
        lambda s: replace_once(
            s,
            'torch = "2.14.1"\ntorchvision = "0.29.1"\npython = "3.11"\npythons',
            'torch = "2.15"\ntorchvision = "0.29.1"\npython = "3.11"\npythons',
        ),
        "target 'cpu': torch 2.15 has no verified torchvision",
    ),
    "no targets": (lambda s: "schema = 1\n", "top level: missing key 'target'"),
}


@pytest.mark.parametrize("case", list(TARGET_CASES))
def test_bad_targets(tmp_path, case):
    mutate, message = TARGET_CASES[case]
    path = write(tmp_path, targets=mutate(TARGETS))
    with pytest.raises(MatrixError) as err:
        load_matrix(path)
    assert str(err.value).startswith(str(tmp_path / "targets.toml") + ":")
    assert message in str(err.value)


GPU_CASES = {
    "bad gpu capability": (
        lambda s: replace_once(s, 'capability = "10.0"', 'capability = "ten"'),
        "capability ten: bad compute capability 'ten'",
    ),
    "gpu listed twice": (
        lambda s: replace_once(s, '"NVIDIA GB200", "NVIDIA B200"', '"NVIDIA GB200", "NVIDIA H100"'),
        "GPU 'NVIDIA H100' is listed twice",
    ),
    "architecture without a toolkit driver": (
        lambda s: replace_once(s, 'first_cuda = "12.8"', 'first_cuda = "12.7"'),
        "first_cuda 12.7: no [[cuda]] entry of the matrix gives its driver",
    ),
    "unknown source": (
        lambda s: replace_once(s, 'source = "cuda-legacy-gpus"', 'source = "forum"'),
        "unknown source 'forum'",
    ),
}


@pytest.mark.parametrize("case", list(GPU_CASES))
def test_bad_gpu_list(tmp_path, case):
    mutate, message = GPU_CASES[case]
    path = write(tmp_path, gpus=mutate(GPUS))
    with pytest.raises(MatrixError) as err:
        load_matrix(path)
    assert str(err.value).startswith(str(tmp_path / "gpus.toml") + ":")
    assert message in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(MatrixError, match="file not found"):
        load_matrix(tmp_path / "nope.toml")


def test_bad_matrix_through_the_cli_is_an_error_not_a_traceback(tmp_path, capsys):
    path = write(tmp_path, matrix=MATRIX_CASES["torchvision mismatch"][0](MATRIX))
    rc = main(["--matrix", str(path), "check", "--torch", "2.1"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "lockgen: error:" in captured.err and "does not match torch 2.1" in captured.err
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize(
    "version, why",
    [
        ("2.14.1rc1", "pre-, post- or development release"),
        ("2.14.1.post1", "pre-, post- or development release"),
        ("2.14.1.dev20260101", "pre-, post- or development release"),
        ("2.14.7", "is not a release of torch 2.14 the matrix knows"),
        ("2.5.9", "is not a release of torch 2.5 the matrix knows"),
    ],
)
def test_a_target_pins_only_a_final_release_the_matrix_knows(tmp_path, version, why):
    """Issue 22, S4's targets part: `torch = "2.14.1rc1"` rendered `torch==2.14.1rc1+cu126`."""
    minor = ".".join(version.split(".")[:2])
    old = next(line for line in TARGETS.splitlines() if line.startswith(f'torch = "{minor}.'))
    targets = replace_once(TARGETS, old, f'torch = "{version}"')
    with pytest.raises(MatrixError, match=why):
        load_matrix(write(tmp_path, targets=targets))
