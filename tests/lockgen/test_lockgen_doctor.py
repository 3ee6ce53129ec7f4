"""`doctor` on recorded machines: probes read fixtures, the verdict and fix follow."""

import json
import sys

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
    assert d.fix.driver_min == V("580.65.06")
    # the alternative: the newest target driver 535 runs fully on an sm_86 GPU
    assert d.fix.target == "cu121"
    assert "580.65.06" in d.fix.message and "cu121" in d.fix.message
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
    # driver 550.54.14 is CUDA 12.4's toolkit driver exactly: cu124 is the newest full fit
    assert d.fix.target == "cu124"
    assert "whl/cu124" in d.fix.command


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
    assert d.fix.target == "cu128"  # keeps sm_70 and runs fully on driver 580
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
