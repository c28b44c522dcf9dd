"""16-bit weights with fp32 masters (`precision: bf16-weights`): the optimizer of such a copy.

u and w hold bf16 weights and gradients, as the reference code trains them. `MasterOptimizer`
keeps, for each parameter it updates, an fp32 master copy beside the fp32 AdamW moments (or the
SGD momentum) in its state; a step reads the bf16 gradient, updates the master in fp32 with
torch's AdamW / SGD formulas, and writes the master back, rounded, into the bf16 weight. The
state exists only for parameters that have trained: it is created lazily on a parameter's first
step, and LISA deletes it when a block is frozen (`lisa.Lisa.apply`), so a frozen block costs its
2 bytes per parameter and nothing else (the memory model's `bf16-weights`).

Under FSDP2 the weights, gradients and the whole state are DTensor shards; the update is
elementwise, so each rank updates its own shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

KINDS = ("adamw", "sgd")


class MasterOptimizer(torch.optim.Optimizer):
    """AdamW or SGD over fp32 masters of 16-bit parameters (module docstring)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        kind: str,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.0,
    ):
        if kind not in KINDS:
            raise ValueError(f"MasterOptimizer: kind must be one of {KINDS}, not {kind!r}.")
        self.kind = kind
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
        super().__init__(params, {**defaults, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MasterOptimizer does not take a closure.")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["master"] = p.detach().float()
                master, grad = state["master"], p.grad.float()
                if self.kind == "adamw":
                    _adamw(master, grad, state, group)
                else:
                    _sgd(master, grad, state, group)
                p.copy_(master)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the fp32 state stays fp32 (torch would cast it to the weights' bf16)."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, saved in state_dict["state"].items():
            p = params[int(idx)]
            for k, v in saved.items():
                if torch.is_tensor(v) and k != "step":
                    self.state[p][k] = v.detach().clone().to(p.device)


def _adamw(master: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """torch.optim.AdamW's update (single tensor, no amsgrad), on the fp32 master."""
    b1, b2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    if "exp_avg" not in state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(master)
        state["exp_avg_sq"] = torch.zeros_like(master)
    state["step"] += 1
    step = float(state["step"])
    m, v = state["exp_avg"], state["exp_avg_sq"]
    master.mul_(1 - lr * group["weight_decay"])
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(eps)
    master.addcdiv_(m, denom, value=-lr / (1 - b1**step))


def _sgd(master: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """torch.optim.SGD's update (no dampening, no Nesterov), on the fp32 master."""
    if group["weight_decay"]:
        grad = grad.add(master, alpha=group["weight_decay"])
    if group["momentum"]:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = grad.clone()
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
        grad = state["momentum_buffer"]
    master.add_(grad, alpha=-group["lr"])
