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
deleted, so a crash at any point leaves a consistent checkpoint.

A checkpoint resumes on any number of processes, sharded or not (`load_parts`): FSDP2 shards
every parameter by rows (dim 0, `torch.chunk`'s split: rank r holds rows r·⌈n/N⌉ onwards), so
the shards of the N ranks that wrote a checkpoint, in rank order, are its whole tensors, and a
rank of the run that resumes reads the rows it holds now (files memory-mapped: only those rows
are read), for any N. The optimizer states shaped like their parameter (AdamW's moments, the
fp32 masters of bf16-weights) are split the same way. A replicated checkpoint (one process or
DDP: whole tensors in last.pt) loads into shards the same way, and shards into whole models.
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


def resharded(model: nn.Module) -> nn.Module:
    """`model` with every FSDP unit's parameters sharded (DTensors) again, and returned. FSDP2
    keeps the root unit's parameters gathered after a forward until the next backward (the
    model's embeddings and final norm, when something ran a forward without a backward): there
    the parameters are whole tensors that the next reshard drops, so a checkpoint written or
    loaded through them would miss those parameters."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model


def _model_local(model: nn.Module) -> dict[str, torch.Tensor]:
    resharded(model)
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


def drop_old_shards(run_dir: Path, step: int, rank: int, world: int) -> None:
    """After last.pt names `step`: this rank's files of other steps; the main process's, every
    file last.pt does not name (those of ranks beyond `world` too, written before a resume on
    fewer processes)."""
    folder = shard_path(run_dir, step, rank).parent
    keep = {shard_path(run_dir, step, r) for r in range(world)}
    for f in folder.glob("step*-rank*.pt" if rank == 0 else f"step*-rank{rank}.pt"):
        if f not in keep:
            f.unlink(missing_ok=True)


def drop_shards(run_dir: Path) -> None:
    """The shard files of an FSDP checkpoint, once a replicated run's last.pt replaced it."""
    folder = Path(run_dir) / files.CHECKPOINTS / SHARDS
    if folder.is_dir():
        for f in folder.glob("step*-rank*.pt"):
            f.unlink(missing_ok=True)


PARTS = ("w", "u", "opt_w", "opt_u")
"""What a checkpoint holds of the two models: their weights and optimizer states."""


def saved_parts(run_dir: Path, step: int, saved_world: int) -> list[dict]:
    """The shard files of step `step`, written by `saved_world` processes, in rank order
    (memory-mapped: a tensor's bytes are read only when a rank takes rows of it)."""
    parts = []
    for r in range(saved_world):
        path = shard_path(run_dir, step, r)
        if not path.exists():
            raise ConfigError(
                f"{path} is missing: the sharded checkpoint of step {step} (written by "
                f"{saved_world} processes) is incomplete. Restore {path.parent}, or start a new "
                "out_dir."
            )
        sd = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if sd["step"] != step:
            raise ConfigError(
                f"{path} holds step {sd['step']}, not {step}: the shards are mixed up."
            )
        parts.append(sd)
    return parts


def load_parts(state, parts: list[dict]) -> None:
    """Load w, u and their optimizer states from `parts` into this process, whatever the number
    of processes that wrote them and that run now (module docstring): the shard files of an
    FSDP checkpoint in rank order (`saved_parts`), or one whole state (a replicated
    checkpoint's w, u, opt_w, opt_u). Each parameter, sharded here or whole, takes its rows."""
    for name in ("w", "u"):
        model, opt = resharded(getattr(state, name)), getattr(state, f"opt_{name}")
        _load_model_rows(model, [p[name] for p in parts])
        _load_optimizer_rows(opt, [p[f"opt_{name}"] for p in parts])


def _own_rows(p: torch.Tensor) -> tuple[int, int]:
    """The rows of `p`'s whole tensor that this process holds: all of a plain tensor's; of an
    FSDP2 parameter (or state) sharded on dim 0 over N ranks, rank r's ⌈n/N⌉ rows."""
    n = p.shape[0]
    if not isinstance(p, DTensor):
        return 0, n
    if len(p.placements) != 1 or not p.placements[0].is_shard(0):
        raise ModelError(f"a parameter sharded as {p.placements}: only FSDP2's Shard(0) resumes.")
    mesh = p.device_mesh
    size = -(-n // mesh.size())
    a = min(mesh.get_local_rank() * size, n)
    b = min(a + size, n)
    if b - a != p.to_local().shape[0]:
        raise ModelError(
            f"this rank holds {p.to_local().shape[0]} rows of a {n}-row parameter, not {b - a}: "
            "FSDP2 split it otherwise than torch.chunk; the checkpoint cannot be mapped onto it."
        )
    return a, b


def _rows(parts: list[torch.Tensor], a: int, b: int, what: str, whole: torch.Size) -> torch.Tensor:
    """Rows a … b−1 of the tensor whose consecutive row blocks are `parts` (a copy). Where
    every part is the whole tensor, the first is taken: older versions saved FSDP's gathered
    root parameters (see `resharded`) whole in each rank's file."""
    if len(parts) > 1 and all(t.shape == whole for t in parts):
        parts = parts[:1]
    total = sum(t.shape[0] for t in parts)
    if total != whole[0] or any(t.shape[1:] != whole[1:] for t in parts):
        shapes = [tuple(t.shape) for t in parts]
        raise ConfigError(
            f"{what} is saved with shape {[total, *shapes[0][1:]]} ({len(parts)} part(s)) and is "
            f"{list(whole)} in this run: the checkpoint does not fit this run's model."
        )
    out, offset = [], 0
    for t in parts:
        lo, hi = max(a - offset, 0), min(b - offset, t.shape[0])
        if lo < hi:
            out.append(t[lo:hi])
        offset += t.shape[0]
    if not out:
        return parts[0][:0].clone()
    return out[0].clone() if len(out) == 1 else torch.cat(out)


def _local_target(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _load_model_rows(model: nn.Module, parts: list[dict]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in parts[0]:
                raise ConfigError(f"parameter {n} is not in the checkpoint: it does not fit.")
            if p.ndim == 0:
                _local_target(p.data).copy_(parts[0][n])
                continue
            a, b = _own_rows(p)
            _local_target(p.data).copy_(_rows([q[n] for q in parts], a, b, n, p.shape))
        for n, buf in model.named_buffers():  # whole on every rank; a replicated checkpoint
            saved = parts[0].get(f"buffer:{n}", parts[0].get(n))  # keeps persistent ones only
            if saved is not None:
                buf.copy_(saved)


def _load_optimizer_rows(opt: torch.optim.Optimizer, parts: list[dict]) -> None:
    """This process's rows of every state tensor shaped like its parameter; the rest (steps,
    hyperparameters) as saved."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict = {}
    for idx, st in parts[0]["state"].items():
        p = params[int(idx)]
        state[idx] = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim and v.ndim == p.ndim:
                a, b = _own_rows(p)
                rows = [q["state"][idx][k] for q in parts]
                v = _rows(rows, a, b, f"optimizer state {k} of parameter {idx}", p.shape)
            state[idx][k] = v
    _load_optimizer_local(opt, {"state": state, "param_groups": parts[0]["param_groups"]})
