"""Gradient checkpointing of the decoder blocks: activations recomputed in backward.

`checkpoint_blocks(model)` makes each decoder block (found generically by `blocks.find_blocks`)
keep only its inputs in forward and run again inside backward, through torch's *non-reentrant*
`torch.utils.checkpoint`. Non-reentrant matters for LISA: a frozen block whose inputs and weights
do not require gradients still passes the gradient to the trainable blocks below it (reentrant
checkpointing returns outputs without a graph there, and those gradients are silently lost).

It works in both modes of a copy, training and evaluation (ScaleBiO differentiates the validation
loss of w too, in eval mode, where transformers' own checkpointing is off), and with any
architecture. The blocks change class to a subclass of the same name whose `forward` recomputes;
module hooks stay outside the recomputation, so FSDP2 gathers a block's shards for the replay in
backward as it does for its forward (the subclass is made before `fully_shard`). The replay runs
in the training/eval mode of the forward, with its active LoRA adapter (u and w on one shared
base) and the RNG states of the forward, so dropout draws the same masks where it is on: the
trajectory equals the one without.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.blocks import find_blocks

_SUBCLASSES: dict[type, type] = {}


def _mode(m: nn.Module) -> tuple[bool, Any]:
    """A module's training flag and, for a PEFT tuner layer, its active adapter."""
    return m.training, m.__dict__.get("_active_adapter")


def _set_mode(m: nn.Module, mode: tuple[bool, Any]) -> None:
    m.training = mode[0]
    if mode[1] is not None:
        m._active_adapter = mode[1]


def _recomputing(cls: type) -> type:
    """The subclass of block class `cls` whose forward recomputes in backward (one per class)."""
    if getattr(cls, "recomputes", False):
        return cls
    if cls not in _SUBCLASSES:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            parent = super(sub, self).forward
            if not torch.is_grad_enabled():
                return parent(*args, **kwargs)
            modules = list(self.modules())
            modes = [_mode(m) for m in modules]

            def replay(*a: Any, **k: Any) -> Any:
                # in backward the copy may be in another mode (ScaleBiO's validation loss runs
                # in eval mode, its backward after train() again), or the shared base another
                # copy's adapter: replay in the forward's
                now = [_mode(m) for m in modules]
                for m, mode in zip(modules, modes):
                    _set_mode(m, mode)
                try:
                    return parent(*a, **k)
                finally:
                    for m, mode in zip(modules, now):
                        _set_mode(m, mode)

            return checkpoint(replay, *args, use_reentrant=False, **kwargs)

        sub = type(cls.__name__, (cls,), {"forward": forward, "recomputes": True})
        sub.__module__, sub.__qualname__ = cls.__module__, cls.__qualname__
        _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def checkpoint_blocks(model: nn.Module, layers_path: str | None = None) -> int:
    """Recompute every decoder block of `model` in backward (in place); returns the count."""
    _, blocks = find_blocks(model, layers_path)
    for block in blocks:
        block.__class__ = _recomputing(type(block))
    return len(blocks)


def recomputes(model: nn.Module, layers_path: str | None = None) -> bool:
    """Whether the decoder blocks of `model` recompute in backward."""
    _, blocks = find_blocks(model, layers_path)
    return all(getattr(type(b), "recomputes", False) for b in blocks)
