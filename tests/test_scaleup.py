"""Scale-out made real: gradient checkpointing, 16-bit weights with fp32 masters, the attention
kernel, and the memory command whose options are run-config fields and whose emitted launch runs."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from scalebio_core.core.masters import MasterOptimizer
from scalebio_core.errors import ConfigError, ModelError
from scalebio_core.plan.memory import PLAN_FIELDS, MemorySetup, model_shape, plan, predict
from scalebio_core.train.config import TrainConfig, load_preset
from scalebio_core.train.models import load_model
from scalebio_core.train.recompute import checkpoint_blocks, recomputes
from scalebio_core.train.runs import load_trajectory, read_jsonl
from scalebio_core.train.trainer import train

ROOT = Path(__file__).resolve().parent.parent
SMALL = {
    "corpus_args": {"n_per_source": 16, "n_val": 8, "noise_rates": [0.0, 0.5, 1.0]},
    "model": "embedded:nano",
    "steps": 4,
    "batch_size": 6,
    "val_batch_size": 4,
    "max_length": 80,
    "lr_w": 1e-3,
    "lr_u": 1e-3,
    "lr_lam": 0.1,
    "checkpoint_every": 2,
}


def _run(out: Path, **extra) -> dict:
    cfg = TrainConfig.from_dict(load_preset("noisy", "smoke", {**SMALL, **extra}))
    train(cfg.replace(out_dir=str(out)), progress=False)
    return load_trajectory(out)


def _batch(n: int = 3, t: int = 12) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2048, (n, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _grads(model, train_mode: bool) -> dict[str, torch.Tensor]:
    from scalebio_core.train.losses import per_sample_loss

    model.train(train_mode)
    model.zero_grad(set_to_none=True)
    per_sample_loss(model, _batch()).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("train_mode", [True, False])
def test_checkpointing_recomputes_every_block_and_keeps_every_gradient(train_mode):
    """LISA's hard case: embeddings and the top block frozen, the bottom block trains, so the
    gradient must cross a frozen block; in eval mode too (ScaleBiO's validation loss)."""
    plain, ckpt = load_model("embedded:nano"), load_model("embedded:nano")
    assert checkpoint_blocks(ckpt) == 2 and recomputes(ckpt) and not recomputes(plain)
    for m in (plain, ckpt):
        for n, p in m.named_parameters():
            p.requires_grad_(n.startswith("transformer.h.0."))
    calls = []
    ckpt.transformer.h[1].attn.register_forward_hook(lambda *_: calls.append(1))
    a, b = _grads(plain, train_mode), _grads(ckpt, train_mode)
    assert len(calls) == 2  # forward, then the replay inside backward
    assert a.keys() == b.keys() and a and all(k.startswith("transformer.h.0.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    with torch.no_grad():  # no graph, no replay
        ckpt(input_ids=_batch()["input_ids"], use_cache=False)
    assert len(calls) == 3
    assert type(ckpt.transformer.h[0]).__name__ == "GPT2Block"  # the same class name (FSDP)


def test_a_run_with_gradient_checkpointing_builds_recomputing_copies():
    from scalebio_core.train.build import setup

    cfg = TrainConfig.from_dict(load_preset("noisy", "smoke", SMALL))
    for lora in (0, 4):
        s = setup(cfg.replace(gradient_checkpointing=True, lora_rank=lora))
        assert recomputes(s.state.w) and recomputes(s.state.u) and s.state.w is not s.state.u
        assert not recomputes(setup(cfg.replace(lora_rank=lora)).state.w)


def test_the_chunked_head_loss_equals_the_whole_one():
    """Under checkpointing the LM head's loss runs a few positions at a time, replayed in
    backward: the same per-sample losses and gradients as in one piece."""
    from scalebio_core.train.losses import head_chunk, response_only_loss

    assert head_chunk(50257) == 333 and head_chunk(2048) == 8192 and head_chunk(10**9) == 64
    model, batch = load_model("embedded:nano"), _batch(n=3, t=20)
    out = {}
    for chunk in (None, 5):
        model.zero_grad()
        loss = response_only_loss(model, batch, chunk)
        loss.sum().backward()
        out[chunk] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(out[5][0], out[None][0])
    for n, g in out[None][1].items():
        torch.testing.assert_close(out[5][1][n], g, msg=n)


def test_the_replay_runs_in_the_mode_of_the_forward(tmp_path):
    """A hub GPT-2 keeps dropout 0.1: ScaleBiO's validation loss is computed in eval mode and
    differentiated after train() again; the replay must not switch dropout on. In train mode
    the replay draws the forward's dropout masks."""
    from scalebio_core.train.losses import per_sample_loss
    from scalebio_core.train.models import save_tiny_model

    path = save_tiny_model("gpt2", tmp_path / "gpt2")
    plain, ckpt = load_model(str(path)), load_model(str(path))
    assert plain.config.resid_pdrop > 0
    checkpoint_blocks(ckpt)
    batch = _batch(t=16)
    for model in (plain, ckpt):
        model.eval()
        loss = per_sample_loss(model, batch).mean()
        model.train()
        loss.backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)
    for model in (plain, ckpt):
        model.zero_grad()
        torch.manual_seed(3)
        per_sample_loss(model.train(), batch).mean().backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [{}, {"lisa_active": 1, "lisa_interval": 2, "lisa_train_embeddings": False}, {"lora_rank": 4}],
    ids=["full", "lisa", "lora"],
)
def test_checkpointed_trajectory_equals_the_plain_one(tmp_path, extra):
    a = _run(tmp_path / "plain", **extra)
    b = _run(tmp_path / "ckpt", gradient_checkpointing=True, **extra)
    assert not np.allclose(a["p"][-1], a["p"][0])  # the weights moved
    np.testing.assert_allclose(b["p"], a["p"], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b["L1"], a["L1"], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_lora_on_one_shared_base_follows_the_two_copy_run_and_resumes(tmp_path, ckpt):
    """u and w as two adapters on one base (the default) against two whole PEFT models: the
    same trajectory, the base held once, two adapters that move apart; a crash after step 2
    resumes on the same trajectory from a checkpoint that holds the adapters only."""
    from scalebio_core.train.build import setup
    from scalebio_core.train.lora import AdapterView, unique_parameters

    lora = {
        "lora_rank": 4,
        "lr_w": 1e-2,
        "lr_u": 1e-2,
        "lr_lam": 1.0,
        "gradient_checkpointing": ckpt,
    }
    a = _run(tmp_path / "copies", lora_base="copies", **lora)
    b = _run(tmp_path / "shared", **lora)
    assert abs(a["p"][-1] - a["p"][0]).max() > 1e-3  # the weights moved
    for key in ("p", "L1", "L2_w", "L2_u"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-9)

    ckpt_b = torch.load(tmp_path / "shared" / "checkpoints" / "last.pt", weights_only=False)
    assert all(".lora_" in n for n in [*ckpt_b["w"], *ckpt_b["u"]])  # adapters only
    moved = [
        not torch.equal(ckpt_b["w"][n], ckpt_b["u"][n.replace(".w.", ".u.")]) for n in ckpt_b["w"]
    ]
    assert any(moved)  # u and w trained apart

    cfg = TrainConfig.from_dict(load_preset("noisy", "smoke", {**SMALL, **lora}))
    two, one = setup(cfg.replace(lora_base="copies")).state, setup(cfg).state
    assert isinstance(one.w, AdapterView) and one.w.shared is one.u.shared
    base = sum(q.numel() for q in unique_parameters(two.w) if not q.requires_grad)
    adapters = sum(q.numel() for q in one.w.parameters())
    assert adapters and all(q.requires_grad for q in one.w.parameters())
    assert sum(q.numel() for q in unique_parameters(two.w, two.u)) == 2 * (base + adapters)
    assert sum(q.numel() for q in unique_parameters(one.w, one.u)) == base + 2 * adapters

    class Crash(Exception):
        pass

    def crash(row, s):
        if row["step"] == 2:
            raise Crash

    cut = cfg.replace(out_dir=str(tmp_path / "cut"))
    with pytest.raises(Crash):
        train(cut, progress=False, callback=crash)
    train(cut, resume=True, progress=False)
    c = load_trajectory(tmp_path / "cut")
    np.testing.assert_allclose(c["p"], b["p"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(c["L1"], b["L1"], rtol=1e-6)


def test_master_optimizer_follows_torch_on_fp32_masters_and_resumes_in_fp32():
    """Fed the same (bf16-exact) gradients, the master equals torch's fp32 AdamW / SGD
    parameter; the bf16 weight is the master rounded; a state_dict round trip keeps fp32."""
    for kind, ref_cls, kw in (
        ("adamw", torch.optim.AdamW, {"betas": (0.9, 0.95), "weight_decay": 0.1}),
        ("sgd", torch.optim.SGD, {"momentum": 0.7, "weight_decay": 0.1}),
    ):
        start = torch.randn(5, 3).bfloat16()
        ref = start.float().clone().requires_grad_(True)
        half = start.clone().requires_grad_(True)
        ref_opt = ref_cls([ref], lr=1e-2, **kw)
        opt = MasterOptimizer([half], kind, lr=1e-2, **kw)
        for i in range(4):
            g = torch.randn(5, 3, generator=torch.Generator().manual_seed(i)).bfloat16()
            ref.grad, half.grad = g.float(), g.clone()
            ref_opt.step()
            opt.step()
        master = opt.state[half]["master"]
        assert master.dtype == torch.float32 and half.dtype == torch.bfloat16
        torch.testing.assert_close(master, ref.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(half.detach(), master.bfloat16())
        again = MasterOptimizer([half], kind, lr=1e-2, **kw)
        again.load_state_dict(opt.state_dict())
        st = again.state[half]
        assert {v.dtype for k, v in st.items() if k != "step"} == {torch.float32}
        assert torch.equal(st["master"], master)


@pytest.mark.slow
def test_bf16_weights_train_near_fp32_in_16_bit_tensors_and_resume_exactly(tmp_path):
    """bf16-weights: u and w hold bf16; the trajectory stays within 2% (L1) and 0.01 (p) of
    fp32 over the run (bf16 rounding of the weights); a crash after step 2 resumes on the same
    trajectory (the fp32 masters come back as fp32)."""
    lisa = {"lisa_active": 1, "lisa_interval": 2}
    a = _run(tmp_path / "fp32", **lisa)
    b = _run(tmp_path / "bf16w", precision="bf16-weights", **lisa)
    np.testing.assert_allclose(b["L1"], a["L1"], rtol=0.02)
    np.testing.assert_allclose(b["p"], a["p"], atol=0.01)
    assert not np.allclose(b["p"][-1], b["p"][0]) and not np.allclose(b["L1"], a["L1"], rtol=0)
    ckpt = torch.load(tmp_path / "bf16w" / "checkpoints" / "last.pt", weights_only=False)
    assert {v.dtype for v in ckpt["w"].values() if v.is_floating_point()} == {torch.bfloat16}
    masters = [st["master"] for st in ckpt["opt_w"]["state"].values()]
    assert masters and {m.dtype for m in masters} == {torch.float32}

    class Crash(Exception):
        pass

    def crash(row, s):
        if row["step"] == 2:
            raise Crash

    cfg = TrainConfig.from_dict(load_preset("noisy", "smoke", {**SMALL, **lisa}))
    cut = cfg.replace(precision="bf16-weights", out_dir=str(tmp_path / "cut"))
    with pytest.raises(Crash):
        train(cut, progress=False, callback=crash)
    train(cut, resume=True, progress=False)
    c = load_trajectory(tmp_path / "cut")
    np.testing.assert_allclose(c["p"], b["p"], rtol=1e-6)
    np.testing.assert_allclose(c["L1"], b["L1"], rtol=1e-6)


def test_attention_kernels_agree_and_flash_names_its_fix():
    batch = _batch()
    losses = {}
    for attn in ("sdpa", "eager"):
        m = load_model("embedded:nano", attn_implementation=attn).eval()
        assert m.config._attn_implementation == attn
        with torch.no_grad():
            out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        losses[attn] = out.logits
    torch.testing.assert_close(losses["sdpa"], losses["eager"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ModelError, match="flash-attn|CUDA GPUs only"):
        load_model("embedded:nano", attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="attn_implementation must be one of"):
        TrainConfig(attn_implementation="flash")
    shape = model_shape("meta-llama/Meta-Llama-3-8B")
    eager, sdpa = (
        predict(shape, MemorySetup(seq=4096, attn_implementation=a))["activations"]
        for a in ("eager", "sdpa")
    )
    assert eager > 2 * sdpa  # the attention matrix, s² per head, only under eager


def test_every_memory_option_is_a_run_config_field():
    """Beside the machine (--gpus, --gpu-mem, --host-mem, --headroom) and what it reads or
    writes (--config, --preset, --emit, --demo-data, --overwrite, --rehearse, --search,
    key=value), each option of `memory` sets the run-config field of its name."""
    from scalebio_core.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    memory = sub.choices["memory"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    machine = {"help", "config", "preset", "gpus", "gpu_mem", "emit", "search", "overrides"}
    machine |= {"host_mem", "headroom", "demo_data", "overwrite", "rehearse"}
    options = {a.dest: a.option_strings for a in memory._actions}
    assert set(PLAN_FIELDS) == set(options) - machine <= fields
    for dest, flags in options.items():
        if dest not in machine:
            assert "--" + dest.replace("_", "-") in flags
    args = parser.parse_args(["memory", "--lisa-active", "3", "--no-lisa-train-embeddings"])
    from scalebio_core.cli import memory_config

    cfg = memory_config(args, "gpt2")
    assert (cfg.lisa_active, cfg.lisa_train_embeddings, cfg.model) == (3, False, "gpt2")


def _memory(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m scalebio_core memory ARGS` in this process: (exit code, stdout, stderr)."""
    from scalebio_core.cli import main

    capsys.readouterr()
    try:
        code = main(["memory", *args])
    except SystemExit as e:  # argparse refuses an option
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_memory_refuses_what_the_trainer_refuses(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yi = ["--model", "01-ai/Yi-34B", "--gpus", "8", "--gpu-mem", "48"]
    flags = ["--lisa-active", "2", "--fsdp", "--fsdp-offload", "--gradient-checkpointing"]
    code, out, err = _memory(capsys, *yi, *flags)
    assert code == 0 and "verdict: fits" in out, err
    for args, message in (
        (["--lisa-active", "2", "--zero-stage", "3"], "LISA cannot run under DeepSpeed"),
        (["--lora-rank", "8", "--zero-stage", "3", "--precision", "bf16-weights"], "bf16-weights"),
        (["--lora-rank", "8", "--zero-stage", "3"], "Set lora_base: copies under DeepSpeed"),
        (["--lora-rank", "8", "--lisa-active", "2"], "LISA with LoRA on one shared base"),
        (["--gpus", "1", "--fsdp"], "fsdp: true needs several processes"),
        (["--batch-size", "12"], "multiples of processes"),
        (["--gpus", "0"], "--gpus must be >= 1"),
        (["--gpu-mem", "-1"], "--gpu-mem > 0"),
        (["--precision", "fp8"], "invalid choice"),
    ):
        code, out, err = _memory(capsys, *yi, *args)
        assert code == 2 and message in err, (args, err)
    cfg = TrainConfig(model="01-ai/Yi-34B", lisa_active=2, zero_stage=3, batch_size=8)
    with pytest.raises(ConfigError, match="LISA cannot run under DeepSpeed"):
        plan(cfg, 8, 48)


def test_the_plan_counts_how_the_trainer_builds_the_copies():
    """FSDP builds the copies sharded from one whole copy per node (rank 0's); DeepSpeed and
    DDP build both whole on every rank and GPU first, which the verdict counts (one model for
    LoRA on a shared base)."""
    common = {"model": "01-ai/Yi-34B", "batch_size": 8, "val_batch_size": 8, "max_length": 1024}
    fsdp = plan(TrainConfig(**common, lisa_active=2, fsdp=True, precision="bf16-weights"), 8, 48)
    params = fsdp.shape.params
    assert fsdp.load == {"gpu_load": 0.0, "host_load": 2 * params, "host": 0.0} and fsdp.fits
    ck = {"gradient_checkpointing": True}
    lora = {"lora_rank": 128, "lora_base": "copies"}
    zero = plan(TrainConfig(**common, **ck, **lora, zero_stage=3, zero_offload=True), 8, 48)
    assert zero.prediction["total"] < 48 * 2**30 < zero.load["gpu_load"] == 2 * 4 * params
    assert not zero.fits and zero.load["host_load"] == 8 * 2 * 4 * params
    assert "does NOT fit" in zero.text() and "before they are partitioned" in zero.text()
    shared = plan(TrainConfig(**common, **ck, lora_rank=128), 8, 48)  # DDP, one base per rank
    assert shared.load["gpu_load"] == 4 * params and shared.load["host_load"] == 8 * 4 * params
    assert "one shared base" in shared.text()
    offload = plan(
        TrainConfig(
            **common, lisa_active=2, fsdp=True, fsdp_offload=True, precision="bf16-weights"
        ),
        4,
        48,
    )
    assert offload.load["host"] > 2 * 2 * params  # both copies' bf16 shards live on the host


@pytest.mark.slow
def test_emitted_launch_runs_on_a_tiny_llama_with_two_processes(tmp_path, capsys):
    """`memory --emit` for LISA + FSDP + checkpointing + bf16-weights on a tiny Llama: the
    written command, run as written (2 gloo processes), trains and writes weights.json."""
    from scalebio_core.train.models import save_tiny_model

    model = save_tiny_model("llama", tmp_path / "tiny-llama")
    emit = tmp_path / "emit"
    code, out, err = _memory(
        capsys,
        "--config", "lisa", "--preset", "smoke", "--model", str(model), "--gpus", "2",
        "--gpu-mem", "1", "--fsdp", "--lisa-active", "1", "--gradient-checkpointing",
        "--precision", "bf16-weights", "--emit", str(emit), "steps=3",
        f"out_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert code == 0, err
    command = (emit / "launch.sh").read_text().splitlines()[-1]
    launch = f"{sys.executable} -m accelerate.commands.launch --config_file"
    assert command in out and command.startswith(launch)
    acc = yaml.safe_load((emit / "accelerate.yaml").read_text())
    assert acc["num_processes"] == 2 and acc["distributed_type"] == "FSDP"
    assert acc["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(
        ["sh", str(emit / "launch.sh")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    timing = read_jsonl(tmp_path / "run" / "timing.jsonl")
    assert {r["world_size"] for r in timing} == {2}
    assert len(read_jsonl(tmp_path / "run" / "trajectory.jsonl")) == 3
    assert (tmp_path / "run" / "weights.json").exists()
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["precision"] == "bf16-weights" and cfg["gradient_checkpointing"] is True


FSDP_BF16 = """
import os, torch, torch.distributed as dist
from scalebio_core.core.distributed import free_port
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
dist.init_process_group("gloo", rank=0, world_size=1)
try:
    from scalebio_core.parallel.sharding import shard_model
    from scalebio_core.train.models import load_model
    for bf16 in (False, True):
        seen = []
        m = load_model("embedded:nano", vocab_size=256, seed=0)
        shard_model(m, bf16=bf16)
        block = [x for x in m.modules() if getattr(x, "weight", None) is not None][3]
        block.register_forward_pre_hook(lambda mod, a: seen.append(mod.weight.dtype))
        m(input_ids=torch.randint(0, 256, (2, 8))).logits.float().sum().backward()
        kept = {p.dtype for p in m.parameters()} | {p.grad.dtype for p in m.parameters()}
        print(bf16, seen[0], sorted(map(str, kept)))
finally:
    dist.destroy_process_group()
"""


def test_fsdp_under_bf16_gathers_bf16_and_keeps_fp32_shards_and_gradients():
    """precision: bf16 under FSDP2: the all-gathered weights a block computes with are bf16
    (half the bytes moved), the shards and their gradients fp32 (reduced in fp32)."""
    out = subprocess.run(
        [sys.executable, "-c", FSDP_BF16],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == [
        "False torch.float32 ['torch.float32']",
        "True torch.bfloat16 ['torch.float32']",
    ]
