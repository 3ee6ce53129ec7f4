"""How much memory and time does gpufit.fuse save on a transformers LM's head and loss?

    python -m benchmarks.lm_head [--device cpu|cuda] [--vocab 32000 128256] [--rounds 5]
                                 [--family llama|smollm3|qwen3] [--quick] [--out out/benchmarks]

One training step (forward + backward, no optimizer) of a tiny random-init Llama (or another
family whose head and loss follow the standard pattern, with --family; hidden 256,
2 layers, intermediate 1024, batch 4 x 256 tokens; fp32 on CPU, bf16 on CUDA) whose loss is:
  stock          transformers' own: logits from lm_head, then ForCausalLMLoss
  gpufit         the same model after gpufit.fuse (fused_linear_cross_entropy, no logits)
  torch-chunked  the model's hidden states into torch.nn.functional.linear_cross_entropy
  cce            Cut Cross-Entropy's linear_cross_entropy on the hidden states: its
                 torch_compile implementation on CPU, its CUDA kernel ("cce") on a GPU
  liger          LigerFusedLinearCrossEntropyLoss on the hidden states (CUDA only)
  trl            TRL's own fused head (trl.trainer.utils.add_fused_lm_head, with the outputs
                 SFTTrainer asks for: log-probs, entropy, top-1), its loss
  trl-gpufit     the same TRL head after gpufit.trl.use_gpufit(): gpufit's op under it
The torch-chunked, cce and liger variants get the labels shifted as the model shifts them.
Vocabularies 32000 and 128256.
Timed in the same rounds, the head's GEMM floor: the three GEMMs of the head's forward +
backward alone (logits, grad of the hidden states, grad of lm_head's weight; (tokens, hidden) x
(hidden, vocab)), the least a three-GEMM head can add to the model's own step.
Memory: peak bytes allocated during the step above what was allocated before it (parameters
excluded, the gradients produced included), each variant in a fresh process after one warm-up
step; CPU: the torch profiler's allocation records (benchmarks/memory.py), CUDA:
max_memory_allocated. Time: variants alternate within each round (each round starting with
the next one), the median over rounds. The load average before and after is recorded.
Writes lm_head_<device>_<dtype>.json and .png and prints each variant's ratios to stock.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MIB = 1 << 20
VARIANTS = {
    "cpu": ("stock", "gpufit", "torch-chunked", "cce", "trl", "trl-gpufit"),
    "cuda": ("stock", "gpufit", "torch-chunked", "cce", "liger", "trl", "trl-gpufit"),
}
# the per-token outputs SFTTrainer asks TRL's fused head for (trl 1.16)
TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")
SHAPE = {"hidden": 256, "layers": 2, "intermediate": 1024, "batch": 4, "tokens": 256}
QUICK_SHAPE = {**SHAPE, "batch": 2, "tokens": 64}
# --family: transformers' config and model class names; each gets the same tiny shape
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
            "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}  # fmt: skip


class Workload:
    """The model (stock and fused copies), one batch, and a training step per variant."""

    def __init__(self, device: str, dtype, vocab: int, shape: dict, family: str = "llama"):
        import torch
        import transformers

        import gpufit

        self.torch, self.device = torch, device
        torch.manual_seed(0)
        config_class, model_class = (getattr(transformers, n) for n in FAMILIES[family])
        config = config_class(
            vocab_size=vocab, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
            intermediate_size=shape["intermediate"], num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=shape["tokens"],
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        self.stock = model_class(config).to(device, dtype).train()
        self.fused = gpufit.fuse(copy.deepcopy(self.stock))
        self.trl_model = None  # the stock model with TRL's fused head, made on first use
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (shape["batch"], shape["tokens"]), generator=g)
        labels = ids.clone()
        labels[:, : shape["tokens"] // 8] = -100  # a prompt, not trained on
        self.ids, self.labels = ids.to(device), labels.to(device)
        shifted = torch.nn.functional.pad(self.labels, (0, 1), value=-100)[:, 1:]
        self.shift_labels = shifted.reshape(-1)

    def loss_fn(self, name: str):
        torch = self.torch
        F = torch.nn.functional
        if name == "stock":
            return lambda: self.stock(input_ids=self.ids, labels=self.labels).loss
        if name == "gpufit":
            return lambda: self.fused(input_ids=self.ids, labels=self.labels).loss
        if name == "torch-chunked":
            options = torch.nn.LinearCrossEntropyOptions()
            return self._on_hidden(lambda x, w, t: F.linear_cross_entropy(
                x, w, t, ignore_index=-100, options=options))  # fmt: skip
        if name == "cce":
            from cut_cross_entropy import linear_cross_entropy

            impl = "cce" if self.device == "cuda" else "torch_compile"
            return self._on_hidden(lambda x, w, t: linear_cross_entropy(x, w, t, impl=impl))
        if name in ("trl", "trl-gpufit"):
            return self._trl_loss(on_gpufit=name == "trl-gpufit")
        if name == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            return self._on_hidden(lambda x, w, t: liger(w, x, t))
        raise ValueError(name)

    def _trl_loss(self, on_gpufit: bool):
        import contextlib

        from trl.trainer.utils import add_fused_lm_head

        import gpufit.trl

        if self.trl_model is None:
            self.trl_model = copy.deepcopy(self.stock)
            add_fused_lm_head(self.trl_model, outputs=TRL_OUTPUTS)

        def run():
            with gpufit.trl.use_gpufit() if on_gpufit else contextlib.nullcontext():
                out = self.trl_model(input_ids=self.ids, labels=self.labels, fused_lm_head=True)
            return out.loss

        return run

    def _on_hidden(self, loss):
        def run():
            hidden = self.stock.model(input_ids=self.ids).last_hidden_state
            x = hidden.reshape(-1, hidden.shape[-1])
            return loss(x, self.stock.lm_head.weight, self.shift_labels)

        return run

    def zero_grad(self) -> None:
        for model in (self.stock, self.fused, self.trl_model):
            if model is not None:
                model.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def step(self, fn) -> float:
        self.zero_grad()
        loss = fn()
        loss.backward()
        return float(loss.detach().float())

    def seconds(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        self.step(fn)
        self.sync()
        return time.perf_counter() - start

    def head_gemms(self) -> float:
        """Seconds of the head's three GEMMs alone, on hidden states of the batch's shape."""
        torch = self.torch
        w = self.stock.lm_head.weight.detach()
        x = torch.randn(self.ids.numel(), w.shape[1], device=w.device, dtype=w.dtype)
        self.sync()
        start = time.perf_counter()
        z = x @ w.t()
        torch.mm(z, w)
        torch.mm(z.t(), x)
        self.sync()
        return time.perf_counter() - start

    def peak_bytes(self, fn) -> int:
        self.zero_grad()
        from benchmarks.memory import peak_bytes

        return peak_bytes(self.device, self.step, fn)


OPTIONAL = {
    "cce": "cut_cross_entropy",
    "liger": "liger_kernel",
    "trl": "trl",
    "trl-gpufit": "trl",
}  # variant -> its package


def _installed(variant: str) -> bool:
    import importlib.util

    package = OPTIONAL.get(variant)
    if package is None or importlib.util.find_spec(package) is not None:
        return True
    print(f"{package} is not installed: skipping {variant}")
    return False


def measure_memory(args, dtype) -> dict:
    """In this (fresh) process: one variant's loss after a warm-up step, and its peak."""
    shape = QUICK_SHAPE if args.quick else SHAPE
    work = Workload(args.device, dtype, args.vocab[0], shape, args.family)
    fn = work.loss_fn(args.memory_of)
    loss = work.step(fn)  # warm-up: torch.compile, allocator pools
    return {"loss": loss, "peak_bytes": work.peak_bytes(fn)}


def memory_in_fresh_process(args, variant: str, vocab: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.lm_head",
        "--device",
        args.device,
        "--vocab",
        str(vocab),
        "--memory-of",
        variant,
        "--family",
        args.family,
    ] + ["--quick"] * args.quick
    done = subprocess.run(command, capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


FLOOR = "head gemm floor"


def time_variants(work: Workload, names, rounds: int, progress) -> dict:
    """Median seconds of each variant's step and of the head's GEMM floor (FLOOR)."""
    fns = {name: work.loss_fn(name) for name in names}
    for fn in fns.values():  # warm-up
        work.step(fn)
    work.head_gemms()
    order = [*names, FLOOR]
    times = {name: [] for name in order}
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            seconds = work.head_gemms() if name == FLOOR else work.seconds(fns[name])
            times[name].append(seconds)
        progress(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{name} {ts[-1] * 1e3:.0f} ms" for name, ts in times.items()))  # fmt: skip
    return {name: statistics.median(ts) for name, ts in times.items()}


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["peak_bytes"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    width = 0.8 / len(names)
    labels = [f"V={r['vocab']}" for r in rows]
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        axes[0].bar(xs, [r["peak_bytes"][name] / MIB for r in rows], width, label=name)
        axes[1].bar(xs, [r["seconds"][name] * 1e3 for r in rows], width, label=name)
    floors = [r["seconds"][FLOOR] * 1e3 for r in rows]
    axes[1].scatter(range(len(rows)), floors, marker="_", s=900, color="black", label=FLOOR)
    for ax, what in zip(axes, ("peak extra memory, MiB", "step time, ms"), strict=True):
        ax.set_xticks(range(len(rows)), labels)
        ax.set_ylabel(f"{what} (lower is better)")
        ax.legend(fontsize=8)
    r = rows[0]
    fig.suptitle(f"tiny {r['family']} training step, batch {r['batch']} x {r['tokens']}, "
                 f"{r['device']} {r['dtype']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama",
                        help="the family of the tiny random-init model")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: batch 2 x 64, vocabulary 32000, 1 round")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    parser.add_argument(
        "--memory-of", choices=sorted(set(VARIANTS["cuda"])), help=argparse.SUPPRESS
    )  # internal: one variant's memory, JSON out
    args = parser.parse_args(argv)

    import torch  # after parsing: --help answers without loading torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    dtype_name = "bfloat16" if args.device == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    if args.memory_of:
        print(json.dumps(measure_memory(args, dtype)))
        return 0

    from benchmarks import report as report_out

    names = [name for name in VARIANTS[args.device] if _installed(name)]
    vocabs = [32000] if args.quick else args.vocab
    rounds = 1 if args.quick else args.rounds
    shape = QUICK_SHAPE if args.quick else SHAPE
    load_before = os.getloadavg()
    print(f"load average {load_before[0]:.2f}; vocab {vocabs} x {len(names)} variants, "
          f"{rounds} rounds, {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    rows = []
    for vocab in vocabs:
        label = f"V={vocab} {dtype_name} on {args.device}"
        memory = {}
        for name in names:
            memory[name] = memory_in_fresh_process(args, name, vocab)
            print(f"{label}: {name} peak {memory[name]['peak_bytes'] / MIB:.1f} MiB", flush=True)
        work = Workload(args.device, dtype, vocab, shape, args.family)
        progress = lambda text, label=label: print(f"{label}: {text}", flush=True)  # noqa: E731
        seconds = time_variants(work, names, rounds, progress)
        del work
        peak = {n: m["peak_bytes"] for n, m in memory.items()}
        rows.append({
            "device": args.device, "dtype": dtype_name, "vocab": vocab, **shape,
            "family": args.family,
            "seconds": seconds, "peak_bytes": peak,
            "loss": {n: m["loss"] for n, m in memory.items()},
            "memory_vs_stock": {n: peak[n] / peak["stock"] for n in peak},
            "time_vs_stock": {n: seconds[n] / seconds["stock"] for n in seconds},
            "time_vs_cce": {n: seconds[n] / seconds["cce"] for n in seconds}
            if "cce" in seconds else {},
            "time_vs_trl": {n: seconds[n] / seconds["trl"] for n in seconds}
            if "trl" in seconds else {},
        })  # fmt: skip
    load_after = os.getloadavg()
    for row in rows:
        print(f"V={row['vocab']} {dtype_name} on {args.device}, batch {row['batch']} x "
              f"{row['tokens']}:")  # fmt: skip
        for name in row["peak_bytes"]:
            print(f"  {name:>13}  peak {row['peak_bytes'][name] / MIB:8.1f} MiB "
                  f"({row['memory_vs_stock'][name]:5.2f}x)  step "
                  f"{row['seconds'][name] * 1e3:8.1f} ms ({row['time_vs_stock'][name]:5.2f}x)"
                  f"  loss {row['loss'][name]:.5f}")  # fmt: skip
        print(f"  {FLOOR:>13}  the head's 3 GEMMs alone: {row['seconds'][FLOOR] * 1e3:.1f} ms"
              + "".join(f"; {n} {row['time_vs_cce'][n]:.2f}x cce" for n in row["time_vs_cce"]
                        if n not in (FLOOR, "cce"))
              + "".join(f"; {n} {row['time_vs_trl'][n]:.2f}x trl" for n in row["time_vs_trl"]
                        if n.startswith("trl-")))  # fmt: skip
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    report = {
        "benchmark": "lm_head",
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "load_average": {"before": load_before, "after": load_after},
        "rows": rows,
    }
    family = "" if args.family == "llama" else f"_{args.family}"
    stem = args.out / f"lm_head{family}_{args.device}_{dtype_name}{'_quick' * args.quick}"
    report_out.write(stem, report, lambda p: plot(rows, p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
