"""`doctor` on recorded machines: probes read fixtures, the verdict and fix follow."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from lockgen_fakes import FAIL, TIMEOUT, fake_machine, fixture_text

from lockgen.doctor import BROKEN, WARNINGS, WORKS, diagnose, format_diagnosis
from lockgen.probe import (
    PROC_DRIVER,
    CommandResult,
    Prober,
    cudnn_from_int,
    parse_driver_file,
    parse_nvidia_smi_banner,
    run_command,
)
from lockgen.versions import Version

V = Version.parse


def codes(d, severity=None):
    return {f.code for f in d.findings if severity is None or f.severity == severity}


def doctor(matrix, prober):
    return diagnose(matrix, prober.probe())


# -- parsers -------------------------------------------------------------------------------


def test_banner_parsers(machine):
    old = parse_nvidia_smi_banner(fixture_text("nvidia-smi-535-old-banner.txt"))
    assert old == (V("535.104.05"), V("12.2"), False)
    new = parse_nvidia_smi_banner(fixture_text("nvidia-smi-610-kmd-banner.txt"))
    assert new == (V("610.43.02"), V("13.3"), True)
    assert parse_driver_file(fixture_text("proc-driver-535.txt")) == V("535.104.05")
    assert parse_driver_file(fixture_text("proc-driver-580-open.txt")) == V("580.95.05")
    assert parse_driver_file("580.95.05\n") == V("580.95.05")
    assert parse_driver_file("garbage") is None
    assert cudnn_from_int(92400) == "9.24.0" and cudnn_from_int(8902) == "8.9.2"


# -- recorded machines ---------------------------------------------------------------------


def test_no_driver_cpu_torch(matrix, machine):
    prober, runner = machine(torch="torch-2.14.1-cpu.json")
    d = doctor(matrix, prober)
    assert d.verdict == WORKS
    assert "no-driver" in codes(d)
    assert d.recommended.name == "cpu"
    text = format_diagnosis(d)
    assert text.splitlines()[0] == "verdict: works"
    assert "no NVIDIA GPU driver found" in text
    # nvidia-smi was looked for (and not found) without crashing
    assert any(argv[0] == "nvidia-smi" for argv, _ in runner.calls)


def test_no_driver_cuda_torch_recommends_cpu(matrix, machine):
    prober, _ = machine(torch="torch-2.14.1-cu130-nogpu.json", nvcc="nvcc-13.0.txt")
    d = doctor(matrix, prober)
    assert d.verdict == WARNINGS
    assert "torch-cuda-no-driver" in codes(d, "warning")
    assert d.fix.target == "cpu"
    assert "download.pytorch.org/whl/cpu" in d.fix.command


def test_old_banner_nvidia_smi(matrix, machine):
    prober, _ = machine(
        smi="nvidia-smi-535-old-banner.txt",
        query="query-rtx3090.txt",
        torch="torch-2.1.2-cu121-rtx3090.json",
        python="3.11.4",
    )
    d = doctor(matrix, prober)
    r = d.report
    assert r.driver.version == V("535.104.05") and r.driver.source == "nvidia-smi"
    assert r.driver.cuda_umd == V("12.2") and not r.driver.kmd_banner
    assert [g.capability.sm for g in r.gpus] == ["sm_86"]
    assert d.verdict == WORKS, format_diagnosis(d)
    assert d.fix.target is None and d.fix.message == "nothing to do"


def test_r610_kmd_banner(matrix, machine):
    prober, _ = machine(
        smi="nvidia-smi-610-kmd-banner.txt",
        query="query-rtx5090.txt",
        torch="torch-2.14.1-cu130-rtx5090.json",
        nvcc="nvcc-13.0.txt",
    )
    d = doctor(matrix, prober)
    assert d.report.driver.version == V("610.43.02")
    assert d.report.driver.cuda_umd == V("13.3") and d.report.driver.kmd_banner
    assert "nvidia-smi-kmd" in codes(d, "note")
    assert d.verdict == WORKS, format_diagnosis(d)


def test_driver_too_old_for_installed_torch(matrix, machine):
    prober, _ = machine(
        proc_driver="proc-driver-535.txt",
        smi="nvidia-smi-535-old-banner.txt",
        query="query-rtx3090.txt",
        torch="torch-2.14.1-cu130-nogpu.json",
    )
    d = doctor(matrix, prober)
    assert d.report.driver.source == "/" + PROC_DRIVER  # /proc wins over nvidia-smi
    assert d.verdict == BROKEN
    assert "driver-too-old" in codes(d, "error")
    # the fix keeps the torch release: its CUDA 12.6 build runs on driver 535 (minor version
    # compatibility) and has sm_86; the alternative is the driver the CUDA 13.0 build needs
    assert d.fix.target == "cu126"
    assert "torch==2.14.1" in d.fix.command and "whl/cu126" in d.fix.command
    assert d.fix.driver_min == V("580.65.06")
    assert "580.65.06" in d.fix.message and "cu126" in d.fix.message
    # the driver is the problem, not torch's visibility
    assert "cuda-unavailable" not in codes(d)


def test_cpu_torch_on_gpu_machine(matrix, machine):
    prober, _ = machine(
        sys_driver="sys-driver-550.txt",
        smi="nvidia-smi-535-old-banner.txt",
        query="query-unsupported.txt",
        gpu_list="list-a100.txt",
        torch="torch-2.14.1-cpu.json",
    )
    d = doctor(matrix, prober)
    assert d.report.driver.version == V("550.54.14")  # /sys first
    assert d.report.gpus[0].name.startswith("NVIDIA A100")
    assert d.verdict == WARNINGS
    assert "torch-cpu-on-gpu" in codes(d, "warning")
    # nvidia-smi could not say the capability: NVIDIA's GPU list knows the A100 (8.0)
    assert "compute capability 8.0 (from NVIDIA's GPU list)" in format_diagnosis(d)
    # the same torch release, CUDA 12.6 build: it runs on driver 550 through minor version
    # compatibility (a torch downgrade to the 12.4 build that runs fully is not the fix)
    assert d.fix.target == "cu126"
    assert "whl/cu126" in d.fix.command and "torch==2.14.1" in d.fix.command


def test_gpu_arch_not_in_torch_arch_list(matrix, machine):
    prober, _ = machine(
        sys_driver="sys-driver-580.txt",
        smi="nvidia-smi-580-h100.txt",
        query="query-v100.txt",
        torch="torch-2.14.1-cu130-v100.json",
    )
    d = doctor(matrix, prober)
    assert d.verdict == BROKEN
    assert "gpu-arch" in codes(d, "error")
    # the CUDA 12.6 build of the same torch keeps sm_70 and runs fully on driver 580
    assert d.fix.target == "cu126" and d.fix.driver_min is None
    assert d.fix.command == (
        "pip install torch==2.14.1 torchvision==0.29.1 "
        "--index-url https://download.pytorch.org/whl/cu126"
    )
    assert "arch list includes your GPU" in d.fix.message


def test_healthy_machine(matrix, machine):
    prober, _ = machine(
        sys_driver="sys-driver-580.txt",
        smi="nvidia-smi-580-h100.txt",
        query="query-2xh100.txt",
        torch="torch-2.14.1-cu130-h100.json",
        nvcc="nvcc-13.0.txt",
    )
    d = doctor(matrix, prober)
    assert d.verdict == WORKS, format_diagnosis(d)
    assert codes(d, "warning") == codes(d, "error") == set()
    assert len(d.report.gpus) == 2
    assert d.fix.message == "nothing to do"


def test_healthy_gpu_but_torch_cannot_see_it(matrix, machine):
    prober, _ = machine(
        sys_driver="sys-driver-580.txt",
        smi="nvidia-smi-580-h100.txt",
        query="query-2xh100.txt",
        torch="torch-2.14.1-cu130-nogpu.json",
        nvcc="nvcc-12.1.txt",
    )
    d = doctor(matrix, prober)
    assert d.verdict == WARNINGS
    assert {"cuda-unavailable", "nvcc-mismatch"} <= codes(d, "warning")


def test_torch_not_importable(matrix, machine):
    prober, _ = machine(torch="torch-missing.json")
    d = doctor(matrix, prober)
    assert d.verdict == BROKEN and "torch-missing" in codes(d, "error")
    assert "No module named 'torch'" in format_diagnosis(d)
    assert d.fix.target == "cpu"


def test_hanging_and_failing_nvidia_smi_do_not_crash(matrix, machine):
    prober, runner = machine(smi=TIMEOUT, torch="torch-2.14.1-cpu.json")
    d = doctor(matrix, prober)
    assert any("timed out" in f.message for f in d.findings if f.code == "probe")
    assert all(t is not None and t > 0 for _, t in runner.calls)


def test_failing_nvidia_smi_is_reported(matrix, tmp_path):
    prober, _ = fake_machine(
        tmp_path,
        proc_driver="proc-driver-535.txt",
        smi=(FAIL, 9, "nvidia-smi-failed.txt"),
        torch="torch-2.14.1-cpu.json",
    )
    d = doctor(matrix, prober)
    assert d.report.driver.version == V("535.104.05")
    assert "no-gpus" in codes(d, "warning")
    assert any("couldn't communicate" in f.message for f in d.findings)


def test_runner_exception_is_contained(matrix, tmp_path):
    def broken_runner(argv, timeout):
        raise RuntimeError("boom")

    prober = Prober(
        root=tmp_path,
        run=broken_runner,
        python_exe="x",
        python_version="3.11.0",
        platform="linux-64",
    )
    d = doctor(matrix, prober)
    assert d.verdict == BROKEN  # no torch could be probed
    assert any("boom" in f.message for f in d.findings)


def test_json_keys_are_stable(matrix, machine):
    prober, _ = machine(
        smi="nvidia-smi-610-kmd-banner.txt",
        query="query-rtx5090.txt",
        torch="torch-2.14.1-cu130-rtx5090.json",
        nvcc="nvcc-13.0.txt",
    )
    data = json.loads(json.dumps(doctor(matrix, prober).to_json()))
    assert set(data) == {"schema", "verdict", "machine", "findings", "fix"}
    assert set(data["machine"]) == {
        "platform",
        "python",
        "driver",
        "gpus",
        "torch",
        "torch_error",
        "nvcc",
    }
    assert data["machine"]["driver"] == {
        "version": "610.43.02",
        "source": "nvidia-smi",
        "cuda_umd": "13.3",
    }
    assert data["machine"]["gpus"] == [
        {"index": 0, "name": "NVIDIA GeForce RTX 5090", "capability": "12.0"}
    ]
    assert set(data["fix"]) == {"target", "driver_min", "command", "message"}
    assert data["verdict"] == "works"


# -- the real runner -----------------------------------------------------------------------


def test_run_command_missing_binary_and_timeout():
    missing = run_command(["lockgen-no-such-binary-xyz"], 1.0)
    assert missing.not_found and missing.returncode is None
    slow = run_command([sys.executable, "-c", "import time; time.sleep(5)"], 0.3)
    assert slow.timed_out
    ok = run_command([sys.executable, "-c", "print('hi')"], 10)
    assert ok == CommandResult(0, "hi\n", "")


# -- fixes that fix ----------------------------------------------------------------------------


def test_volta_on_driver_535_gets_the_cuda_126_build_of_the_same_torch(matrix, machine):
    # the CUDA 13.0 wheel has no sm_70, and R535 cannot run CUDA 13: a driver upgrade cannot
    # add sm_70 and a torch downgrade is not needed; the 12.6 build runs on R535 through
    # minor version compatibility
    prober, _ = machine(
        proc_driver="proc-driver-535.txt",
        smi="nvidia-smi-535-v100.txt",
        query="query-v100.txt",
        torch="torch-2.14.1-cu130-v100.json",
    )
    d = doctor(matrix, prober)
    assert d.verdict == BROKEN and {"gpu-arch", "driver-too-old"} <= codes(d, "error")
    assert d.fix.target == "cu126" and d.fix.driver_min is None
    assert d.fix.command == (
        "pip install torch==2.14.1 torchvision==0.29.1 "
        "--index-url https://download.pytorch.org/whl/cu126"
    )
    assert "minor version compatibility" in d.fix.message
    assert "a newer driver would not help" in d.fix.message and "sm_70" in d.fix.message
    # the fix itself passes check on this machine
    from lockgen.check import Request, check

    req = Request.from_strings(
        matrix,
        torch="2.14.1",
        cuda="12.6",
        gpu="Tesla V100-SXM2-16GB",
        driver="535.104.05",
        python="3.11",
    )
    assert check(matrix, req).ok


def test_uv_environments_get_a_uv_command(matrix, machine):
    prober, _ = machine(
        sys_driver="sys-driver-580.txt",
        smi="nvidia-smi-580-h100.txt",
        query="query-v100.txt",
        torch="torch-2.14.1-cu130-uv-v100.json",
    )
    d = doctor(matrix, prober)
    assert d.fix.target == "cu126" and d.fix.command.startswith("uv pip install torch==2.14.1")
    assert "uv virtual environment" in format_diagnosis(d)


def test_blackwell_on_a_pre_blackwell_driver_needs_the_driver(matrix, machine):
    # no build runs an RTX 5090 on driver 560: the first Blackwell toolkit's driver is 570.26,
    # and the installed CUDA 13.0 build needs 580.65.06
    prober, _ = machine(
        sys_driver="sys-driver-560.txt",
        smi="nvidia-smi-560-rtx5090.txt",
        query="query-rtx5090.txt",
        torch="torch-2.14.1-cu130-rtx5090.json",
    )
    d = doctor(matrix, prober)
    assert {"gpu-driver", "driver-too-old"} <= codes(d, "error")
    assert d.fix.driver_min == V("580.65.06") and d.fix.command is None
    assert d.fix.message.startswith("upgrade the NVIDIA driver to >= 580.65.06")


# -- what the torch process loaded ---------------------------------------------------------


def test_loaded_libraries_are_named_with_their_origin(matrix, machine):
    # recorded from a pip install of torch 2.14.1 (CUDA 13.0) in a venv, paths renamed
    prober, _ = machine(torch="torch-2.14.1-cu130-pip-venv.json", nvcc="nvcc-13.0.txt")
    d = doctor(matrix, prober)
    lib = next(f for f in d.findings if f.code == "library")
    for name in ("libcudart 13.0", "libcublas 13.1.1", "libcudnn 9.24.0", "libnccl 2.30.7"):
        assert name in lib.message
    assert "pip wheels" in lib.message
    data = d.to_json()["machine"]["torch"]
    assert {x["name"]: x["origin"] for x in data["libraries"]} == {
        "cudart": "pip",
        "cublas": "pip",
        "cublasLt": "pip",
        "cudnn": "pip",
        "nccl": "pip",
    }
    cudnn = next(x for x in data["libraries"] if x["name"] == "cudnn")
    assert cudnn["distribution"] == "nvidia-cudnn-cu13 9.24.0.43" and cudnn["version"] == "9.24.0"
    assert data["environment"]["kind"] == "venv" and data["installer"] == "pip"
    assert "library-path" not in codes(d)
    # the toolkit extension builds would use is reported against torch's CUDA
    assert any(f.code == "toolkit" and "CUDA_HOME=/usr/local" in f.message for f in d.findings)
    assert "nvcc-mismatch" not in codes(d)


def test_a_system_cudnn_winning_over_the_wheels_is_flagged(matrix, machine):
    prober, _ = machine(torch="torch-2.14.1-cu130-system-cudnn.json")
    d = doctor(matrix, prober)
    warn = {f.code: f.message for f in d.findings if f.severity == "warning"}
    assert "/usr/lib/x86_64-linux-gnu/libcudnn.so.8" in warn["library-path"]
    assert "LD_LIBRARY_PATH" in warn["library-path"]
    assert "8.9.7" in warn["cudnn-mismatch"]


def test_conda_torch_libraries_come_from_the_prefix(matrix, machine):
    prober, _ = machine(torch="torch-2.14.1-cu130-conda.json")
    d = doctor(matrix, prober)
    assert "the conda prefix" in next(f.message for f in d.findings if f.code == "library")
    assert not {"library-path", "cudnn-mismatch"} & codes(d)
    assert "conda environment" in format_diagnosis(d)


def test_no_toolkit_is_a_note_for_a_cuda_torch(matrix, machine):
    prober, _ = machine(torch="torch-2.14.1-cu130-nogpu.json")
    assert "no-toolkit" in codes(doctor(matrix, prober), "note")


def test_doctor_on_this_machine_names_what_torch_loaded(matrix):
    # the real probe: a child of this interpreter imports torch and reads /proc/self/maps
    if importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch installed beside lockgen (its own tests also run without)")
    report = Prober(python_exe=sys.executable).probe()
    t = report.torch
    assert t is not None, report.torch_error
    if not t.is_cuda_build or not Path("/proc/self/maps").exists():
        pytest.skip("needs a CUDA build of torch on Linux")
    names = {lib.name for lib in t.libraries}
    assert {"cudart", "cublas", "cudnn"} <= names
    for lib in t.libraries:
        assert Path(lib.path).exists() and lib.version, lib
    d = diagnose(matrix, report)
    text = format_diagnosis(d)
    assert "libcudnn" in text and "libcublas" in text and "libcudart" in text
    assert t.environment is not None and "Python environment:" in text
    if report.nvcc is not None or t.cuda_home:
        assert any(f.code in ("nvcc", "toolkit") for f in d.findings)
