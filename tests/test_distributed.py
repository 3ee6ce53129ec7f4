"""gpufit.fuse under distributed engines, on 2 CPU ranks over gloo: each engine's cases run in
one spawned pair of processes (importing transformers in each child is most of the ~20 s).

Every rank trains a tiny Llama on its own data; the reference is an unfused copy with the stock
transformers loss on the same data, its gradients all-reduced (averaged) across the ranks. Each
case compares the loss on each rank and every parameter after one SGD step (lr 1: the update is
the averaged gradient) with the reference. Workers write a JSON report per rank and end with
barrier, destroy_process_group and os._exit (a worker that returns normally sometimes aborts in
gloo's teardown after correct results).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
VOCAB = 96
WORLD = 2
LR = 1.0
LOSS_REL = 1e-5
PARAM_ATOL = 1e-5  # after a step of lr 1: the update is the gradient itself
BF16_REL = 2e-2


def tiny_llama(tied: bool, seed: int = 0, family: str = "Llama", vocab: int = VOCAB):
    """A tiny random-init Llama (or Gemma2: its softcap, folded into the fused op, bends the
    logits)."""
    import transformers

    torch.manual_seed(seed)
    extra = {"head_dim": 8, "final_logit_softcapping": 0.05, "sliding_window": 8}
    config = getattr(transformers, f"{family}Config")(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied,
        **(extra if family == "Gemma2" else {}),
    )  # fmt: skip
    return getattr(transformers, f"{family}ForCausalLM")(config).train()


def rank_batch(rank: int):
    """Different tokens on each rank, the first few positions of each row ignored."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, :5] = -100
    return ids, labels


def reference_step(model, ids, labels) -> tuple[float, dict]:
    """The unfused loss on this rank, and every parameter after one SGD step on the gradients
    averaged over the ranks (by name; a tied weight once)."""
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    after = {}
    for name, p in model.named_parameters():
        if p.grad is None:  # frozen
            after[name] = p.detach().clone()
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad)
        after[name] = (p.detach() - LR * grad / WORLD).clone()
    after["update"] = max((after[n] - p).abs().max().item() for n, p in model.named_parameters())
    return loss.item(), after


def compare(loss: float, ref_loss: float, params: dict, ref_params: dict) -> dict:
    """Figures of one case: the two losses, the largest parameter difference and update."""
    ref_params = dict(ref_params)
    update = ref_params.pop("update")
    assert params.keys() == ref_params.keys(), (sorted(params), sorted(ref_params))
    err = max((params[n] - ref_params[n]).abs().max().item() for n in ref_params)
    return {"loss": loss, "ref_loss": ref_loss, "param_err": err, "update": update,
            "params": len(ref_params)}  # fmt: skip


# ================================================================ DeepSpeed


def _ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": stage,
            # a tiny head would otherwise stay whole (persistence threshold 1e5 elements)
            "stage3_param_persistence_threshold": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
        },
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0
        "steps_per_print": 10**9,
    }


def _deepspeed_case(rank, stage, tied, how, fuse_first=True, family="Llama") -> dict:
    import deepspeed

    from gpufit import hf

    ids, labels = rank_batch(rank)
    ref = tiny_llama(tied, family=family)
    if family == "Llama" and how == "peft":  # LoRA on attention, the head trained in full
        import peft

        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                 modules_to_save=["lm_head"])  # fmt: skip
        ref = peft.get_peft_model(ref, config)
    model = copy.deepcopy(ref)
    ref_loss, ref_params = reference_step(ref, ids, labels)
    if fuse_first:
        hf.fuse(model)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        config=_ds_config(stage), dist_init_required=False,
    )  # fmt: skip
    if not fuse_first:
        hf.fuse(engine)  # the engine holds the model as .module
    lm = hf.causal_lm(engine.module)
    head = lm.lm_head
    partitioned = tuple(hf.head_linear(head).weight.shape) == (0,)
    if how in ("engine", "peft"):
        out = engine(input_ids=ids, labels=labels)
        loss, fused = out.loss, out.logits is None
    else:  # the model's body, then the loss outside any forward of the engine
        hidden = lm.model(input_ids=ids).last_hidden_state
        loss, fused = hf.causal_lm_loss(hidden, head, labels), True
    engine.backward(loss)
    engine.step()
    named = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(named.values())):
        params = {n: p.detach().clone() for n, p in named.items()}
    figures = compare(loss.item(), ref_loss, params, ref_params)
    figures.update(partitioned=partitioned, fused=fused)
    engine.destroy()
    return figures


def deepspeed_cases(rank: int) -> dict:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    cases = {}
    for stage, tied, how, fuse_first in [
        (3, False, "engine", True),
        (3, True, "engine", False),
        (3, False, "outside", True),
        (3, True, "outside", True),
        (2, False, "engine", False),
        (1, True, "engine", True),
    ]:
        name = f"zero{stage}-{'tied' if tied else 'untied'}-{how}"
        name += "-fuse-first" if fuse_first else "-fuse-after"
        cases[name] = _deepspeed_case(rank, stage, tied, how, fuse_first)
    # PEFT's modules_to_save wrapper around the head: its trained copy is gathered and fused
    cases["zero3-peft-modules-to-save"] = _deepspeed_case(rank, 3, False, "peft")
    # ZeRO-3 hands the head's output on detached; the softcap's operations still find it
    cases["zero3-gemma2-softcap-engine"] = _deepspeed_case(rank, 3, True, "engine",
                                                           family="Gemma2")  # fmt: skip
    cases["lm-deepspeed-losses"] = _lm_deepspeed_losses(rank)
    return cases


def _lm_deepspeed_losses(rank: int) -> list[float]:
    """``gpufit lm --deepspeed docs/deepspeed_zero3.json`` on this rank (RANK and WORLD_SIZE
    set, as torchrun sets them): the step losses of the whole batch."""
    from gpufit.examples import lm
    from gpufit.examples.lm_config import LMConfig

    text = Path(os.environ["GPUFIT_TEST_OUT"], f"text{rank}.txt")
    text.write_text(LM_TEXT, encoding="utf-8")
    config = str(REPO / "docs" / "deepspeed_zero3.json")
    return lm.train(LMConfig(text=str(text), deepspeed=config, **LM_ARGS))["losses"]


# ================================================================ FSDP2 (fully_shard)


def _fsdp2_case(rank, mesh, layout: str, tied=False, fuse_first=False, bf16=False) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from gpufit import hf

    ids, labels = rank_batch(rank)
    ref = tiny_llama(tied)
    model = copy.deepcopy(ref)
    ref_loss, ref_params = reference_step(ref, ids, labels)
    options = {"mesh": mesh}
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if fuse_first:
        hf.fuse(model)
    for layer in model.model.layers:
        fully_shard(layer, **options)
    if layout == "own":
        fully_shard(model.lm_head, **options)
    elif layout == "tail":  # accelerate's grouping of the last modules (a tied weight's too)
        tail = [model.model.embed_tokens] if tied else []
        tail += [model.model.norm, model.lm_head]
        fully_shard(tail, reshard_after_forward=False, **options)
    fully_shard(model, **options)
    if not fuse_first:
        hf.fuse(model)
    sharded = isinstance(model.lm_head.weight, DTensor)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    params = {
        n: (p.full_tensor() - LR * p.grad.full_tensor()).detach()
        for n, p in model.named_parameters()
    }  # fmt: skip
    figures = compare(out.loss.item(), ref_loss, params, ref_params)
    figures.update(partitioned=sharded, fused=out.logits is None, cls=type(model).__name__)
    return figures


def fsdp2_cases(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    return {
        "root": _fsdp2_case(rank, mesh, "root"),
        "own-unit-fuse-first": _fsdp2_case(rank, mesh, "own", fuse_first=True),
        "tail": _fsdp2_case(rank, mesh, "tail"),
        "tied-fuse-first": _fsdp2_case(rank, mesh, "root", tied=True, fuse_first=True),
        "tied-tail": _fsdp2_case(rank, mesh, "tail", tied=True),
        "bf16-own-unit": _fsdp2_case(rank, mesh, "own", bf16=True),
    }


# ================================================================ FSDP1


def _fsdp1_case(rank: int, use_orig_params: bool, fuse_first: bool, own_unit=True) -> dict:
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from gpufit import hf

    ids, labels = rank_batch(rank)
    ref = tiny_llama(tied=False)
    model = copy.deepcopy(ref)
    ref_loss, ref_params = reference_step(ref, ids, labels)
    if fuse_first:
        hf.fuse(model)
    head = model.lm_head
    policy = functools.partial(
        lambda_auto_wrap_policy,
        lambda_fn=lambda m: (own_unit and m is head) or isinstance(m, LlamaDecoderLayer),
    )  # fmt: skip
    wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=use_orig_params,
                   device_id=torch.device("cpu"))  # fmt: skip
    if not fuse_first:
        hf.fuse(wrapped)
    in_own_unit = type(model.lm_head).__name__ == "FullyShardedDataParallel"
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR)
    out = wrapped(input_ids=ids, labels=labels)
    out.loss.backward()
    optimizer.step()
    with FSDP.summon_full_params(wrapped):
        params = {
            n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
            for n, p in wrapped.named_parameters()
        }  # fmt: skip
    figures = compare(out.loss.item(), ref_loss, params, ref_params)
    figures.update(partitioned=in_own_unit, fused=out.logits is None)
    return figures


def fsdp1_cases(rank: int) -> dict:
    return {
        "own-unit-orig-params": _fsdp1_case(rank, use_orig_params=True, fuse_first=False),
        "own-unit-flat-params-fuse-first": _fsdp1_case(
            rank, use_orig_params=False, fuse_first=True
        ),  # fmt: skip
        # the usual transformer-layer wrap: the head in the root unit
        "root-unit-flat-params": _fsdp1_case(
            rank, use_orig_params=False, fuse_first=False, own_unit=False
        ),  # fmt: skip
    }


# ================================================================ tensor parallel (vocab-sharded)

TP_VOCAB = 97  # uneven over 2 ranks: rows 0-48 and 49-96


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def _tp_model_case(rank, mesh, style: str, how="engine", family="Llama", dtype=None) -> dict:
    """A tiny causal LM whose lm_head is ColwiseParallel over the 2 ranks (the same batch on
    both, as tensor parallelism has it), fused, against the unsharded unfused model."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from gpufit import hf

    ids, labels = rank_batch(0)
    ref = tiny_llama(tied=False, family=family, vocab=TP_VOCAB)
    if dtype is not None:
        ref = ref.to(dtype)
    model = copy.deepcopy(ref)
    ref_loss, ref_params = reference_step(ref, ids, labels)
    # torch's default keeps the logits vocabulary-sharded (for loss_parallel); transformers'
    # own plan for Llama's head ("colwise_gather_output") gathers them
    layout = {"default": ColwiseParallel(), "gather": ColwiseParallel(output_layouts=Replicate())}
    parallelize_module(model.lm_head, mesh, layout[style])
    hf.fuse(model)
    if how == "engine":
        out = model(input_ids=ids, labels=labels)
        loss, fused = out.loss, out.logits is None
    else:  # the model's body, then the loss outside its forward
        hidden = model.model(input_ids=ids).last_hidden_state
        loss, fused = hf.causal_lm_loss(hidden, model.lm_head, labels), True
    loss.backward()
    params = {n: (_full(p) - LR * _full(p.grad)).detach() for n, p in model.named_parameters()}
    figures = compare(loss.item(), ref_loss, params, ref_params)
    shard = model.lm_head.weight.to_local().shape[0]
    figures.update(partitioned=shard < TP_VOCAB, fused=fused, shard=shard)
    return figures


def _tp_linear_case(rank, mesh, dtype, **options) -> dict:
    """A Linear (bias too) ColwiseParallel over the 2 ranks, its loss through causal_lm_loss
    (targets given already shifted; every fifth ignored), against F.cross_entropy of the whole
    logits in fp64 from the same (rounded) inputs: the loss, x's gradient and each rank's
    rows of the weight's and bias's gradients."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from gpufit import hf

    g = torch.Generator().manual_seed(7)
    n, hidden = 24, 16
    x = torch.randn(1, n, hidden, generator=g).to(dtype)
    target = torch.randint(0, TP_VOCAB, (1, n), generator=g)
    target[0, ::5] = -100
    head = torch.nn.Linear(hidden, TP_VOCAB).to(dtype)
    ref_head = copy.deepcopy(head).double()
    x_ref = x.detach().double().requires_grad_()
    logits = ref_head(x_ref)
    if options.get("softcap"):
        logits = options["softcap"] * torch.tanh(logits / options["softcap"])
    ref = torch.nn.functional.cross_entropy(logits[0], target[0], reduction="sum")
    ref = ref / options.get("num_items_in_batch", (target != -100).sum())
    ref.backward()
    parallelize_module(head, mesh, ColwiseParallel())
    x_tp = x.detach().requires_grad_()
    loss = hf.causal_lm_loss(x_tp, head, None, shift_labels=target, **options)
    loss.backward()
    start = 0 if rank == 0 else TP_VOCAB - head.weight.to_local().shape[0]
    rows = slice(start, start + head.weight.to_local().shape[0])
    pairs = {
        "x": (x_tp.grad, x_ref.grad),
        "weight": (head.weight.grad.to_local(), ref_head.weight.grad[rows]),
        "bias": (head.bias.grad.to_local(), ref_head.bias.grad[rows]),
    }
    errors = {k: (got.double() - want).abs().max().item() for k, (got, want) in pairs.items()}
    scale = max(x_ref.grad.abs().max().item(), ref_head.weight.grad.abs().max().item())
    return {"loss": loss.item(), "ref_loss": ref.item(), "grad_err": max(errors.values()),
            "grad_scale": scale, "errors": errors, "dtype": str(dtype)}  # fmt: skip


def _tp_refusals(rank, mesh) -> dict:
    """Layouts the fused loss does not take, each refused with its reason in the head's call."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    from gpufit import hf

    def refusal(head, x) -> str:
        try:
            hf.causal_lm_loss(x, head, torch.randint(0, TP_VOCAB, (1, 6)))
        except hf.UnsupportedModelError as error:
            return str(error)
        return "not refused"

    def linear():
        torch.manual_seed(0)
        return torch.nn.Linear(16, TP_VOCAB, bias=False)

    x = torch.randn(1, 6, 16)
    rowwise = parallelize_module(linear(), mesh, RowwiseParallel())
    replicated = distribute_module(linear(), mesh)  # every parameter Replicate
    bare = linear()  # a Shard(0) weight put there by hand, no input hook: x stays plain
    bare.weight = torch.nn.Parameter(distribute_tensor(bare.weight.detach(), mesh, [Shard(0)]))
    mesh_2d = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
    two_d = linear()
    two_d.weight = torch.nn.Parameter(
        distribute_tensor(two_d.weight.detach(), mesh_2d, [Replicate(), Shard(0)])
    )  # fmt: skip
    return {
        "hidden-sharded": refusal(rowwise, x),
        "replicated": refusal(replicated, x),
        "plain-input": refusal(bare, x),
        "2-d-mesh": refusal(two_d, x),
    }


def tensor_parallel_cases(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    return {
        "refusals": _tp_refusals(rank, mesh),
        "linear-fp32": _tp_linear_case(rank, mesh, torch.float32),
        "linear-fp32-softcap-num-items": _tp_linear_case(
            rank, mesh, torch.float32, softcap=3.0, num_items_in_batch=40
        ),  # fmt: skip
        "linear-bf16": _tp_linear_case(rank, mesh, torch.bfloat16),
        "model-default-layout": _tp_model_case(rank, mesh, "default"),
        "model-gather-layout": _tp_model_case(rank, mesh, "gather"),
        "model-outside-forward": _tp_model_case(rank, mesh, "default", how="outside"),
        "model-gemma2-softcap": _tp_model_case(rank, mesh, "gather", family="Gemma2"),
        "model-bf16": _tp_model_case(rank, mesh, "default", dtype=torch.bfloat16),
    }


# ================================================================ spawning


ENGINES = {
    "deepspeed": deepspeed_cases,
    "fsdp2": fsdp2_cases,
    "fsdp1": fsdp1_cases,
    "tensor_parallel": tensor_parallel_cases,
}


def _worker(rank: int, engine: str, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["GPUFIT_TEST_OUT"] = out_dir
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    torch.set_num_threads(1)
    status = 0
    try:
        report = ENGINES[engine](rank)
    except BaseException:
        report, status = {"error": traceback.format_exc()}, 1
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    if status == 0:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_ranks(engine: str, tmp_path: Path) -> list[dict]:
    """Both ranks' reports of ``engine``'s cases; a rank that failed fails the test with its
    traceback."""
    try:
        mp.start_processes(
            _worker, args=(engine, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
            start_method="spawn",
        )  # fmt: skip
    except Exception as error:
        tracebacks = [
            json.loads(p.read_text()).get("error", "")
            for p in sorted(tmp_path.glob("rank*.json"))
        ]  # fmt: skip
        pytest.fail(f"{error}\n" + "\n".join(t for t in tracebacks if t))
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def assert_matches(reports: list[dict]) -> None:
    """Every case on every rank: the fused loss ran, equal to the reference's (bf16 mixed
    precision against the fp32 reference: loosely)."""
    for rank, report in enumerate(reports):
        for case, f in report.items():
            where = f"rank {rank}, {case}: {f}"
            if "refusal" in f:
                continue
            loss_rel, param_atol = (BF16_REL, BF16_REL * f["update"]) if "bf16" in case else (
                LOSS_REL, PARAM_ATOL)  # fmt: skip
            assert f["fused"], where
            assert abs(f["loss"] - f["ref_loss"]) <= loss_rel * abs(f["ref_loss"]), where
            assert f["param_err"] <= param_atol, where
            assert f["update"] > 1e-3, where  # the step moved the parameters
            print(f"{where}")


@pytest.mark.slow
def test_deepspeed_zero3_and_zero2(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("deepspeed")
    pytest.importorskip("sentencepiece")
    pytest.importorskip("mistral_common")
    from gpufit.examples import lm
    from gpufit.examples.lm_config import LMConfig

    reports = run_ranks("deepspeed", tmp_path)
    # gpufit lm --deepspeed (ZeRO-3, docs/deepspeed_zero3.json): 2 ranks of 2 sequences each
    # train as one process on the 4
    (tmp_path / "text.txt").write_text(LM_TEXT, encoding="utf-8")
    one = lm.train(LMConfig(text=str(tmp_path / "text.txt"), **LM_ARGS))["losses"]
    for rank, report in enumerate(reports):
        two = report.pop("lm-deepspeed-losses")
        diff = max(abs(a - b) for a, b in zip(one, two, strict=True))
        print(f"rank {rank}, lm --deepspeed: losses {two} vs one process {one}, diff {diff:.2e}")
        assert one[0] - one[-1] > 0.05 and diff <= 1e-5 * max(one), (one, two)
    assert_matches(reports)
    for report in reports:
        assert len(report) == 8
        for case, f in report.items():
            # a ZeRO-3 head that stayed whole would prove nothing about gathering it
            assert f["partitioned"] == case.startswith("zero3"), case


@pytest.mark.slow
def test_fsdp2_fully_shard(tmp_path):
    pytest.importorskip("transformers")
    reports = run_ranks("fsdp2", tmp_path)
    assert_matches(reports)
    for report in reports:
        assert len(report) == 6
        for case, f in report.items():
            assert f["fused"] and f["partitioned"], case
            assert f["cls"] == "FSDPLlamaForCausalLM", case


@pytest.mark.slow
def test_fsdp1_head_in_its_own_unit_and_in_the_root_unit(tmp_path):
    pytest.importorskip("transformers")
    reports = run_ranks("fsdp1", tmp_path)
    assert_matches(reports)
    for report in reports:
        assert len(report) == 3
        for case, f in report.items():
            assert f["fused"] and f["partitioned"] == case.startswith("own-unit"), case


@pytest.mark.slow
def test_tensor_parallel_vocabulary_sharded_head(tmp_path):
    pytest.importorskip("transformers")
    reports = run_ranks("tensor_parallel", tmp_path)
    for rank, report in enumerate(reports):
        refusals = report.pop("refusals")
        assert "DTensor (Shard(dim=1))" in refusals["hidden-sharded"], refusals
        assert "DTensor (Replicate())" in refusals["replicated"], refusals
        assert "its input is a plain tensor" in refusals["plain-input"], refusals
        assert "over a 2-D mesh" in refusals["2-d-mesh"], refusals
        for case in [c for c in report if c.startswith("linear")]:
            f = report.pop(case)
            tol = BF16_REL if "bf16" in case else LOSS_REL
            where = f"rank {rank}, {case}: {f}"
            assert abs(f["loss"] - f["ref_loss"]) <= tol * abs(f["ref_loss"]), where
            assert f["grad_err"] <= tol * f["grad_scale"], where
            print(where)
        assert len(report) == 5
        for case, f in report.items():
            assert f["partitioned"] and f["shard"] == (49, 48)[rank], case
    assert_matches(reports)


# ================================================================ gpufit lm --fsdp under torchrun

LM_TEXT = (
    "The quick brown fox jumps over the lazy dog while the dog sleeps in the afternoon sun; "
    "a fox is quick and a dog is lazy, and both of them like the warm sun. "
) * 12
LM_ARGS = dict(model="tiny", steps=4, batch_size=4, seq_len=16, lr=1e-3, device="cpu",
               threads=1, quiet=True)  # fmt: skip


TORCHRUN_LINE = "torchrun --standalone --nproc_per_node=2 -m gpufit.examples.lm --fsdp"


def readme_torchrun_argv() -> list[str]:
    """The arguments of the README's ``torchrun ... -m gpufit.examples.lm --fsdp`` line."""
    import shlex

    lines = [line for line in (REPO / "README.md").read_text().splitlines()
             if line.startswith(TORCHRUN_LINE)]  # fmt: skip
    assert len(lines) == 1, f"README.md shows {len(lines)} lines starting {TORCHRUN_LINE!r}"
    return shlex.split(lines[0].split("  #")[0])[len(TORCHRUN_LINE.split()) :]


@pytest.mark.slow
def test_readme_lm_fsdp_line_equals_one_process(tmp_path):
    """The README's ``torchrun --nproc_per_node=2 -m gpufit.examples.lm --fsdp ...`` (its
    --out put in a temporary folder): 2 ranks, each on half of every batch, train the same
    steps as one process on the whole batches (every sequence has as many targets, so the mean
    of the ranks' mean losses is the batch's), to fp32 tolerance."""
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    pytest.importorskip("mistral_common")
    from gpufit.examples import lm

    argv = readme_torchrun_argv()
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", *TORCHRUN_LINE.split()[1:], *argv]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("lm: loss") == 1, proc.stdout  # rank 0 alone reports
    assert "FSDP2 over 2 ranks" in proc.stdout, proc.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["summary"]["world_size"] == 2
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    one_process = lm.build_parser().parse_args([a for a in argv if a not in ("--fsdp", "--out",
                                                str(tmp_path / "out"))])  # fmt: skip
    one_process.text = str(REPO / one_process.text)
    from gpufit.examples.lm_config import config_from_args

    cfg = config_from_args(one_process)
    result = lm.train(cfg)
    one, two = result["losses"], metrics["losses"]
    assert len(two) == len(one) >= 3
    # The steps trained (later losses depend on them): the first batch's loss is lower after
    # them than before (one[0]). The same batch on both sides: the text is the README, whose
    # batches' losses differ from one another by more than a few steps' drop.
    tokens = torch.tensor(lm.load_tokenizer(cfg).encode(lm.read_text(cfg.text)[0]))
    first = lm.TokenBatches(tokens, cfg.batch_size, cfg.seq_len, cfg.seed).batch(0)
    with torch.no_grad():
        after = result["model"](input_ids=first, labels=first).loss.item()
    assert after < one[0], (after, one)
    diff = max(abs(a - b) for a, b in zip(one, two, strict=True))
    print(f"lm --fsdp, 2 ranks vs 1 process: losses {two} vs {one}, max diff {diff:.2e}; "
          f"first batch after training {after:.4f}")  # fmt: skip
    assert diff <= 1e-5 * max(one), (one, two)


def test_lm_engine_flags_refuse_bad_launches_and_configs(tmp_path, monkeypatch, capsys):
    """Each a one-line error, exit 2, before any process group or model: --fsdp or
    --deepspeed without torchrun, torchrun without either, both, --resume, a batch that does
    not divide among the ranks, and a DeepSpeed config that is no JSON object, has its own
    optimizer or other batch sizes."""
    from gpufit.__main__ import main

    text = tmp_path / "text.txt"
    text.write_text(LM_TEXT, encoding="utf-8")
    configs = {"broken": "{", "list": "[1]", "optimizer": '{"optimizer": {"type": "Adam"}}',
               "sizes": '{"train_micro_batch_size_per_gpu": 3}'}  # fmt: skip
    for name, body in configs.items():
        (tmp_path / f"{name}.json").write_text(body)

    def error(*argv) -> str:
        assert main(["lm", "--text", str(text), "--steps", "1", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert "--fsdp: launch with torchrun" in error("--fsdp")
    assert "--deepspeed: launch with torchrun" in error("--deepspeed", str(tmp_path / "x.json"))
    monkeypatch.setenv("RANK", "0")  # as torchrun starts a rank of 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "launched by torchrun without --fsdp or --deepspeed" in error()
    assert "choose one engine" in error("--fsdp", "--deepspeed", str(tmp_path / "x.json"))
    assert "--resume is not supported yet" in error("--fsdp", "--resume", str(text))
    assert "give a multiple of 2" in error("--fsdp", "--batch-size", "3")
    assert "no such file" in error("--deepspeed", str(tmp_path / "x.json"))
    assert "not a JSON file" in error("--deepspeed", str(tmp_path / "broken.json"))
    assert "not a JSON object" in error("--deepspeed", str(tmp_path / "list.json"))
    assert "has an 'optimizer' section" in error("--deepspeed", str(tmp_path / "optimizer.json"))
    err = error("--deepspeed", str(tmp_path / "sizes.json"), "--batch-size", "4")
    assert "train_micro_batch_size_per_gpu is 3, but this run has 2" in err, err
