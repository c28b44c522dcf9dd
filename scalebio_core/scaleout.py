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
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from .config import CONFIG_DIR
from .errors import ConfigError
from .lisa import find_blocks
from .memory import load_config

KINDS = ("ddp", "fsdp", "deepspeed_zero3")


def block_class(name_or_path: str) -> str:
    """Class name of the decoder blocks of a model (built from its config on the meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(name_or_path))
    _, blocks = find_blocks(model)
    return type(blocks[0]).__name__


def accelerate_config(
    kind: str, model: str | None = None, gpus: int = 8, offload: bool = True
) -> dict:
    """The shipped config of `kind`, with the process count, offload and wrap class filled in."""
    if kind not in KINDS:
        raise ConfigError(f"unknown launch kind {kind!r}; known: {KINDS}.")
    cfg = yaml.safe_load((CONFIG_DIR / "accelerate" / f"{kind}.yaml").read_text())
    cfg["num_processes"] = gpus
    if kind == "fsdp":
        cfg["fsdp_config"]["fsdp_offload_params"] = offload
        if model is not None:
            cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = block_class(model)
    if kind == "deepspeed_zero3":
        device = "cpu" if offload else "none"
        cfg["deepspeed_config"]["offload_optimizer_device"] = device
        cfg["deepspeed_config"]["offload_param_device"] = device
    return cfg


def launch_command(config_path: str | Path, train_config: str, preset: str | None = None) -> str:
    preset_arg = f" --preset {preset}" if preset else ""
    return (
        f"accelerate launch --config_file {config_path} -m scalebio_core train "
        f"--config {train_config}{preset_arg}"
    )


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
