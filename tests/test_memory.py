"""The memory model: exact parameter counts, state and gradient bytes against measured tensors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scalebio_core.errors import ConfigError
from scalebio_core.plan.memory import SHARDINGS, MemorySetup, model_shape, predict

MIB = 2**20


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "qwen2", "gemma2"])
def test_meta_device_counts_equal_the_real_model(arch, tmp_path):
    from scalebio_core.core.blocks import find_blocks
    from scalebio_core.train.models import load_model, save_tiny_model

    path = save_tiny_model(arch, tmp_path / arch)
    real = load_model(str(path))
    shape = model_shape(str(path))  # from config.json on the meta device
    assert shape.params == sum(p.numel() for p in real.parameters())
    _, blocks = find_blocks(real)
    assert shape.block_params == tuple(sum(p.numel() for p in b.parameters()) for b in blocks)


@pytest.mark.parametrize(
    "lisa_active, precision, param_dtype, lora",
    [
        (0, "fp32", "fp32", None),
        (1, "fp32", "fp32", None),
        (1, "bf16", "bf16", None),
        (0, "bf16-weights", "bf16-weights", None),
        (1, "bf16-weights", "bf16-weights", None),
        (0, "fp32", "fp32", "shared"),
        (0, "fp32", "fp32", "copies"),
    ],
)
def test_predicted_state_and_gradients_match_measured(lisa_active, precision, param_dtype, lora):
    """The trainer's tensors against the model's terms; with `precision: bf16` (autocast) the
    trainer keeps fp32 weights, gradients and AdamW state: the "bf16" terms; with
    `bf16-weights` bf16 weights and gradients, and fp32 masters and moments of the trainable
    parameters only (LISA's frozen blocks: 2 bytes per parameter); LoRA with the base once
    (shared) or twice (copies)."""
    from scalebio_core.lab.experiments import memory_probe, preset_config
    from scalebio_core.train.models import load_model

    cfg = preset_config("lisa", "smoke")
    shape = model_shape(model=load_model(cfg.model, vocab_size=cfg.vocab_size))
    setup = MemorySetup(
        gpus=1,
        sharding="ddp",
        param_dtype=param_dtype,
        mode="lora" if lora else "lisa" if lisa_active else "full",
        lisa_active=max(1, lisa_active),
        lora_rank=4,
        lora_shared=lora == "shared",
    )
    pred = predict(shape, setup)
    lora_fields = {"lora_rank": 4, "lora_base": lora} if lora else {}
    measured = memory_probe(
        "lisa", "smoke", steps=2, lisa_active=lisa_active, precision=precision, **lora_fields
    )
    assert measured["grads_mib"] == pytest.approx(pred["gradients"] / MIB, rel=1e-6)
    # AdamW also keeps one scalar `step` tensor per parameter tensor: well under 1%
    assert measured["optimizer_state_mib"] == pytest.approx(pred["optimizer"] / MIB, rel=0.01)
    assert measured["params_mib"] == pytest.approx(pred["weights"] / MIB, rel=1e-6)


def test_lisa_and_sharding_lower_the_prediction():
    shape = model_shape("meta-llama/Meta-Llama-3-8B")
    assert shape.params == 8_030_261_248
    full = predict(shape, MemorySetup(gpus=8))
    lisa = predict(shape, MemorySetup(gpus=8, mode="lisa", lisa_active=2))
    one = predict(shape, MemorySetup(gpus=1))
    assert lisa["optimizer"] < full["optimizer"] / 4 and lisa["gradients"] < full["gradients"]
    assert full["weights"] < one["weights"] / 4
    with pytest.raises(ConfigError, match=r"lisa_active must lie in \[1, 32\]"):
        predict(shape, MemorySetup(mode="lisa", lisa_active=40))
    with pytest.raises(ConfigError, match="no config for 'acme/unknown'"):
        model_shape("acme/unknown")


def test_bf16_holds_fp32_weights_without_a_master_copy():
    """Full training: 16 bytes per parameter and copy either way; LISA: bf16's weights double
    those of bf16-weights.
    (One GPU: under FSDP the gathered blocks come in the weights' dtype as well.)"""
    shape = model_shape("meta-llama/Meta-Llama-3-8B")
    one = {"gpus": 1, "sharding": "ddp"}
    full = {d: predict(shape, MemorySetup(**one, param_dtype=d)) for d in ("bf16", "bf16-weights")}
    assert full["bf16"]["total"] == full["bf16-weights"]["total"]
    assert full["bf16"]["weights"] == 2 * full["bf16-weights"]["weights"]
    lisa = {
        d: predict(shape, MemorySetup(**one, mode="lisa", param_dtype=d))
        for d in ("bf16", "bf16-weights")
    }
    assert lisa["bf16"]["weights"] == 2 * lisa["bf16-weights"]["weights"]
    assert (
        lisa["bf16"]["optimizer"] == lisa["bf16-weights"]["optimizer"] * 8 / 12
    )  # no fp32 master copy
    with pytest.raises(ConfigError, match="param_dtype must be one of"):
        predict(shape, MemorySetup(param_dtype="int8"))


def test_zero_stages_partition_what_they_should():
    """ZeRO-3 is FSDP's full shard, but under bf16 FSDP gathers its blocks in bf16 and ZeRO-3
    (fp32 weights) in fp32; ZeRO-2 replicates the weights; ZeRO-1 the gradients too."""
    shape = model_shape("meta-llama/Meta-Llama-3-8B")
    by = {k: predict(shape, MemorySetup(gpus=8, sharding=k)) for k in SHARDINGS}
    block = max(shape.block_params)
    assert by["zero3"]["weights"] - by["fsdp"]["weights"] == 2 * block * (4 - 2)
    fp32 = {
        k: predict(shape, MemorySetup(gpus=8, sharding=k, param_dtype="fp32")) for k in SHARDINGS
    }
    assert fp32["zero3"] == fp32["fsdp"]
    for part in ("gradients", "optimizer", "activations"):
        assert by["zero3"][part] == by["fsdp"][part], part
    assert by["zero2"]["weights"] == by["zero1"]["weights"] == by["ddp"]["weights"]
    assert by["zero2"]["gradients"] == by["fsdp"]["gradients"] == by["ddp"]["gradients"] / 8
    assert by["zero1"]["gradients"] == by["ddp"]["gradients"]
    assert by["zero1"]["optimizer"] == by["fsdp"]["optimizer"] == by["ddp"]["optimizer"] / 8
    totals = [by[k]["total"] for k in ("ddp", "zero1", "zero2", "zero3")]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    with pytest.raises(ConfigError, match="sharding one of"):
        predict(shape, MemorySetup(sharding="zero4"))
    with pytest.raises(ConfigError, match="LISA does not run under DeepSpeed ZeRO"):
        predict(shape, MemorySetup(sharding="zero3", mode="lisa"))


def test_memory_cli_prints_the_four_paper_models_offline():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalebio_core",
            "memory",
            "--gpus",
            "8",
            "--gpu-mem",
            "48",
            "--lisa-active",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    ).stdout
    for name in ("gpt2", "Meta-Llama-3-8B", "gpt-neox-20b", "Yi-34B"):
        assert name in out
    assert out.count("verdict:") == 4


def _benchmark_module():
    from scalebio_core.lab.experiments import benchmark

    return benchmark("memory")


@pytest.mark.parametrize(
    "lisa, train_embeddings, lowest, precision, lora",
    [
        (0, True, 0, "fp32", 0),
        (1, True, 0, "fp32", 0),
        (1, False, 1, "fp32", 0),
        (2, False, 0, "fp32", 0),
        (0, True, 0, "bf16-weights", 0),
        (1, False, 1, "bf16-weights", 0),
        (0, True, 0, "fp32", 4),
        (0, True, 0, "fp32", 16),
    ],
)
def test_eager_saved_bytes_equal_what_autograd_saves(
    lisa, train_embeddings, lowest, precision, lora
):
    """The eager activation count against autograd's own saved tensors (hooks), GPT-2 in fp32
    and with bf16 weights (bf16 activations; statistics and log-probabilities in fp32), and with
    LoRA through the loss the trainer takes for a PEFT model (the full logits)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from scalebio_core.plan.memory import eager_saved_bytes
    from scalebio_core.train.lora import add_lora
    from scalebio_core.train.losses import LMFns

    b, t, h, n = 2, 32, 128, 3
    config = GPT2Config(
        n_layer=n,
        n_embd=h,
        n_head=4,
        vocab_size=512,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    if precision == "bf16-weights":
        model = model.bfloat16()
    active = [lowest + i for i in range(lisa)]
    if lisa:  # as lisa.Lisa.apply: outside parameters follow train_embeddings
        for p in model.parameters():
            p.requires_grad_(train_embeddings)
        for i, block in enumerate(model.transformer.h):
            for p in block.parameters():
                p.requires_grad_(i in active)
    ids = torch.randint(0, 512, (b, t), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100  # a prompt: the head runs at the 2 × 21 response positions only
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    shape = model_shape(model=model)
    if lora:
        model = add_lora(model, lora, 16.0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in params and x.is_floating_point():  # index tensors left out
            saved[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        LMFns().loss(model, batch)  # the head at labelled positions only (not with LoRA)
    setup = MemorySetup(
        mode="lora" if lora else "lisa" if lisa else "full",
        lora_rank=lora or 128,
        lisa_active=max(lisa, 1),
        lisa_train_embeddings=train_embeddings,
        lisa_lowest=lowest,
        param_dtype=precision,
        activations="eager",
        batch=b,
        seq=t,
        label_tokens=int((labels[:, 1:] != -100).sum()),
    )
    expected = eager_saved_bytes(shape, setup)
    assert sum(saved.values()) == pytest.approx(expected, rel=0.005)


@pytest.mark.slow  # ~90 s on 2 shared cores: 3 fresh processes, most of it start-up
def test_measured_peaks_of_four_cpu_configs_lie_within_15_percent_of_the_model(tmp_path):
    """Real trainer steps in fresh processes: peak RSS (live bytes) against the model's total.

    A 4-block GPT-2 (768 wide, vocab 8192, 35M parameters) so that the tensors (0.6-1.2 GiB)
    dominate the process's own few tens of MiB (measured errors +4 to +6%); full ScaleBiO and
    LISA with and without the embeddings training, and full ScaleBiO under micro_tokens=128
    (micro-batches of one 128-token record instead of two: half the activations).
    """
    bm = _benchmark_module()
    shape = {"n_layer": 4, "n_embd": 768, "n_head": 12, "vocab_size": 8192}
    model_dir = bm.save_model(tmp_path / "model", shape)
    data_dir = bm.save_data(tmp_path / "data", n=4, prompt="Continue:", prompt_words=8)
    errors = {}
    for name, overrides in (
        ("full", {"lisa_active": 0}),
        ("lisa", {"lisa_active": 2}),
        ("lisa-frozen", {"lisa_active": 2, "lisa_train_embeddings": False}),
        ("full, one record per micro-batch", {"lisa_active": 0, "micro_tokens": 128}),
    ):
        m = bm.measure(model_dir, data_dir, overrides, steps=2)
        assert m["seq"] == 128
        pred = bm.predicted(model_dir, overrides, m)
        # trainable counts exact (tied wte/lm_head once, frozen with the embeddings)
        assert m["grads_mib"] == pytest.approx(pred["gradients"] / MIB, rel=1e-6)
        errors[name] = m["peak_total_mib"] / (pred["total"] / MIB) - 1
    assert all(abs(e) <= 0.15 for e in errors.values()), errors
