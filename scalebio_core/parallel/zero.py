"""DeepSpeed ZeRO (stages 1, 2, 3) for u and w: two engines driving one ScaleBiO step.

Each copy becomes a DeepSpeed engine around its own AdamW (the client optimizer): ZeRO-1
partitions the optimizer states over the ranks, ZeRO-2 the gradients as well, ZeRO-3 the
parameters as well (gathered module by module inside forward and backward); on GPUs the optimizer
states (and with ZeRO-3 the parameters) can be offloaded to CPU memory.

The ScaleBiO step needs both models' gradients before either moves. DeepSpeed's unmanaged
gradient accumulation (`managed_gradient_accumulation: false`) allows that: an engine's
backward() only accumulates (ZeRO-2/3 reduce-scatter as they go) and its step() is the boundary
that reduces the rest, clips and updates. The step runs u's and w's backward passes, then both
steps (`distributed.Zero`; the optimizers of the state are `EngineOptimizer` adapters).

Trajectory: each rank's loss is its samples' share of the global loss, and DeepSpeed averages
gradients over the ranks, so the loss is multiplied by the process count before backward and the
gradients are the one-process sums. λ's gradient and the per-source counts are reduced by the
trainer as in every multi-process run. Clipping (at alpha, or clip_norm) happens inside
DeepSpeed's optimizer step, on the norm of the whole gradient.

Refused by the trainer, with the fix in the message:
- LISA: ZeRO flattens the trainable parameters into its partitions once, at initialisation, and
  its optimizer steps every element of them, so a frozen block would still move (momentum,
  weight decay). FSDP2 shards parameter by parameter and runs LISA (configs/accelerate/fsdp.yaml).
- DoReMi and plain fine-tuning (their steps are not written for engines): FSDP or DDP run them.
- ZeRO stage 0 (plain data parallelism): configs/accelerate/ddp.yaml.

Checkpoints: each engine writes DeepSpeed's own checkpoint (module and per-rank ZeRO partitions)
to checkpoints/deepspeed/{w,u}/step<N>/; then rank 0 writes checkpoints/last.pt naming the step,
and only after that are older step folders deleted. Resuming needs the same process count and
stage: the partitions are DeepSpeed's own (FSDP and replicated checkpoints resume on any count).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .. import files
from ..errors import ConfigError

ZERO_DIR = "deepspeed"
NAMES = ("w", "u")


def zero_from_launch(stage: int, offload: bool) -> tuple[int, bool]:
    """(ZeRO stage, offload): the config's, or an accelerate DeepSpeed launch's (its launcher
    exports the config as ACCELERATE_DEEPSPEED_* variables, or names a DeepSpeed JSON file)."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return stage, offload
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path.lower() != "none":
        try:
            zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
            launched = int(zero.get("stage", 0))
            devices = [
                zero.get(k, {}).get("device", "none")
                for k in ("offload_optimizer", "offload_param")
            ]
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ConfigError(
                f"cannot read the DeepSpeed config {path}: {e}. It must be JSON with "
                '"zero_optimization": {"stage": 1, 2 or 3} (numbers, not "auto").'
            ) from e
    else:
        launched = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        devices = [
            env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{k}_DEVICE", "none")
            for k in ("OPTIMIZER", "PARAM")
        ]
    if launched == 0:
        raise ConfigError(
            "DeepSpeed ZeRO stage 0 is plain data parallelism: launch with "
            "configs/accelerate/ddp.yaml instead (the same trajectory, without DeepSpeed)."
        )
    return launched, offload or any(str(d).lower() not in ("none", "") for d in devices)


def check_supported(cfg: Any, copies: int, fsdp: bool | None = None) -> None:
    """Refuse what ZeRO engines cannot run, naming what can (`fsdp`: also set by a launch)."""
    check_config(cfg, copies, fsdp)
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ConfigError(NEEDS_PROCESSES)


NEEDS_PROCESSES = (
    "zero_stage needs several processes: launch with `accelerate launch --config_file "
    "configs/accelerate/deepspeed_zero3.yaml …` (or --num_processes N --multi_gpu with "
    "zero_stage set), or set zero_stage: 0 for one process."
)


def check_config(cfg: Any, copies: int, fsdp: bool | None = None) -> None:
    """The refusals of `check_supported` that the config alone decides (the memory model's too)."""
    if cfg.fsdp if fsdp is None else fsdp:
        raise ConfigError(
            "fsdp and DeepSpeed (zero_stage) both shard u and w: choose one (fsdp: false under a "
            "DeepSpeed launch, or launch with configs/accelerate/fsdp.yaml)."
        )
    if copies != 2:
        raise ConfigError(
            "plain fine-tuning (sft) is not run by DeepSpeed engines: run it in one process, "
            "without the DeepSpeed launch."
        )
    if cfg.method != "scalebio":
        raise ConfigError(
            f"DeepSpeed runs ScaleBiO's two models; method {cfg.method!r} is not written for "
            "DeepSpeed engines: shard it with configs/accelerate/fsdp.yaml (fsdp: true; DoReMi) "
            "or replicate it with configs/accelerate/ddp.yaml."
        )
    if cfg.lisa_active > 0:
        raise ConfigError(
            "LISA cannot run under DeepSpeed ZeRO: ZeRO flattens the trainable parameters into "
            "its partitions once and its optimizer steps all of them, so frozen blocks would "
            "still move. Launch with configs/accelerate/fsdp.yaml (FSDP2 shards parameter by "
            "parameter and runs LISA), or use LoRA (lora_rank, lora_base: copies) under "
            "DeepSpeed."
        )
    if cfg.precision == "bf16-weights":
        raise ConfigError(
            "precision bf16-weights is not run under DeepSpeed ZeRO (its engines would take over "
            "the fp32 masters, a path not tested here): use precision bf16 under DeepSpeed, or "
            "launch with configs/accelerate/fsdp.yaml, which runs bf16-weights."
        )
    if cfg.lora_rank > 0 and cfg.lora_base == "shared":
        raise ConfigError(
            "LoRA on one shared base (lora_base: shared, the default) is not run by DeepSpeed: "
            "its two engines would each own the base. Set lora_base: copies under DeepSpeed, or "
            "launch with configs/accelerate/fsdp.yaml, which shards the shared base."
        )


def ds_config(stage: int, offload: bool, micro_batch: int, world: int) -> dict[str, Any]:
    """The DeepSpeed config of one copy: the trainer owns optimizer, schedule and precision."""
    zero: dict[str, Any] = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # backward accumulates; step() is the boundary
        "gradient_clipping": 1.0,  # replaced every step (clip_at)
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW / SGD, as without DeepSpeed
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class EngineOptimizer:
    """The state's optimizer of u or w under DeepSpeed: learning rates go to the ZeRO optimizer,
    step() is the engine's (reduce, clip, update, zero the gradients)."""

    def __init__(self, engine: Any):
        self.engine = engine

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the engine zeroes its gradients after every step."""

    def step(self) -> None:
        self.engine.step()

    def state_dict(self) -> dict:
        raise TypeError("ZeRO optimizer states are saved per rank by zero.save (DeepSpeed).")


def _prepare(device: torch.device) -> None:
    """DeepSpeed logs every initialisation at INFO: keep its warnings only. On a CPU, skip its
    shared-memory all-reduce kernel, which it would JIT-compile with a C++ compiler on first use:
    it serves inference collectives, and training reduces through gloo anyway."""
    import deepspeed.ops  # optional, as in make_engines
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def make_engines(
    state: Any, stage: int, offload: bool, micro_batch: int, world: int, device: torch.device
) -> None:
    """Wrap u and w (and their optimizers, built already) in DeepSpeed engines, in place."""
    try:  # deepspeed is optional (the `deepspeed` extra): imported only for a DeepSpeed launch
        import deepspeed
    except ImportError as e:
        raise ConfigError(
            "a DeepSpeed launch needs the deepspeed package: pip install deepspeed (or launch "
            "with configs/accelerate/fsdp.yaml, which needs nothing more)."
        ) from e
    _prepare(device)
    config = ds_config(stage, offload, micro_batch, world)
    for name in NAMES:
        model, opt = getattr(state, name), getattr(state, f"opt_{name}")
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        setattr(state, name, engine)
        setattr(state, f"opt_{name}", EngineOptimizer(engine))


# ------------------------------------------------------------------ checkpoints


def _dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / files.CHECKPOINTS / ZERO_DIR / name


def _tag(step: int) -> str:
    return f"step{step:07d}"


def save(state: Any, run_dir: Path) -> None:
    """Every rank: DeepSpeed's checkpoint of w and u (collective)."""
    for name in NAMES:
        d = _dir(run_dir, name)
        d.mkdir(parents=True, exist_ok=True)
        getattr(state, name).save_checkpoint(str(d), tag=_tag(state.step), save_latest=False)


def drop_old(run_dir: Path, step: int) -> None:
    """Rank 0, after last.pt names `step`: delete the other steps' folders (DeepSpeed's
    zero_to_fp32.py beside them stays)."""
    for name in NAMES:
        for d in _dir(run_dir, name).iterdir():
            if d.is_dir() and d.name != _tag(step):
                shutil.rmtree(d)


def load(state: Any, run_dir: Path, step: int, world: int, stage: int, saved: dict) -> None:
    if saved.get("world") != world or saved.get("stage") != stage:
        raise ConfigError(
            f"the checkpoint in {run_dir} was written by {saved.get('world')} processes at "
            f"ZeRO stage {saved.get('stage')}, and this run has {world} at stage {stage}: resume "
            f"with --num_processes {saved.get('world')} and the same DeepSpeed config (its ZeRO "
            "partitions are DeepSpeed's own, read back only as they were written; FSDP and "
            "replicated checkpoints resume on any number of processes)."
        )
    for name in NAMES:
        d = _dir(run_dir, name) / _tag(step)
        if not d.is_dir():
            raise ConfigError(
                f"{d} is missing: the DeepSpeed checkpoint of step {step} is incomplete. "
                f"Restore {d.parent}, or start a new out_dir."
            )
        path, _ = getattr(state, name).load_checkpoint(
            str(d.parent),
            tag=_tag(step),
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise ConfigError(f"DeepSpeed could not load {d}: restore it, or start a new out_dir.")
