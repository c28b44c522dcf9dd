"""The distributions of several processes, one per engine, and the one place that chooses.

    Ddp    whole copies of u and w on every process (over accelerate's process group):
           gradients all-reduced (summed) before clipping, small ones in flat buckets
           (`all_reduce_grads`)
    Fsdp   FSDP2 (`sharding.py`): each rank holds 1/N of every parameter, gradient and optimizer
           state; FSDP reduce-scatters the gradients in backward, the norm is that of the whole
           sharded gradient; under precision bf16 it all-gathers bf16 and reduces fp32
    Zero   DeepSpeed ZeRO-1/2/3 (`zero.py`): u and w are two engines, which own backward, the
           reduction, clipping and the update

Each implements `distributed.Distribution` (the interface of the steps) on top of `Local`.
`choose(cfg, accelerator, copies)` picks one from the config and the accelerate launch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from .. import messages
from ..core.distributed import Local, RunDistribution, ended_at_exit
from ..errors import ConfigError
from . import sharding, zero


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """A new tensor holding the sum of `t` over the processes."""
    out = t.clone()
    torch.distributed.all_reduce(out)
    return out


BUCKET_BYTES = 25 * 2**20
"""Bytes of small gradients one all-reduce carries (DDP's own default bucket size)."""
LARGE_BYTES = 2**20
"""A gradient this large is reduced in place, on its own: copying it into a bucket and back
costs more than the call it would save (`benchmarks/allreduce.py`)."""


def all_reduce_grads(params: Any, bucket_bytes: int = BUCKET_BYTES) -> int:
    """Sum the gradients of `params` over the processes in place, in few calls: a gradient of
    LARGE_BYTES or more is reduced on its own, in place; the small ones (biases, norms: most of
    a model's tensors, little of its bytes) of one dtype and device are concatenated into flat
    buckets of about `bucket_bytes`, each reduced in one call and copied back. Each element is
    summed over the same ranks as by one call per tensor, so the sums are the same to the bit.
    Returns the number of all-reduce calls."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    calls = 0
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.numel() * g.element_size() >= LARGE_BYTES:
            torch.distributed.all_reduce(g)
            calls += 1
        else:
            groups.setdefault((g.dtype, g.device), []).append(g)
    for grads in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for i, g in enumerate(grads):
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= bucket_bytes or i == len(grads) - 1:
                flat = torch.cat([x.reshape(-1) for x in bucket])
                torch.distributed.all_reduce(flat)
                offset = 0
                for x in bucket:
                    x.copy_(flat[offset : offset + x.numel()].view_as(x))
                    offset += x.numel()
                calls += 1
                bucket, size = [], 0
    return calls


class MultiProcess(Local):
    """Several processes: sums over the ranks. The engines below say who reduces the gradients."""

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t.to(self.device))

    def agree(self, ok: bool) -> bool:
        """A sum of the failures over the ranks (on the device, which NCCL needs)."""
        return float(self.reduce(torch.tensor([0.0 if ok else 1.0]))) == 0


class Ddp(MultiProcess):
    """Whole copies of u and w on every process; gradients are summed before clipping."""

    def clip_and_step(self, model: nn.Module, opt: torch.optim.Optimizer, max_norm: float) -> float:
        all_reduce_grads(model.parameters())
        return super().clip_and_step(model, opt, max_norm)


class Fsdp(MultiProcess):
    """u and w sharded by FSDP2: each rank holds 1/N of every parameter, gradient and state."""

    sharded = True
    engine = "fsdp"

    def __init__(
        self, accelerator: Accelerator, offload: bool, layers_path: str | None, bf16: bool = False
    ):
        super().__init__(accelerator)
        self.offload, self.layers_path, self.bf16 = offload, layers_path, bf16

    def build_models(self, whole, empty, copies, finish) -> list[nn.Module]:
        """Rank 0 loads the model whole; every rank builds empty copies, shards them and
        receives its shards from rank 0 (`sharding.sharded_copies`): one whole model per
        node in host memory, none on a GPU."""
        return sharding.sharded_copies(
            whole, empty, copies, finish, self.device, self.offload, self.layers_path, self.bf16
        )

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"world": self.world, "engine": self.engine}

    def save_models(self, state: Any, run_dir: Path) -> None:
        sharding.save_shards(state, run_dir, self.rank)

    def drop_old(self, run_dir: Path, step: int) -> None:
        sharding.drop_old_shards(run_dir, step, self.rank, self.world)

    # load_models: none; `checkpoint.load` maps any FSDP or replicated checkpoint onto the
    # shards of this run's processes (`sharding.load_parts`), whatever their count was


class Zero(MultiProcess):
    """u and w as two DeepSpeed engines (ZeRO stage 1, 2 or 3), each around its own optimizer."""

    sharded = True
    engine = "deepspeed"

    def __init__(self, accelerator: Accelerator, stage: int, offload: bool, precision: str):
        super().__init__(accelerator)
        self.stage, self.offload, self.precision = stage, offload, precision

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        # DeepSpeed averages over ranks; the losses here are shares of the global loss
        model.backward(loss * self.world, scale_wrt_gas=False)

    def clip_and_step(self, model: nn.Module, opt: Any, max_norm: float) -> float:
        model.optimizer.clip_grad = float(max_norm)  # the engine clips inside its step
        opt.step()
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def autocast(self) -> contextlib.AbstractContextManager:
        """accelerate leaves mixed precision to DeepSpeed under a DeepSpeed launch; the engines
        here keep fp32 weights, so the trainer autocasts itself."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return super().autocast()

    def prepare_state(self, state: Any, micro_batch: int) -> None:
        zero.make_engines(state, self.stage, self.offload, micro_batch, self.world, self.device)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"world": self.world, "engine": self.engine, "stage": self.stage}

    def save_models(self, state: Any, run_dir: Path) -> None:
        zero.save(state, run_dir)

    def drop_old(self, run_dir: Path, step: int) -> None:
        if self.is_main:
            zero.drop_old(run_dir, step)

    def load_models(self, state: Any, run_dir: Path, step: int, meta: dict | None) -> None:
        zero.load(state, run_dir, step, self.world, self.stage, meta)


def make_accelerator(cfg: Any) -> Accelerator:
    """The accelerate object of a run config: devices, processes (gloo on CPU, NCCL on GPUs),
    bf16 autocast (precision bf16; bf16-weights computes in its weights' dtype), trackers."""
    kwargs = dict(
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        log_with=None if cfg.tracker == "none" else cfg.tracker,
        project_dir=cfg.out_dir,
        cpu=not torch.cuda.is_available(),
    )
    try:
        accelerator = Accelerator(**kwargs)
    except ValueError:  # an earlier run in this process (a notebook) chose another precision
        AcceleratorState._reset_state()
        accelerator = Accelerator(**kwargs)
    ended_at_exit()  # a launched rank's process group ends before the interpreter does
    return accelerator


def _offload_on_gpus(kind: str, offload: bool, device: torch.device) -> bool:
    """Offload moves shards from GPU to CPU memory: on a CPU it is ignored, with a warning."""
    if offload and device.type == "cpu":
        messages.warn(
            f"{kind} offload ignored: it moves the shards from the GPUs to CPU memory, and this "
            "run is on the CPU already.",
            stacklevel=3,
        )
        return False
    return offload


FSDP_NEEDS_PROCESSES = (
    "fsdp: true needs several processes: launch with `accelerate launch --num_processes N …` "
    "(on a CPU machine add --multi_gpu, gloo), or set fsdp: false for one process."
)


def check_plan(
    cfg: Any, world: int, copies: int = 2, fsdp: bool | None = None, stage: int | None = None
) -> None:
    """Refuse, before any model is built, a run the engines cannot do with `world` processes
    (`fsdp`, `stage`: as a launch sets them; default: the config's). The memory model asks the
    same question of every configuration it predicts."""
    fsdp = cfg.fsdp if fsdp is None else fsdp
    stage = cfg.zero_stage if stage is None else stage
    if stage:
        zero.check_config(cfg, copies, fsdp)
        if world < 2:
            raise ConfigError(zero.NEEDS_PROCESSES)
    if fsdp and world < 2:
        raise ConfigError(FSDP_NEEDS_PROCESSES)
    if fsdp and (copies != 2 or cfg.method not in ("scalebio", "doremi")):
        raise ConfigError(
            "fsdp shards the two models of ScaleBiO and DoReMi; plain fine-tuning (sft) is not "
            "sharded: run it with fsdp: false."
        )
    if copies == 2 and cfg.lora_rank > 0 and cfg.lora_base == "shared" and cfg.lisa_active > 0:
        raise ConfigError(
            "LISA with LoRA on one shared base: LISA freezes the blocks of each copy, and the "
            "two copies' adapters sit in the same blocks. Set lora_base: copies to combine them, "
            "or use LISA (lisa_active) or LoRA (lora_rank) alone."
        )
    if cfg.batch_size % (world * cfg.grad_accum) or cfg.val_batch_size % (world * cfg.grad_accum):
        raise ConfigError(
            f"batch_size ({cfg.batch_size}) and val_batch_size ({cfg.val_batch_size}) must be "
            f"multiples of processes × grad_accum = {world} × {cfg.grad_accum}."
        )


def choose(cfg: Any, accelerator: Any, copies: int = 2) -> RunDistribution:
    """The distribution of a run: the config's sharding, or an accelerate launch's (FSDP2 or
    DeepSpeed ZeRO), else whole copies on every process. `copies=1`: plain fine-tuning."""
    distributed_type = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    fsdp, offload = sharding.fsdp_from_launch(cfg.fsdp, cfg.fsdp_offload, distributed_type)
    stage, zero_offload = zero.zero_from_launch(cfg.zero_stage, cfg.zero_offload)
    if stage:
        zero.check_supported(cfg, copies, fsdp)
    check_plan(cfg, accelerator.num_processes, copies, fsdp, stage)
    offload = fsdp and _offload_on_gpus("fsdp", offload, accelerator.device)
    zero_offload = bool(stage) and _offload_on_gpus("zero", zero_offload, accelerator.device)
    if stage:
        return Zero(accelerator, stage, zero_offload, cfg.precision)
    if fsdp:
        return Fsdp(accelerator, offload, cfg.lisa_layers_path, cfg.precision == "bf16")
    return processes(accelerator)


def processes(accelerator: Any) -> RunDistribution:
    """Whole copies on every process: `Ddp` for several, `Local` for one."""
    return Ddp(accelerator) if accelerator.num_processes > 1 else Local(accelerator)
