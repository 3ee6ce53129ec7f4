"""``lockgen doctor --stack`` on replayed interpreters: the installed stack, the CUDA majors its
libraries link, whether it imports, and the fix."""

from __future__ import annotations

import io
import json
from pathlib import Path

from pypi_replay import Replay

from lockgen import pypi
from lockgen.cli import main
from lockgen.probe import CommandResult, Prober
from lockgen.stack_doctor import IMPORT_ALL, INVENTORY

FIXTURES = Path(__file__).parent / "fixtures"


def fake_python(inventory: dict, imports: dict[str, CommandResult]):
    def run(argv, timeout):
        assert argv[0] == "py"
        if argv[2] == INVENTORY:
            return CommandResult(0, json.dumps(inventory))
        return imports.get(argv[2], CommandResult(0))

    return run


def doctor(run) -> tuple[int, dict]:
    out = io.StringIO()
    rc = main(
        ["doctor", "--stack", "--format", "json"],
        out,
        io.StringIO(),
        prober=Prober(run=run, python_exe="py"),
    )
    return rc, json.loads(out.getvalue())


def recorded_vllm_library(tmp_path: Path) -> Path:
    """vllm 0.34.0's cumem_allocator.abi3.so, its real bytes from the recorded responses."""
    folder = FIXTURES / "pypi-vllm-member"
    facts = json.loads((folder / "member.json").read_text())
    remote = pypi.Remote(Replay(folder), facts["url"], facts["size"])
    lib = tmp_path / "cumem_allocator.abi3.so"
    lib.write_bytes(pypi.read_member(remote, pypi.Member(**facts["member"])))
    return lib


def test_a_cuda13_vllm_beside_a_cuda12_torch(tmp_path):
    lib = recorded_vllm_library(tmp_path)
    inventory = {
        "vllm": {"version": "0.34.0", "libs": [str(lib), str(tmp_path / "missing.so")]},
        "torch": {"version": "2.10.0+cu128", "cuda": "12.8"},
    }
    failed = CommandResult(
        1, "", "ImportError: libnvrtc.so.13: cannot open shared object file: No such file"
    )
    rc, res = doctor(fake_python(inventory, {"import vllm": failed}))
    assert rc == 1 and res["broken"]
    (vllm,) = res["packages"]
    assert vllm["cuda"] == [13]
    codes: dict[str, str] = {}
    for f in vllm["findings"]:
        codes[f["code"]] = codes.get(f["code"], "") + f["message"] + " | "
    assert "links CUDA 13" in codes["cuda"] and "CUDA 12 build" in codes["cuda"]
    assert "libnvrtc.so.13: cannot open shared object file" in codes["load"]
    assert "torch==2.14.0" in codes["install"]
    assert vllm["fix"] == "pip install 'torch==2.14.*' vllm==0.34.0"
    rc, out, err = _check_line(vllm["fix"])
    assert rc == 0, out + err


def _check_line(pip_line: str):
    """The fix, read back as a check request: it must pass."""
    words = pip_line.replace("'", "").split()[2:]
    argv = ["check"]
    for w in words:
        if w.startswith("torch=="):
            argv += ["--torch", w.removeprefix("torch==").removesuffix(".*")]
        else:
            argv += ["--with", w]
    out, err = io.StringIO(), io.StringIO()
    return main(argv, out, err), out.getvalue(), err.getvalue()


def test_pypi_xformers_beside_cuda13_torch_gets_the_pytorch_index_fix(monkeypatch):
    monkeypatch.setattr(
        "lockgen.stack_doctor.file_needed",
        lambda path: ("libtorch.so", "libcudart.so.12") if path.endswith("_C.so") else (),
    )
    inventory = {
        "xformers": {"version": "0.0.35", "libs": ["/env/xformers/_C.so"]},
        "torch": {"version": "2.14.1+cu130", "cuda": "13.0"},
    }
    warn = CommandResult(
        0,
        "",
        "WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions. xFormers was built for:\n",
    )
    rc, res = doctor(fake_python(inventory, {"import xformers.ops": warn}))
    assert rc == 1
    (xf,) = res["packages"]
    assert xf["cuda"] == [12]
    msgs = " | ".join(f["message"] for f in xf["findings"])
    assert "links CUDA 12" in msgs and "can't load C++/CUDA extensions" in msgs
    assert xf["fix"].startswith(
        "pip install --force-reinstall --no-deps xformers==0.0.35 "
        "--index-url https://download.pytorch.org/whl/cu130"
    )


def test_nothing_installed_and_torch_missing():
    inventory = {"torch": {"error": "ModuleNotFoundError: No module named 'torch'"}}
    rc, res = doctor(fake_python(inventory, {}))
    assert rc == 1 and res["torch"][0]["code"] == "torch-missing"


def test_a_working_pure_python_stack():
    inventory = {
        "peft": {"version": "0.21.2", "libs": []},
        "torch": {"version": "2.14.1+cu130", "cuda": "13.0"},
    }
    rc, res = doctor(fake_python(inventory, {}))
    assert rc == 0
    (peft,) = res["packages"]
    assert peft["fix"] is None and peft["cuda"] == []


# -- every import from one interpreter: torch imported once, a forked child per package ---------


def _import_all_here(tmp_path, modules: dict[str, str], limit: int = 60) -> dict:
    """IMPORT_ALL run for real by this interpreter, in a folder of stand-in packages."""
    import subprocess
    import sys

    argv = [sys.executable, "-c", IMPORT_ALL, json.dumps(modules), str(limit)]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_import_all_keeps_each_import_apart(tmp_path):
    """Each package is imported in a child of its own: a C-level message on fd 2, an import
    error, a crash and a hang are each told apart, and none reaches the others."""
    warning = "WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions."
    (tmp_path / "warns.py").write_text(
        f"import os\nos.write(2, {(warning + chr(10)).encode()!r})\n"
    )
    (tmp_path / "broken.py").write_text(
        "raise ImportError('/x/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n"
    )
    (tmp_path / "crashes.py").write_text("import os\nos.abort()\n")
    (tmp_path / "hangs.py").write_text("import time\ntime.sleep(60)\n")
    (tmp_path / "fine.py").write_text("import sys\nsys.modules[__name__].ok = True\n")
    got = _import_all_here(
        tmp_path,
        {n: n for n in ("warns", "broken", "crashes", "hangs", "fine")},
        limit=2,
    )
    assert got["warns"]["status"] == 0 and "can't load C++/CUDA" in got["warns"]["output"]
    assert got["broken"]["status"] == 1 and "undefined symbol" in got["broken"]["output"]
    assert got["crashes"]["status"] < 0  # killed by a signal, the others went on
    assert got["hangs"]["status"] == -14  # SIGALRM: outlived its time
    assert got["fine"] == {"status": 0, "output": ""}


def recording_python(packages: dict[str, str], import_all: CommandResult):
    """A replayed interpreter holding ``packages`` (name: version) beside torch 2.14.1
    (CUDA 13.0) that answers IMPORT_ALL with ``import_all``, every other import with success;
    and the list of the scripts it was asked to run."""
    inventory = {n: {"version": v, "libs": []} for n, v in packages.items()}
    inventory["torch"] = {"version": "2.14.1", "cuda": "13.0"}
    calls: list[str] = []

    def run(argv, timeout):
        calls.append(argv[2])
        if argv[2] == INVENTORY:
            return CommandResult(0, json.dumps(inventory))
        if argv[2] == IMPORT_ALL:
            assert set(json.loads(argv[3])) <= set(packages)
            return import_all
        return CommandResult(0)

    return run, calls


def test_doctor_imports_every_package_in_one_run():
    """Two child runs whatever the number of packages: the inventory and IMPORT_ALL (each
    used to be a run of its own, each importing torch again)."""
    warn = "WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions. built for CUDA 12"
    answers = {
        "xformers": {"status": 0, "output": warn},
        "bitsandbytes": {"status": 1, "output": "OSError: x.so: undefined symbol: f"},
        "liger-kernel": {"status": 0, "output": ""},
    }
    run, calls = recording_python(
        {"xformers": "0.0.35", "bitsandbytes": "0.50.2", "liger-kernel": "0.8.5"},
        CommandResult(0, json.dumps(answers)),
    )
    rc, res = doctor(run)
    assert calls == [INVENTORY, IMPORT_ALL]
    by = {p["package"]: {f["code"]: f["message"] for f in p["findings"]} for p in res["packages"]}
    assert "can't load C++/CUDA extensions" in by["xformers"]["load"]
    assert "undefined symbol: f" in by["bitsandbytes"]["abi"]
    assert by["liger-kernel"]["import"] == "import liger_kernel works"
    assert rc == 1


def test_doctor_falls_back_to_one_import_per_process():
    """Where IMPORT_ALL gives no answer (no os.fork there), each package is imported alone."""
    no_fork = CommandResult(1, "", "AttributeError: module 'os' has no attribute 'fork'")
    run, calls = recording_python({"bitsandbytes": "0.50.2"}, no_fork)
    rc, res = doctor(run)
    assert calls == [INVENTORY, IMPORT_ALL, "import bitsandbytes"]
    assert rc == 0
