"""Sharding u and w over the processes with FSDP2 (torch's `fully_shard`), and sharded checkpoints.

Each decoder block (found generically by `blocks.find_blocks`) and then the whole model become one
FSDP unit, for both copies: every rank holds 1/N of each parameter, its gradient and its AdamW
state, and all-gathers a block's parameters only while that block runs. Parameters are sharded
one by one (no flat parameters), so LISA's frozen and trainable parameters can sit in one unit and
change every `lisa_interval` steps: a frozen parameter simply gets no gradient to reduce.

The trajectory is the one of a single process with the same global batch: each rank's loss is
its samples' share of the global loss (the trainer's convention), so gradients are *summed* over
ranks (`set_gradient_divide_factor(1.0)`; FSDP2 would average); clipping takes the norm of the
whole sharded gradient (`clip_grad_norm_` on DTensors); λ's gradient and the per-source counts are
reduced as without sharding.

Checkpoints: every rank writes its own shard of w, u and their optimizer states to
`checkpoints/shards/step<step>-rank<r>.pt`; then rank 0 writes checkpoints/last.pt (λ, its
optimizer, the step, RNG states, the world size), and only after that are older shard files
deleted, so a crash at any point leaves a consistent checkpoint. Resuming needs the same number
of processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .. import files
from ..core.blocks import find_blocks
from ..errors import ConfigError, ModelError

SHARDS = "shards"


def fsdp_from_launch(fsdp: bool, offload: bool, distributed_type: str) -> tuple[bool, bool]:
    """(fsdp, offload): the config's, or an accelerate FSDP launch's. Its launcher exports the
    config as variables; on CPUs accelerate drops the FSDP type but not them."""
    env = os.environ
    if distributed_type == "FSDP" or env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return True, offload or env.get("FSDP_OFFLOAD_PARAMS", "").lower() == "true"
    return fsdp, offload


def shard_model(
    model: nn.Module, offload: bool = False, layers_path: str | None = None, bf16: bool = False
) -> None:
    """fully_shard each decoder block, then the model (in place); gradients summed over ranks.
    `bf16` (precision: bf16): the fp32 shards are all-gathered and computed in bf16, half the
    bytes of an fp32 all-gather, and the gradients reduced in fp32 (`MixedPrecisionPolicy`); the
    shards, their gradients and the optimizer state stay fp32."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ConfigError(
            "fsdp: true needs a process group: launch with `accelerate launch --num_processes N "
            "…` (on a CPU machine add --multi_gpu, gloo), or set fsdp: false for one process."
        )
    _, blocks = find_blocks(model, layers_path)
    kw: dict = {"offload_policy": CPUOffloadPolicy()} if offload else {}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


def sharded_copies(
    whole: Callable[[torch.device | None], nn.Module],
    empty: Callable[[], nn.Module],
    copies: int,
    finish: Callable[[nn.Module], None],
    device: torch.device,
    offload: bool = False,
    layers_path: str | None = None,
    bf16: bool = False,
) -> list[nn.Module]:
    """`copies` sharded copies of one model, materialised once per node.

    Rank 0 loads the model whole (`whole(None)`, host memory); every rank builds each copy empty
    (`empty()`: parameters on the meta device), shards it, allocates only its own shards, and
    receives them from rank 0 parameter by parameter (torch's `set_model_state_dict` with
    `broadcast_from_rank0`). Buffers (rotary frequencies and the like) are computed by every
    rank as the model is built. So no rank but 0 ever holds a whole copy, and no GPU does. If
    rank 0 cannot load the model, every rank raises (none waits for the broadcast).
    """
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    source: dict = {}
    error: Exception | None = None
    if rank == 0:
        try:
            source = whole(None).state_dict()
        except Exception as e:  # re-raised below, after telling the other ranks
            error = e
    failed = torch.tensor([float(error is not None)], device=device)
    if torch.distributed.is_initialized():  # no rank may wait for a broadcast that never comes
        torch.distributed.all_reduce(failed)
    if error is not None:
        raise error
    if failed.item():
        raise ModelError("rank 0 could not load the model (its error is above); nothing to shard.")
    models = []
    for _ in range(copies):
        model = empty()
        finish(model)
        shard_model(model, offload=offload, layers_path=layers_path, bf16=bf16)
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        model.to_empty(device="cpu" if offload else device)
        for name, b in buffers.items():  # to_empty left them uninitialised
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = b.to(device)
        set_model_state_dict(
            model,
            dict(source),
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
        models.append(model.train())
    del source
    return models


def _local(x: Any) -> Any:
    """DTensors → this rank's local shard (recursively); everything else as it is."""
    if isinstance(x, dict):
        return {k: _local(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_local(v) for v in x]
    if hasattr(x, "to_local"):
        x = x.to_local()
    if torch.is_tensor(x):  # to the CPU for saving: no second copy in GPU memory
        return x.detach().cpu()
    return x


def _model_local(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: _local(p.data) for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": b.detach().cpu() for n, b in model.named_buffers()})
    return out


def _load_model_local(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            target = p.data.to_local() if hasattr(p.data, "to_local") else p.data
            target.copy_(sd[n])
        for n, b in model.named_buffers():
            b.copy_(sd[f"buffer:{n}"])


def _load_optimizer_local(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Rebuild the DTensor optimizer state from local shards, then load it."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: (
                DTensor.from_local(
                    v.to(p.device),
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride(),
                )
                if isinstance(p, DTensor) and torch.is_tensor(v) and v.ndim == p.ndim and v.ndim
                else v
            )
            for k, v in st.items()
        }
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def shard_path(run_dir: Path, step: int, rank: int) -> Path:
    return Path(run_dir) / files.CHECKPOINTS / SHARDS / f"step{step:07d}-rank{rank}.pt"


def save_shards(state, run_dir: Path, rank: int) -> None:
    """This rank's shard of w, u and their optimizer states (atomic file)."""
    sd = {
        "w": _model_local(state.w),
        "u": _model_local(state.u),
        "opt_w": _local(state.opt_w.state_dict()),
        "opt_u": _local(state.opt_u.state_dict()),
        "step": state.step,
    }
    path = shard_path(run_dir, state.step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.save_torch(path, sd)


def drop_old_shards(run_dir: Path, step: int, rank: int) -> None:
    for f in shard_path(run_dir, step, rank).parent.glob(f"step*-rank{rank}.pt"):
        if f != shard_path(run_dir, step, rank):
            f.unlink(missing_ok=True)


def load_shards(state, run_dir: Path, step: int, rank: int, world: int, saved_world: int) -> None:
    if saved_world != world:
        raise ConfigError(
            f"the checkpoint in {run_dir} was written by {saved_world} processes (FSDP shards) "
            f"and this run has {world}: resume with --num_processes {saved_world}."
        )
    path = shard_path(run_dir, step, rank)
    if not path.exists():
        raise ConfigError(
            f"{path} is missing: the sharded checkpoint of step {step} is incomplete. Restore "
            f"{path.parent}, or start a new out_dir."
        )
    sd = torch.load(path, map_location="cpu", weights_only=False)
    if sd["step"] != step:
        raise ConfigError(f"{path} holds step {sd['step']}, not {step}: the shards are mixed up.")
    _load_model_local(state.w, sd["w"])
    _load_model_local(state.u, sd["u"])
    _load_optimizer_local(state.opt_w, sd["opt_w"])
    _load_optimizer_local(state.opt_u, sd["opt_u"])
