"""`check`: rejects what no release shipped or this hardware cannot run, accepts real ones."""

import itertools

import pytest

from lockgen.check import Request, check, format_check
from lockgen.errors import LockgenError
from lockgen.versions import Version

V = Version.parse


def run(matrix, **kw):
    return check(matrix, Request.from_strings(matrix, **kw))


def fields(result, severity="error"):
    return {c.code for c in result.conflicts if c.severity == severity}


def test_tutorial_combination_is_rejected_with_the_right_reasons(matrix):
    r = run(matrix, torch="1.10.1", cuda="11.1", cudnn="8.9.2", python="3.8")
    assert not r.ok and r.verdict == "incompatible"
    assert fields(r) == {"torch", "cuda", "cudnn"}
    msgs = {c.code: c.message for c in r.errors}
    assert "older than the oldest release the matrix covers (1.13)" in msgs["torch"]
    assert "CUDA 11.1" in msgs["cuda"]
    # cuDNN 8.9.2 shipped only with the CUDA 12.1 builds of torch 2.1-2.3
    assert "CUDA 12.1 builds of torch 2.1-2.3" in msgs["cudnn"]
    assert "never with CUDA 11.1" in msgs["cudnn"]
    # suggestions are real combinations that themselves pass the check
    assert r.suggestions
    for s in r.suggestions:
        again = run(
            matrix, torch=s.torch.raw, cuda=s.cuda.raw, cudnn=s.cudnn.raw, python=s.python.raw
        )
        assert again.ok, format_check(again)
    # ranked by how little they change: torch release first (1.13 is the nearest to 1.10),
    # then Python, then CUDA (11.6: the same major as 11.1), cuDNN last (it ships inside
    # the build)
    best = r.suggestions[0]
    assert (best.torch, best.cuda, best.cudnn) == (
        Version.parse("1.13"),
        Version.parse("11.6"),
        Version.parse("8.3.2.44"),
    )
    assert best.python == Version.parse("3.8")
    # the nearest build that keeps the cuDNN asked for is still offered
    assert any(
        (s.torch, s.cuda, s.cudnn) == (V("2.1"), V("12.1"), V("8.9.2.26")) for s in r.suggestions
    )


def test_real_combination_is_accepted(matrix):
    r = run(matrix, torch="2.1.2", cuda="cu121", python="3.11", driver="535")
    assert r.ok and not r.warnings, format_check(r)
    assert r.build.cudnn == Version.parse("8.9.2.26")
    assert not r.suggestions


@pytest.mark.parametrize(
    "kw",
    [
        dict(
            torch="2.1.2",
            cuda="12.1",
            cudnn="8.9.2",
            python="3.11",
            driver="535.104.05",
            gpu="RTX 3090",
        ),
        dict(
            torch="2.14.1",
            cuda="13.0",
            cudnn="9.24.0",
            python="3.12",
            driver="580.95.05",
            gpu="H100",
        ),
        dict(torch="2.8.0", cuda="12.8", python="3.13", gpu="sm_70", driver="570.26"),
        dict(torch="1.13.1", cuda="11.7", python="3.10", driver="470.82", gpu="T4"),
        dict(torch="2.5.1", cuda="cpu", python="3.12"),
        dict(torch="2.11", cuda="13.0", cudnn="9.17.1.4"),  # the RELEASE.md cuDNN, noted
    ],
)
def test_more_real_combinations_pass(matrix, kw):
    r = run(matrix, **kw)
    assert r.ok, format_check(r)


def test_volta_is_rejected_for_cuda_13(matrix):
    r = run(matrix, torch="2.14.1", cuda="13.0", gpu="V100")
    assert fields(r) == {"gpu"}
    assert "sm_70" in r.errors[0].message
    # the nearest valid combinations keep a Volta-capable build
    assert r.suggestions
    for s in r.suggestions:
        assert s.cuda is not None and s.cuda < Version.parse("13.0")
        assert run(matrix, torch=s.torch.raw, cuda=s.cuda.raw, gpu="V100").ok
    assert r.suggestions[0].torch == Version.parse("2.14")  # keeps the torch release


def test_newer_gpu_of_same_major_runs_older_minor_code(matrix):
    # 8.9 (RTX 4090) is not in cu121's arch list but runs its sm_86 code
    r = run(matrix, torch="2.1", cuda="12.1", gpu="RTX 4090")
    assert r.ok and not r.warnings


def test_blackwell_is_rejected_before_cu128(matrix):
    r = run(matrix, torch="2.6", cuda="12.6", gpu="RTX 5090")
    assert fields(r) == {"gpu"}
    assert all(s.cuda >= Version.parse("12.8") for s in r.suggestions)


def test_driver_below_the_cuda_12_floor_is_rejected_for_cu128(matrix):
    r = run(matrix, torch="2.8", cuda="cu128", driver="520.61.05")
    assert fields(r) == {"driver"}
    msg = r.errors[0].message
    assert "525.60.13" in msg and "570.26" in msg
    assert r.suggestions and all(s.cuda.major == 11 for s in r.suggestions)


def test_driver_between_floor_and_toolkit_driver_warns(matrix):
    r = run(matrix, torch="2.8", cuda="12.8", driver="535.104.05")
    assert r.ok and fields(r, "warning") == {"driver"}
    assert "minor version compatibility" in r.warnings[0].message
    assert r.verdict == "compatible with warnings"


def test_driver_ignored_for_cpu_build(matrix):
    assert run(matrix, torch="2.8", cuda="cpu", driver="390.1").ok


def test_python_outside_the_wheels(matrix):
    r = run(matrix, torch="2.9", cuda="12.8", python="3.9")
    assert fields(r) == {"python"}
    got = {(s.torch.raw, s.python.raw) for s in r.suggestions}
    assert ("2.9", "3.10") in got  # keeps torch and CUDA, nearest Python
    assert ("2.8", "3.9") in got  # keeps CUDA and Python, nearest torch
    assert fields(run(matrix, torch="2.2", python="3.12"), "warning") == {"python"}


def test_wrong_cudnn_for_a_real_build(matrix):
    r = run(matrix, torch="2.1", cuda="12.1", cudnn="8.7.0")
    assert fields(r) == {"cudnn"}
    assert "ships cuDNN 8.9.2.26" in r.errors[0].message


def test_missing_build(matrix):
    r = run(matrix, torch="2.8", cuda="11.8")
    assert fields(r) == {"cuda"}
    assert "torch 1.13" not in r.errors[0].message
    assert "2.0-2.7" in r.errors[0].message


def test_torchvision_pairing(matrix):
    assert fields(run(matrix, torch="2.1", torchvision="0.15")) == {"torchvision"}
    assert run(matrix, torch="2.1.2", torchvision="0.16.2").ok


def test_local_version_label_gives_the_build(matrix):
    r = run(matrix, torch="2.14.1+cu130", gpu="V100")
    assert r.request.cuda == Version.parse("13.0") and not r.ok
    assert run(matrix, torch="2.14.1+cpu", gpu="V100").request.cpu


@pytest.mark.parametrize(
    "kw", [dict(torch="2.1.x"), dict(cuda="twelve"), dict(gpu="Voodoo 5"), dict(driver="R535")]
)
def test_malformed_input_raises_clear_errors(matrix, kw):
    with pytest.raises(LockgenError):
        Request.from_strings(matrix, **kw)


def test_no_valid_combination_says_so(matrix):
    # a Kepler sm_35 device with a driver that runs nothing in the matrix
    r = run(matrix, torch="2.1", cuda="11.8", driver="400.1", gpu="sm_35")
    assert not r.ok and not r.suggestions
    assert "no valid combination" in format_check(r)


def test_json_shape(matrix):
    data = run(matrix, torch="2.8", cuda="12.8", driver="520.61.05").to_json()
    assert data["ok"] is False and data["verdict"] == "incompatible"
    assert data["conflicts"][0]["code"] == "driver"
    assert set(data["suggestions"][0]) == {
        "torch",
        "torchvision",
        "cuda",
        "cudnn",
        "python",
        "target",
        "keeps",
    }


def test_driver_alone_says_what_it_runs(matrix):
    r = run(matrix, driver="535.104.05")
    assert r.ok
    text = " ".join(c.message for c in r.conflicts)
    assert "up to 12.2 fully" in text and "CUDA 12.x" in text
    # no CUDA build left for a driver the user gave is "incompatible", naming the CPU build
    r = run(matrix, driver="400")
    assert not r.ok and fields(r) == {"driver"}
    assert "450.80.02" in r.errors[0].message and "CPU build" in r.errors[0].message


# -- every constraint is judged against every build it leaves open ---------------------------


@pytest.mark.parametrize("torch", ["2.6", "2.4"])
def test_gpu_is_checked_without_cuda(matrix, torch):
    # no 2.6 (or 2.4) build has sm_120
    r = run(matrix, torch=torch, gpu="RTX 5090")
    assert fields(r) == {"gpu"} and not r.matches
    assert "sm_120" in r.errors[0].message and "CUDA 12.8" in r.errors[0].message
    assert r.suggestions
    for s in r.suggestions:
        assert run(matrix, torch=s.torch.raw, cuda=s.cuda.raw, gpu="RTX 5090").ok


def test_blackwell_needs_a_driver_that_knows_it(matrix):
    # no CUDA <= 12.6 build has sm_120, and CUDA 12.8 (the first Blackwell toolkit) needs
    # driver >= 570.26: a 560 driver runs nothing on an RTX 5090
    r = run(matrix, gpu="RTX 5090", driver="560.35.05")
    assert fields(r) == {"driver"} and "570.26" in r.errors[0].message
    assert run(matrix, gpu="RTX 5090", driver="570.124.06").ok


def test_volta_on_driver_580_names_builds_without_cuda_13(matrix):
    r = run(matrix, driver="580", gpu="V100")
    assert r.ok and r.matches
    assert all(mt.candidate.cuda < V("13.0") for mt in r.matches if mt.candidate.build)
    assert any("CUDA 13.0" in c.message and c.severity == "note" for c in r.conflicts)
    assert r.best.candidate.release.torch == V("2.14") and r.best.candidate.cuda == V("12.6")


@pytest.mark.parametrize("cuda,torch", [("12.4", "2.4"), ("12.4", "2.5"), ("12.8", "2.8")])
def test_a_bare_branch_means_its_released_drivers(matrix, cuda, torch):
    # every released R525 driver is >= 525.60.13 and runs CUDA 12.x through minor version
    # compatibility: the answer says from which version on
    r = run(matrix, torch=torch, cuda=cuda, driver="525")
    assert r.ok and fields(r, "warning") == {"driver"}
    assert r.best.driver.since == V("525.60.13")
    assert "from 525.60.13 on" in format_check(r)
    # an exact old driver of the same branch is still refused
    assert fields(run(matrix, torch=torch, cuda=cuda, driver="525.53")) == {"driver"}


def test_a_branch_runs_fully_from_the_toolkit_driver_on(matrix):
    r = run(matrix, torch="2.1", cuda="12.1", driver="530")
    assert r.ok and not r.warnings  # 530.30.02 is CUDA 12.1's own driver
    assert r.best.driver.since == V("530.30.02") and r.best.driver.below == "minor-version-compat"


def test_driver_alone_names_the_runnable_range(matrix):
    r = run(matrix, driver="470.82.01")
    assert r.ok
    cuda = {
        (mt.candidate.release.torch.raw, mt.candidate.cuda.raw)
        for mt in r.matches
        if mt.candidate.build
    }
    assert {
        ("1.13", "11.6"),
        ("1.13", "11.7"),
        ("2.0", "11.7"),
        ("2.0", "11.8"),
        ("2.7", "11.8"),
    } <= cuda
    assert all(c.startswith("11.") for _, c in cuda)
    assert [mt.candidate.release.torch.raw for mt in r.matches][:2] == [
        "2.7",
        "2.6",
    ]  # newest first
    assert all(mt.driver.status == "minor-version-compat" for mt in r.matches if mt.candidate.build)
    text = " ".join(c.message for c in r.conflicts)
    assert "no CUDA 12.x or 13.x build" in text
    assert "2.7 cu118 (minor version compat)" in format_check(r)


def test_suggestions_keep_the_gpu(matrix):
    r = run(matrix, torch="2.6", cuda="12.4", gpu="RTX 5090")
    assert fields(r) == {"gpu"}
    assert (r.suggestions[0].torch, r.suggestions[0].cuda) == (V("2.7"), V("12.8"))
    for s in r.suggestions:
        assert run(matrix, torch=s.torch.raw, cuda=s.cuda.raw, gpu="RTX 5090").ok


def test_torchvision_conflict_offers_the_release_it_pairs_with(matrix):
    r = run(matrix, torch="2.3", torchvision="0.19")
    assert fields(r) == {"torchvision"} and "pairs with torch 2.4" in r.errors[0].message
    got = {(s.torch.raw, s.torchvision.raw) for s in r.suggestions}
    assert ("2.4", "0.19") in got and ("2.3", "0.18") in got


@pytest.mark.parametrize("torch,tv,python", [("1.13", "0.14", "3.11"), ("2.5", "0.20", "3.13")])
def test_torchvision_has_its_own_python_wheels(matrix, torch, tv, python):
    # torch 1.13 has cp311 and 2.5 cp313 wheels, torchvision 0.14 / 0.20 do not
    assert run(matrix, torch=torch, python=python).ok
    r = run(matrix, torch=torch, torchvision=tv, python=python)
    assert fields(r) == {"python"} and f"torchvision {tv}" in r.errors[0].message
    for s in r.suggestions:
        assert run(matrix, torch=s.torch.raw, torchvision=s.torchvision.raw, python=s.python.raw).ok


def test_platforms_are_constraints(matrix):
    assert fields(run(matrix, torch="2.5", python="3.13", platform="win-64")) == {"python"}
    r = run(matrix, cuda="12.6", platform="osx-arm64")
    assert fields(r) == {"cuda"} and "for osx-arm64" in r.errors[0].message
    assert run(matrix, torch="2.14", cuda="13.0", gpu="sm_110", platform="linux-aarch64").ok
    assert not run(matrix, torch="2.14", cuda="13.0", gpu="sm_110").ok  # no sm_110 on x86
    with pytest.raises(LockgenError, match="unknown platform 'amiga'"):
        Request.from_strings(matrix, torch="2.1", platform="amiga")


@pytest.mark.parametrize(
    "gpu",
    [
        "GeForce GTX 1080",
        "L4",
        "L40S",
        "A10",
        "RTX 4080",
        "NVIDIA H100 80GB HBM3",
        "Tesla V100-SXM2-16GB",
    ],
)
def test_every_nvidia_name_is_known(matrix, gpu):
    assert run(matrix, gpu=gpu).ok


def test_unverified_facts_are_said_beside_the_verdict(matrix):
    # the only 2.15 CUDA 12.6 facts are leads; A100's capability only from copies of NVIDIA's page
    r = run(matrix, torch="2.15", cuda="12.6")
    assert r.ok and r.unverified and "unverified" in format_check(r).splitlines()[0]
    r = run(matrix, torch="2.14", cuda="12.6", gpu="A100")
    assert r.ok and any("A100" in u for u in r.unverified)
    assert "unverified" in r.to_json() and r.to_json()["unverified"]
    # a fully sourced answer says nothing of the kind
    r = run(matrix, torch="2.14", cuda="13.0", gpu="H100", driver="580.95.05")
    assert r.ok and not r.unverified and "unverified" not in format_check(r)


def test_json_names_the_builds(matrix):
    data = run(matrix, torch="2.14", gpu="V100", driver="535.104.05").to_json()
    assert data["ok"] and [b["cuda"] for b in data["builds"]][:1] == ["12.6"]
    assert data["builds"][0]["driver"] == "minor-version-compat"
    assert set(data["builds"][0]) == {
        "torch",
        "torchvision",
        "cuda",
        "cudnn",
        "python",
        "driver",
        "driver_from",
        "target",
        "unverified",
    }


# -- the table: a grid of (torch, CUDA, GPU, driver, Python) cells from the matrix ------------
#
# The oracle below judges a build from the matrix's data with its own small logic (tuples and
# string prefixes, not lockgen's rules): a release/build pair satisfies a cell when every
# constraint the cell gives holds for it.


def _t(version):
    return tuple(int(p) for p in str(version).split("+")[0].split("."))


def _ge(a, b):
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)) >= b + (0,) * (n - len(b))


def _driver_reaches(driver, need):
    """driver: (parts, is_branch). Some driver it stands for is >= need."""
    parts, branch = driver
    return need[0] <= parts[0] if branch else _ge(parts, need)


def _oracle_runs(archs, gpu):
    for a in archs:
        code = (a.major, a.minor)
        if code == gpu or (a.ptx and code < gpu):
            return True
        jetson = {(5, 3), (6, 2), (7, 2), (8, 7)}
        if not a.specific and code not in jetson and gpu not in jetson:
            if code[0] == gpu[0] and code[1] <= gpu[1]:
                return True
    return False


def oracle(matrix, cell, release, build):
    torch, cuda, gpu, driver, python = cell
    if torch is not None and _t(release.torch)[:2] != _t(torch)[:2]:
        return False
    if cuda == "cpu" and build is not None:
        return False
    if cuda not in (None, "cpu") and (build is None or _t(build.cuda) != _t(cuda)):
        return False
    if python is not None and _t(python) not in [_t(p) for p in release.python]:
        return False
    if gpu is not None and cuda != "cpu":  # asking for the CPU build, the GPU goes unused
        if build is None:
            return False
        archs = matrix.arch_list(release.torch, build.cuda)
        cap = matrix.gpu_capability(gpu)[0]
        if archs is None or not _oracle_runs(archs.archs, (cap.major, cap.minor)):
            return False
    if driver is not None and build is not None:
        d = (_t(driver), "." not in driver)
        major = next(mj for mj in matrix.cuda_majors if mj.major == build.cuda.major)
        if not _driver_reaches(d, _t(major.linux_floor)):
            return False
        if gpu is not None:
            cap = matrix.gpu_capability(gpu)[0]
            for arch in matrix.gpus.architectures:
                if (cap.major, cap.minor) not in [(c.major, c.minor) for c in arch.capabilities]:
                    continue
                if arch.first_cuda is not None:
                    tk = next(t for t in matrix.cuda_toolkits if t.version == arch.first_cuda)
                    if not _driver_reaches(d, _t(tk.linux)):
                        return False
                if arch.last_driver is not None and d[0][0] > arch.last_driver.major:
                    return False
    return True


def grid(matrix):
    torches = [None] + [r.torch.raw for r in matrix.releases]
    cudas = [None, "cpu"] + [c.raw for c in matrix.cuda_versions]
    gpus = [None, "V100", "T4", "RTX 3090", "RTX 4090", "H100", "RTX 5090", "GTX 1080", "sm_35"]
    drivers = [None, "470.82.01", "525", "535.104.05", "560.35.05", "570", "580.95.05", "590"]
    pythons = [None, "3.8", "3.10", "3.13"]
    cells = list(itertools.product(torches, cudas, gpus, drivers, pythons))
    return cells[::353]  # a fixed spread over every axis (353 is prime to every axis length)


def test_grid_every_verdict_rests_on_a_build_and_every_suggestion_passes(matrix):
    cells = grid(matrix)
    assert len(cells) > 150
    compatible = 0
    rechecked: dict[tuple, bool] = {}
    for cell in cells:
        torch, cuda, gpu, driver, python = cell
        r = run(matrix, torch=torch, cuda=cuda, gpu=gpu, driver=driver, python=python)
        fits = [
            (rel, b)
            for rel in matrix.releases
            for b in [*rel.builds, None]
            if oracle(matrix, cell, rel, b)
        ]
        # the CPU build answers a driver-only question, not a GPU one
        assert r.ok == bool(fits), (cell, format_check(r))
        if not r.ok:
            for s in r.suggestions:
                kw = dict(
                    torch=s.torch.raw,
                    torchvision=s.torchvision.raw if s.torchvision else None,
                    cuda=s.cuda.raw if s.cuda else "cpu",
                    cudnn=s.cudnn.raw if s.cudnn else None,
                    python=s.python.raw,
                    gpu=gpu,
                    driver=driver,
                )
                key = tuple(kw.values())
                if key not in rechecked:
                    rechecked[key] = run(matrix, **kw).ok
                assert rechecked[key], (cell, s)
            continue
        compatible += 1
        assert r.matches, cell
        for mt in r.matches:
            c = mt.candidate
            assert oracle(matrix, cell, c.release, c.build), (cell, mt.describe())
    assert 20 < compatible < len(cells) - 20  # the grid has both kinds


def test_one_finding_type_and_json_shape_for_check_doctor_and_verify(matrix):
    from lockgen.findings import Finding, Report, Severity

    r = run(matrix, torch="2.14", cuda="13.0", gpu="V100")
    assert [c.to_json() for c in r.conflicts] == r.to_json()["conflicts"]
    assert r.to_json()["conflicts"][0] == {
        "severity": "error",
        "code": "gpu",
        "message": r.conflicts[0].message,
    }
    report = Report("x.lock", "cu130")
    report.error("hash", "bad")
    assert report.to_json()["findings"] == [{"severity": "error", "code": "hash", "message": "bad"}]
    assert Finding("warning", "gpu", "m").severity is Severity.WARNING
    with pytest.raises(ValueError):
        Finding("warn", "gpu", "m")  # a misspelt severity is refused
