"""The memory model: exact parameter counts, state and gradient bytes against measured tensors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scalebio_core.bilevel import ConfigError
from scalebio_core.memory import MemorySetup, model_shape, predict

MIB = 2**20


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "qwen2", "gemma2"])
def test_meta_device_counts_equal_the_real_model(arch, tmp_path):
    from scalebio_core.lisa import find_blocks
    from scalebio_core.models import load_model, save_tiny_model

    path = save_tiny_model(arch, tmp_path / arch)
    real = load_model(str(path))
    shape = model_shape(str(path))  # from config.json on the meta device
    assert shape.params == sum(p.numel() for p in real.parameters())
    _, blocks = find_blocks(real)
    assert shape.block_params == tuple(sum(p.numel() for p in b.parameters()) for b in blocks)


@pytest.mark.parametrize("lisa_active", [0, 1])
def test_predicted_state_and_gradients_match_measured(lisa_active):
    from scalebio_core.experiments import memory_probe, preset_config
    from scalebio_core.models import load_model

    cfg = preset_config("lisa", "smoke")
    shape = model_shape(model=load_model(cfg.model, vocab_size=cfg.vocab_size))
    setup = MemorySetup(
        gpus=1,
        sharding="ddp",
        param_dtype="fp32",
        mode="lisa" if lisa_active else "full",
        lisa_active=max(1, lisa_active),
    )
    pred = predict(shape, setup)
    measured = memory_probe("lisa", "smoke", steps=2, lisa_active=lisa_active)
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
            "--lisa",
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
