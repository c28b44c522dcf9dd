"""Launch configs for accelerate: DDP, FSDP (decoder block class resolved generically), ZeRO-3.

    python -m scalebio_core.scaleout fsdp --model meta-llama/Meta-Llama-3-8B --gpus 8

prints an accelerate config whose `fsdp_transformer_layer_cls_to_wrap` is the class of the
model's decoder blocks, found by `lisa.find_blocks` on the model built from its config on the meta
device (no download of weights, any architecture). The FSDP config is FSDP version 2 (torch's
fully_shard, per-parameter sharding): LISA mixes frozen and trainable parameters inside one FSDP
unit, which FSDP1's flat parameters cannot hold. The trainer shards u and w itself
(`sharding.py`). Under the DeepSpeed config u and w become two DeepSpeed engines (`zero.py`;
ZeRO-1/2/3, LoRA but not LISA).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM

from .config import CONFIG_DIR, TrainConfig, merge
from .errors import ConfigError
from .lisa import find_blocks
from .memory import Plan, load_config, model_shape, plan

KINDS = ("ddp", "fsdp", "deepspeed_zero3")


def block_class(name_or_path: str) -> str:
    """Class name of the decoder blocks of a model (built from its config on the meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(name_or_path))
    _, blocks = find_blocks(model)
    return type(blocks[0]).__name__


def accelerate_config(
    kind: str,
    model: str | None = None,
    gpus: int = 8,
    offload: bool = True,
    zero_stage: int = 3,
    mixed_precision: str = "bf16",
) -> dict:
    """The shipped config of `kind`, with the process count, offload, wrap class, ZeRO stage and
    accelerate's mixed precision filled in."""
    if kind not in KINDS:
        raise ConfigError(f"unknown launch kind {kind!r}; known: {KINDS}.")
    cfg = yaml.safe_load((CONFIG_DIR / "accelerate" / f"{kind}.yaml").read_text())
    cfg["num_processes"] = gpus
    cfg["mixed_precision"] = mixed_precision
    if kind == "fsdp":
        cfg["fsdp_config"]["fsdp_offload_params"] = offload
        if model is not None:
            cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = block_class(model)
    if kind == "deepspeed_zero3":
        device = "cpu" if offload else "none"
        cfg["deepspeed_config"]["offload_optimizer_device"] = device
        cfg["deepspeed_config"]["offload_param_device"] = device if zero_stage == 3 else "none"
        cfg["deepspeed_config"]["zero_stage"] = zero_stage
    return cfg


def launch_command(config_path: str | Path, train_config: str, preset: str | None = None) -> str:
    preset_arg = f" --preset {preset}" if preset else ""
    return (
        f"accelerate launch --config_file {config_path} -m scalebio_core train "
        f"--config {train_config}{preset_arg}"
    )


PLAN_BASE = {"max_length": 1024, "precision": "bf16"}
"""The planner's base run config without a preset: a 1024-token context in bf16 (the paper's)."""


def plan_config(
    base: Mapping[str, Any] | None, fields: Mapping[str, Any], gpus: int
) -> TrainConfig:
    """The run config a plan predicts and launches: `base` (a preset's dict; default PLAN_BASE)
    with `fields` over it; micro-batch 1 per GPU unless the batch sizes are given; a model
    chosen in `fields` brings its own tokenizer."""
    fields = dict(fields)
    if "model" in fields and not str(fields["model"]).startswith("embedded"):
        fields.setdefault("tokenizer", fields["model"])
    d = merge(dict(PLAN_BASE) if base is None else dict(base), fields)
    per_step = max(gpus, 1) * d.get("grad_accum", 1)
    d.setdefault("batch_size", per_step)
    d.setdefault("val_batch_size", per_step)
    return TrainConfig.from_dict(d)


SEARCHED = {
    "offload": (False, True),
    "gradient_checkpointing": (False, True),
    "sharding": ("ddp", "zero1", "zero2", "fsdp", "zero3"),
    "precision": ("bf16-weights", "bf16", "fp32"),
}
"""What `cheapest` chooses when not given, each in order of cost: CPU offload costs the most
time (every step moves state over PCIe), then recomputation (about one more forward per
backward), then communication (sharding gathers the weights), then the precision (fp32 runs at a
fraction of bf16's speed on GPUs; autocast over fp32 weights casts them on every use)."""


def _sharding_fields(sharding: str, offload: bool) -> dict[str, Any]:
    zero = int(sharding[-1]) if sharding.startswith("zero") else 0
    return {
        "fsdp": sharding == "fsdp",
        "fsdp_offload": sharding == "fsdp" and offload,
        "zero_stage": zero,
        "zero_offload": bool(zero) and offload,
    }


def cheapest(
    base: Mapping[str, Any] | None, fields: Mapping[str, Any], gpus: int, gpu_gib: float
) -> tuple[Plan | None, int, int]:
    """The cheapest configuration (order of `SEARCHED`) that the trainer runs and that fits:
    (its plan or None, configurations that fit, configurations the trainer accepts). Fields
    given in `fields` stay fixed; `fields` may not set the sharding fields themselves."""
    fixed = dict(fields)
    shardings = SEARCHED["sharding"]
    if {"fsdp", "zero_stage", "fsdp_offload", "zero_offload"} & set(fixed):
        raise ConfigError("cheapest searches the sharding and offload: do not fix them.")
    choices = {k: (fixed.pop(k),) if k in fixed else v for k, v in SEARCHED.items()}
    found: Plan | None = None
    fits = accepted = 0
    shape = None
    for offload in choices["offload"]:
        for ckpt in choices["gradient_checkpointing"]:
            for sharding in shardings:
                if offload and sharding == "ddp":
                    continue  # the trainer offloads sharded state only
                for precision in choices["precision"]:
                    trial = {
                        **fixed,
                        **_sharding_fields(sharding, offload),
                        "gradient_checkpointing": ckpt,
                        "precision": precision,
                    }
                    try:
                        cfg = plan_config(base, trial, gpus)
                        shape = shape or model_shape(cfg.model)
                        p = plan(cfg, gpus, gpu_gib, shape)
                    except ConfigError:
                        continue
                    accepted += 1
                    fits += p.fits
                    if p.fits and found is None:
                        found = p
    return found, fits, accepted


def launch_kind(cfg: TrainConfig) -> str:
    """The accelerate config that runs `cfg` on several processes."""
    return "fsdp" if cfg.fsdp else "deepspeed_zero3" if cfg.zero_stage else "ddp"


def emit(p: Plan, folder: str | Path) -> dict[str, Path]:
    """Write what runs plan `p`: `config.yaml` (the run config, flat), `accelerate.yaml` (on
    several GPUs) and `launch.sh` (the command). Returns the paths; the command is `p`'s."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"config": folder / "config.yaml", "launch": folder / "launch.sh"}
    out["config"].write_text(yaml.safe_dump(p.cfg.to_dict(), sort_keys=False))
    if p.gpus > 1:
        out["accelerate"] = folder / "accelerate.yaml"
        acc = plan_accelerate_config(p)
        out["accelerate"].write_text(yaml.safe_dump(acc, sort_keys=False))
    out["launch"].write_text("#!/bin/sh\n" + plan_command(p, folder) + "\n")
    out["launch"].chmod(0o755)
    return out


def plan_accelerate_config(p: Plan) -> dict:
    """The accelerate config of plan `p` (several GPUs)."""
    c = p.cfg
    return accelerate_config(
        launch_kind(c),
        c.model,
        p.gpus,
        offload=c.fsdp_offload or c.zero_offload,
        zero_stage=c.zero_stage or 3,
        mixed_precision="bf16" if c.precision == "bf16" else "no",
    )


def plan_command(p: Plan, folder: str | Path) -> str:
    """The command that runs plan `p` from the files `emit` writes into `folder`."""
    folder = Path(folder)
    if p.gpus == 1:
        return f"python -m scalebio_core train --config {folder / 'config.yaml'}"
    return launch_command(folder / "accelerate.yaml", str(folder / "config.yaml"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scalebio_core.scaleout")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--model")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--no-offload", action="store_true")
    a = p.parse_args(argv)
    try:
        print(
            yaml.safe_dump(
                accelerate_config(a.kind, a.model, a.gpus, not a.no_offload), sort_keys=False
            ),
            end="",
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
