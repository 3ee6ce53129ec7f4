"""`gpufit lm`: fine-tuning a causal LM on a local text file, offline. The built-in tiny Llama
with the SentencePiece model that mistral-common ships, and a tiny random-init model saved as a
local Hugging Face folder. Fused and stock losses agree, a resumed run equals an uninterrupted
one (bit for bit), --lora trains adapters only, and bad input is one line, exit 2.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="needs gpufit[lm]: pip install -e '.[lm]'")
pytest.importorskip("sentencepiece", reason="needs gpufit[lm]: pip install -e '.[lm]'")
pytest.importorskip("mistral_common", reason="needs gpufit[lm] (mistral-common)")

from gpufit.__main__ import main  # noqa: E402
from gpufit.examples import lm  # noqa: E402
from gpufit.examples.lm_config import LMConfig  # noqa: E402

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was "
    "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity. "
) * 12
SMALL = dict(steps=4, batch_size=2, seq_len=16, lr=1e-3, quiet=True, save_every=2)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def run(text, **kw):
    return lm.train(LMConfig(text=text, **{**SMALL, **kw}))


def test_tiny_smoke_run_prints_tokens_per_s_and_peak_memory(text, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["lm", "--text", text, "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--out", str(out), "--quiet"])  # fmt: skip
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0
    assert "tokens/s" in line and "peak RSS" in line and "MiB" in line, line
    assert (out / "checkpoint.pt").is_file() and (out / "metrics.json").is_file()
    assert not list(out.glob(".*.tmp"))  # written atomically, nothing left over


def test_fused_and_stock_losses_agree(text):
    fused = run(text, fused=True)["losses"]
    stock = run(text, fused=False)["losses"]
    assert fused == pytest.approx(stock, rel=1e-5)
    assert fused[-1] < fused[0]  # it learns the repeated text


def test_resume_equals_an_uninterrupted_run(text, tmp_path):
    whole = run(text, steps=4)
    part = run(text, steps=2, out=str(tmp_path / "a"))
    assert part["losses"] == whole["losses"][:2]
    resumed = run(text, steps=4, resume=str(tmp_path / "a" / "checkpoint.pt"))
    assert resumed["losses"] == whole["losses"]  # bit for bit
    for (name, p), (_, q) in zip(
        whole["model"].named_parameters(), resumed["model"].named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("qwen2")
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def test_local_folder_with_lora_trains_adapters_only(text, hf_folder):
    tokenizer = str(lm.shipped_tokenizer())
    result = run(text, model=str(hf_folder), tokenizer=tokenizer, lora=True, lora_rank=4)
    model = result["model"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    stock = run(text, model=str(hf_folder), tokenizer=tokenizer, lora=True, lora_rank=4,
                fused=False)  # fmt: skip
    assert result["losses"] == pytest.approx(stock["losses"], rel=1e-5)


def test_bf16_autocast_runs(text):
    losses = run(text, steps=2, bf16=True)["losses"]
    fp32 = run(text, steps=2)["losses"]
    assert losses == pytest.approx(fp32, rel=2e-2)  # bf16: loose


def _error(capsys, *argv) -> str:
    try:
        code = main(["lm", *argv])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]  # argparse prints its usage lines first
    assert last.startswith("gpufit lm: error: "), err
    return last


def test_bad_input_is_one_line(text, tmp_path, capsys, hf_folder):
    small = ["--seq-len", "16", "--batch-size", "2", "--steps", "2", "--quiet"]
    assert "no such folder" in _error(capsys, "--text", text, "--model", str(tmp_path / "nope"))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert "no config.json" in _error(capsys, "--text", text, "--model", str(empty))
    assert "no such file" in _error(capsys, "--text", str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("  \n")
    assert "is empty" in _error(capsys, "--text", str(tmp_path / "blank.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\0\0\0")
    assert "binary" in _error(capsys, "--text", str(tmp_path / "bin.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
    assert "not UTF-8" in _error(capsys, "--text", str(tmp_path / "latin1.txt"))
    (tmp_path / "short.txt").write_text("a few words")
    assert "one batch needs" in _error(capsys, "--text", str(tmp_path / "short.txt"), *small)
    assert "no tokenizer could be loaded" in _error(capsys, "--text", text, "--model",
                                                    str(hf_folder), *small)  # fmt: skip
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\3\4 truncated")
    assert "truncated" in _error(capsys, "--text", text, "--resume", str(bad), *small)
    torch.save({"weight": torch.zeros(2)}, bad)
    assert "not a gpufit lm checkpoint" in _error(capsys, "--text", text, "--resume", str(bad))
    assert "--steps" in _error(capsys, "--text", text, "--steps", "0")


def test_resume_of_another_run_is_refused(text, tmp_path, capsys):
    run(text, steps=2, out=str(tmp_path / "a"))
    checkpoint = str(tmp_path / "a" / "checkpoint.pt")
    err = _error(capsys, "--text", text, "--resume", checkpoint, "--seq-len", "16",
                 "--batch-size", "2", "--steps", "4", "--lr", "0.5")  # fmt: skip
    assert "different run" in err and "lr" in err
    err = _error(capsys, "--text", text, "--resume", checkpoint, "--seq-len", "16",
                 "--batch-size", "2", "--steps", "2", "--lr", "0.001")  # fmt: skip
    assert "already trained 2 steps" in err


def test_help_names_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["lm", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--model", "--text", "--lora", "--bf16", "--fused", "--no-fused", "--resume"):
        assert flag in help_text


# ---------------------------------------------------------------- non-finite losses and --quiet


@pytest.fixture(scope="module")
def nan_folder(hf_folder, tmp_path_factory):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, local_files_only=True)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    folder = tmp_path_factory.mktemp("qwen2-nan")
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("lora", [False, True])
def test_nan_weights_in_the_model_folder_are_named(text, nan_folder, capsys, lora):
    tokenizer = str(lm.shipped_tokenizer())
    code = main(["lm", "--text", text, "--model", str(nan_folder), "--tokenizer", tokenizer,
                 "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--quiet",
                 *(["--lora"] if lora else [])])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "layers.1.mlp.up_proj" in err and f"--model {nan_folder}" in err
    assert "lower --lr" not in err


def test_non_finite_loss_says_what_the_weights_tell(text):
    cfg = LMConfig(text=text, model="tiny")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    finite = lm.non_finite_loss_message(cfg, model, 3, 0, float("nan"))
    assert "every weight is finite" in finite
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    trained = lm.non_finite_loss_message(cfg, model, 3, 0, float("nan"))
    assert "training made weights" in trained and "1.weight" in trained and "--lr" in trained
    loaded = lm.non_finite_loss_message(cfg, model, 3, 3, float("inf"))
    assert "loaded from --model tiny" in loaded and "1.weight" in loaded


def test_quiet_prints_only_the_summary_line(text, hf_folder, tmp_path):
    """--quiet: no weight-loading progress bars and no library FutureWarnings (peft's, with
    --lora) on a resumed run. A fresh process: pytest would catch the warnings itself."""
    import subprocess
    import sys

    tokenizer = str(lm.shipped_tokenizer())
    settings = dict(model=str(hf_folder), tokenizer=tokenizer, lora=True, lora_rank=4)
    run(text, steps=2, out=str(tmp_path / "run"), **settings)
    argv = ["-m", "gpufit", "lm", "--text", text, "--model", str(hf_folder), "--tokenizer",
            tokenizer, "--seq-len", "16", "--batch-size", "2", "--lr", "1e-3", "--lora",
            "--lora-rank", "4", "--steps", "3", "--resume", str(tmp_path / "run" / "checkpoint.pt"),
            "--quiet", "--device", "cpu", "--threads", "1"]  # fmt: skip
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("lm: loss"), proc.stdout


def test_library_deprecation_warnings_are_not_printed(text, hf_folder, tmp_path):
    """Without --quiet too: a refused --lora resume is the error line, no peft FutureWarning
    before it (progress bars may show)."""
    import subprocess
    import sys

    tokenizer = str(lm.shipped_tokenizer())
    settings = dict(model=str(hf_folder), tokenizer=tokenizer, lora=True, lora_rank=4)
    run(text, steps=2, out=str(tmp_path / "run"), **settings)
    argv = ["-m", "gpufit", "lm", "--text", text, "--model", str(hf_folder), "--tokenizer",
            tokenizer, "--seq-len", "16", "--batch-size", "2", "--lr", "0.5", "--lora",
            "--lora-rank", "4", "--steps", "3", "--resume", str(tmp_path / "run" / "checkpoint.pt"),
            "--device", "cpu", "--threads", "1"]  # fmt: skip
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr
    assert "Warning" not in proc.stderr and "warnings.warn" not in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("gpufit lm: error: --resume")
