"""The LLM stack: refresh-stack on recorded PyPI responses, the facts' loader and
``lockgen check --with``."""

from __future__ import annotations

import io
import itertools
import json
import shlex
from pathlib import Path

import pytest
from pypi_replay import Replay

from lockgen import pypi
from lockgen.check import Request
from lockgen.cli import main
from lockgen.errors import MatrixError
from lockgen.load import DATA_DIR
from lockgen.specifiers import Requirement, contains
from lockgen.stack import load_stack
from lockgen.stack_check import With, check_stack
from lockgen.stack_refresh import refresh, to_toml

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def stack():
    return load_stack()


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), out, err)
    return rc, out.getvalue(), err.getvalue()


def check_json(*argv: str) -> tuple[int, dict]:
    rc, out, err = run("check", *argv, "--format", "json")
    assert rc in (0, 1), err
    return rc, json.loads(out)


# -- refresh-stack on recorded responses --------------------------------------------------------


def test_refresh_reads_metadata_and_bundled_cuda_from_recorded_pypi():
    replay = Replay(FIXTURES / "pypi-bitsandbytes")
    (rel,) = refresh(replay, ["bitsandbytes"], 1)
    assert (rel.package, rel.version, rel.requires_python) == ("bitsandbytes", "0.50.2", ">=3.10")
    assert "torch<3,>=2.4" in rel.requires
    linux = {a.file.filename: a.cuda for a in rel.artifacts if "linux" in a.file.filename}
    assert linux == {
        "bitsandbytes-0.50.2-py3-none-manylinux_2_24_aarch64.whl": (11, 12, 13),
        "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl": (11, 12, 13),
    }
    files = [k for k in replay.asked if "files.pythonhosted.org" in k]
    # every read of a file is a byte range: no wheel is downloaded whole
    assert files and all(k.split("|")[1].startswith("bytes=") for k in files)


def test_refreshed_toml_loads_with_the_kept_facts(tmp_path):
    (rel,) = refresh(Replay(FIXTURES / "pypi-bitsandbytes"), ["bitsandbytes"], 1)
    (tmp_path / "stack-pypi.toml").write_text(to_toml([rel], "2026-12-06"))
    (tmp_path / "stack.toml").write_text((DATA_DIR / "stack.toml").read_text())
    loaded = load_stack(tmp_path)
    (r,) = loaded.releases["bitsandbytes"]
    assert r.verified and r.requires_python == ">=3.10"
    x86 = next(a for a in r.artifacts if a.platform.endswith("x86_64"))
    assert x86.cuda == (11, 12, 13) and x86.verified


def test_elf_needed_of_a_recorded_wheel_member():
    folder = FIXTURES / "pypi-vllm-member"
    facts = json.loads((folder / "member.json").read_text())
    remote = pypi.Remote(Replay(folder), facts["url"], facts["size"])
    needed = pypi.elf_needed(remote, pypi.Member(**facts["member"]))
    assert needed == tuple(facts["needed"])
    assert "libnvrtc.so.13" in needed and pypi.cuda_majors(needed) == (13,)
    assert remote.fetched < facts["member"]["compressed"] + 1024  # the member, not the wheel


def test_elf_needed_refuses_what_is_not_elf():
    body = b"PK\x03\x04" + bytes(26) + b"not an elf file at all, just text" + bytes(64)
    remote = pypi.Remote(lambda url, h: _ranged(body, h), "u", len(body))
    with pytest.raises(pypi.PypiError, match="not a 64-bit little-endian ELF"):
        pypi.elf_needed(remote, pypi.Member("x.so", 0, len(body) - 30, len(body) - 30, 0))


def _ranged(body: bytes, headers) -> bytes:
    start, end = headers["Range"].removeprefix("bytes=").split("-")
    return body[int(start) : int(end) + 1]


def test_refresh_stack_command_writes_the_facts_and_prints_the_diff(tmp_path, capsys):
    out, err = io.StringIO(), io.StringIO()
    target = tmp_path / "new.toml"
    argv = ["refresh-stack", "--package", "bitsandbytes", "--releases", "1", "--out", str(target)]
    rc = main(argv, out, err, pypi_get=Replay(FIXTURES / "pypi-bitsandbytes"))
    assert rc == 0, err.getvalue()
    assert 'version = "0.50.2"' in target.read_text()
    assert out.getvalue().startswith("--- data/stack-pypi.toml\n+++ ")
    assert "bitsandbytes 0.50.2 (1/1)" in capsys.readouterr().err  # progress


def test_refresh_stack_unknown_package_is_a_usage_error(tmp_path):
    rc = main(
        ["refresh-stack", "--package", "nope", "--out", str(tmp_path / "x")],
        io.StringIO(),
        err := io.StringIO(),
        pypi_get=Replay(FIXTURES / "pypi-bitsandbytes"),
    )
    assert rc == 2 and "unknown package 'nope'" in err.getvalue()


# -- the facts ----------------------------------------------------------------------------------


def test_every_stack_fact_names_its_source(stack):
    facts = [*stack.bindings, *stack.gpu_floors, *stack.off_pypi]
    facts += [r for rs in stack.releases.values() for r in rs]
    assert facts and all(f.source for f in facts)
    # off-PyPI artifacts could not be read from here: never marked verified
    assert not any(o.verified for o in stack.off_pypi)


def test_each_package_has_recent_releases(stack):
    for name in (
        "xformers",
        "vllm",
        "flash-attn",
        "bitsandbytes",
        "torchao",
        "torchaudio",
        "deepspeed",
        "triton",
        "liger-kernel",
        "transformers",
        "peft",
        "trl",
        "accelerate",
    ):
        assert len(stack.releases[name]) >= 6, name


def test_a_bad_binding_kind_names_file_and_entry(tmp_path):
    text = (DATA_DIR / "stack.toml").read_text().replace('kind = "jit"', 'kind = "magic"')
    (tmp_path / "stack.toml").write_text(text)
    (tmp_path / "stack-pypi.toml").write_text((DATA_DIR / "stack-pypi.toml").read_text())
    with pytest.raises(MatrixError, match=r"stack\.toml: binding \d+: unknown kind 'magic'"):
        load_stack(tmp_path)


@pytest.mark.parametrize(
    "spec,version,ok",
    [
        (">=2.10", "2.14.0", True),
        ("==2.13.0", "2.13", True),
        ("==2.13.0", "2.14.0", False),
        ("<3,>=2.4", "2.3.1", False),
        (">=3.11,<3.15", "3.15", False),
        ("~=3.8.0", "3.8.4", True),
        ("~=3.8.0", "3.9.0", False),
        ("<=0.31.0,>=0.22.0", "0.31.0", True),
        (">=2.8.3,<=2.8.3.post1", "2.8.3.post2", False),
    ],
)
def test_specifiers(spec, version, ok):
    assert contains(spec, version) is ok


def test_requirement_with_extra_marker():
    r = Requirement.parse('vllm<=0.31.0,>=0.22.0; extra == "vllm"')
    assert (r.name, r.spec, r.extra) == ("vllm", "<=0.31.0,>=0.22.0", "vllm")


# -- check --with: the examples -----------------------------------------------------------


def test_xformers_cuda12_binary_beside_pypi_torch_cuda13_is_refused_with_a_fix():
    rc, res = check_json("--torch", "2.14", "--with", "xformers==0.0.35")
    assert rc == 1 and res["verdict"] == "incompatible"
    (err,) = [c for c in res["conflicts"] if c["severity"] == "error"]
    assert err["code"] == "load" and "libcudart.so.12" in err["message"]
    assert "CUDA 13" in err["message"] and "whl/cu130" in err["message"]
    assert ["--torch", "2.14", "--cuda", "12.6", "--with", "xformers==0.0.35"] in res["suggestions"]


def test_vllm_refused_with_the_torch_it_pins():
    rc, res = check_json("--torch", "2.14", "--with", "vllm==0.32.0")
    assert rc == 1
    assert any("torch==2.13.0" in c["message"] for c in res["conflicts"])
    assert ["--torch", "2.13", "--with", "vllm==0.32.0"] in res["suggestions"]


def test_flash_attn_with_pypi_torch_214_will_compile():
    rc, res = check_json("--torch", "2.14", "--python", "3.12", "--with", "flash-attn")
    assert rc == 0 and res["verdict"] == "compatible with warnings"
    (w,) = res["conflicts"]
    assert w["code"] == "build" and "compiles it from source" in w["message"]
    assert "+cu13torch2.14cxx11abiTRUE-cp312-cp312-linux_x86_64.whl" in w["message"]
    assert "Offline" in w["message"]
    assert res["packages"][0]["file"] == "flash_attn-2.8.3.post2.tar.gz"


def test_flash_attn_with_a_torch_its_wheels_were_built_for_downloads_one():
    rc, res = check_json("--torch", "2.8", "--python", "3.12", "--with", "flash-attn==2.8.3")
    assert rc == 0
    (note,) = res["conflicts"]
    assert note["severity"] == "note"
    assert "v2.8.3/flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312" in note["message"]
    assert any("GitHub wheels" in u for u in res["unverified"])


def test_bitsandbytes_050_on_torch_23_is_refused():
    rc, res = check_json("--torch", "2.3", "--with", "bitsandbytes==0.50.2")
    assert rc == 1
    assert any("torch<3,>=2.4" in c["message"] for c in res["conflicts"])


def test_trl_vllm_extra_brings_vllm_and_its_torch():
    rc, res = check_json("--torch", "2.14", "--with", "trl[vllm]==1.16.0")
    assert rc == 1 and any("torch==2.13.0" in c["message"] for c in res["conflicts"])
    rc, res = check_json(*res["suggestions"][0])
    assert rc == 0
    names = {p["package"]: p["version"] for p in res["packages"]}
    assert names["trl"] == "1.16.0" and names["vllm"] == "0.31.0"


def test_gpu_floor():
    rc, res = check_json("--torch", "2.14", "--gpu", "sm_75", "--with", "flash-attn")
    assert rc == 1 and res["conflicts"][0]["code"] == "gpu"


def test_unknown_package_is_a_usage_error_listing_the_known():
    rc, out, err = run("check", "--torch", "2.14", "--with", "xformer")
    assert rc == 2 and "unknown package 'xformer'" in err and "xformers" in err


def test_text_output_names_the_builds():
    rc, out, _ = run("check", "--torch", "2.10", "--with", "xformers", "--with", "bitsandbytes")
    assert rc == 0 and out.startswith("compatible")
    assert "xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl" in out
    assert "torch 2.10 (CUDA 12.8 build from PyPI)" in out


# -- the grid -------------------------------------------------------------------------------------

GRID_TORCH = ("2.8", "2.10", "2.13", "2.14")
GRID_WITH = (
    "xformers==0.0.35",
    "xformers==0.0.34",
    "vllm==0.32.0",
    "vllm==0.34.0",
    "flash-attn==2.8.3",
    "bitsandbytes==0.50.2",
    "torchao==0.16.0",
    "torchaudio==2.11.0",
    "deepspeed",
    "trl[vllm]",
)
GRID_GPU = ("sm_75", "sm_90")
GRID_PYTHON = ("3.10", "3.12")


def test_grid_every_compatible_names_builds_and_every_suggestion_passes(matrix, stack):
    seen = {"ok": 0, "refused": 0, "suggestions": 0}
    for torch, spec, gpu, py in itertools.product(GRID_TORCH, GRID_WITH, GRID_GPU, GRID_PYTHON):
        req = Request.from_strings(matrix, torch=torch, gpu=gpu, python=py)
        res = check_stack(matrix, stack, req, [With.parse(spec, stack)])
        cell = f"{torch} {spec} {gpu} {py}"
        if res.ok:
            seen["ok"] += 1
            assert res.torch is not None and res.torch.torch.raw == torch, cell
            assert res.picks and all(p.file for p in res.picks), cell
            assert With.parse(spec, stack).name in {p.release.package for p in res.picks}, cell
            assert not res.suggestions
        else:
            seen["refused"] += 1
            assert any(c.severity == "error" for c in res.conflicts), cell
            for s in res.suggestions:
                seen["suggestions"] += 1
                rc, out, err = run("check", *s)
                assert rc == 0, f"{cell}: suggestion {shlex.join(s)} fails:\n{out}{err}"
    assert seen["ok"] and seen["refused"] and seen["suggestions"]


def test_gpufit_is_built_from_this_repository_against_torch():
    rc, res = check_json("--torch", "2.14", "--with", "gpufit")
    assert rc == 0 and res["packages"][0]["from"] == "this repository"
    assert "CUDA 13 toolkit" in res["conflicts"][0]["message"]
    rc, res = check_json("--torch", "2.4", "--with", "gpufit")
    assert rc == 1 and "torch>=2.5" in res["conflicts"][0]["message"]


def test_refresh_reads_an_sdists_pkg_info_from_its_first_bytes():
    replay = Replay(FIXTURES / "pypi-flash-attn")
    (rel,) = refresh(replay, ["flash-attn"], 1)
    assert (rel.version, rel.requires_python, rel.requires) == ("2.8.3.post2", ">=3.9", ("torch",))
    (art,) = rel.artifacts
    assert art.file.filename == "flash_attn-2.8.3.post2.tar.gz" and art.file.tags[0] == "source"
    # one 64 KiB range from the start of an 8 MB sdist
    assert [k.split("|")[1] for k in replay.asked if "pythonhosted" in k] == ["bytes=0-65535"]


def test_a_torchvision_pin_the_torch_does_not_pair_with(matrix, stack):
    from dataclasses import replace

    r = stack.releases["vllm"][0]
    assert any(q.name == "torch" and q.spec == "==2.14.0" for q in r.requires)
    pins = tuple(replace(q, spec="==0.28.0") if q.name == "torchvision" else q for q in r.requires)
    other = replace(stack, releases={**stack.releases, "vllm": (replace(r, requires=pins),)})
    req = Request.from_strings(matrix, torch="2.14")
    assert check_stack(matrix, stack, req, [With("vllm")]).ok
    res = check_stack(matrix, other, req, [With("vllm")], suggest=False)
    assert not res.ok
    assert any("torchvision==0.28.0" in c.message and "0.29" in c.message for c in res.conflicts)


def test_json_keys_are_stable():
    for argv in (
        ("--torch", "2.10", "--with", "xformers"),
        ("--torch", "2.3", "--with", "peft==0.21.2"),
    ):
        _, res = check_json(*argv)
        assert set(res) == {
            "request",
            "with",
            "verdict",
            "ok",
            "torch",
            "packages",
            "unverified",
            "conflicts",
            "suggestions",
        }
    _, res = check_json("--torch", "2.10", "--with", "xformers")
    assert set(res["torch"]) == {"torch", "cuda", "from", "python"}
    assert set(res["packages"][0]) == {"package", "version", "file", "from", "unverified"}


def test_a_bad_artifact_names_its_release(tmp_path):
    text = (DATA_DIR / "stack-pypi.toml").read_text().replace("cuda = [12]", 'cuda = "12"', 1)
    (tmp_path / "stack-pypi.toml").write_text(text)
    (tmp_path / "stack.toml").write_text((DATA_DIR / "stack.toml").read_text())
    with pytest.raises(MatrixError, match=r"release \d+ artifact \d+: 'cuda' must be a list"):
        load_stack(tmp_path)


def test_deepspeed_ops_need_an_nvcc_that_matches_torch():
    _, res = check_json("--torch", "2.14", "--with", "deepspeed")
    assert "nvcc 13.0 exactly" in res["conflicts"][0]["message"]
    _, res = check_json("--torch", "2.10", "--with", "deepspeed")
    assert "an nvcc 12.x" in res["conflicts"][0]["message"]


def test_the_transformers_cap_vllm_declares_is_enforced():
    """vllm 0.31.0 requires transformers<5.18.0: with transformers 5.25.0 asked it is
    refused, whichever is named first; unpinned, the newest vllm without the cap is taken."""
    for order in (
        ("vllm==0.31.0", "transformers==5.25.0"),
        ("transformers==5.25.0", "vllm==0.31.0"),
    ):
        args = ["--torch", "2.13"] + [a for w in order for a in ("--with", w)]
        rc, res = check_json(*args)
        assert rc == 1, order
        assert any(
            "transformers" in c["message"] and "<5.18.0" in c["message"] for c in res["conflicts"]
        ), res["conflicts"]
        for s in res["suggestions"]:
            assert check_json(*s)[0] == 0, s
    rc, res = check_json("--torch", "2.13", "--with", "transformers==5.25.0", "--with", "vllm")
    assert rc == 0
    assert {p["package"]: p["version"] for p in res["packages"]}["vllm"] == "0.30.0"
    # without transformers asked, the newest vllm for torch 2.13 (0.32.0) is picked
    rc, res = check_json("--torch", "2.13", "--with", "vllm")
    assert rc == 0 and res["packages"][0]["version"] == "0.32.0"
