"""LoRA (PEFT) on the model copies, the alternative to LISA: only the adapter matrices train."""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from .errors import ConfigError
from .lisa import find_blocks


def lora_targets(model: nn.Module, path: str | None = None) -> list[str]:
    """Names of the linear layers inside the decoder blocks (found generically)."""
    _, blocks = find_blocks(model, path)
    names = {
        n.rsplit(".", 1)[-1]
        for n, m in blocks.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    }
    if not names:
        raise ConfigError("no linear layers in the decoder blocks for LoRA: pass lora_targets.")
    return sorted(names)


def add_lora(
    model: nn.Module, rank: int, alpha: float, targets: list | None = None, path: str | None = None
) -> nn.Module:
    """Wrap a causal LM with PEFT LoRA adapters (rank, alpha, targets)."""
    targets = list(targets) if targets else lora_targets(model, path)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():  # GPT-2's Conv1D: PEFT notes fan_in_fan_out, then sets it
        warnings.simplefilter("ignore", UserWarning)
        return get_peft_model(model, config)
