"""Checkpoints of a run: checkpoints/last.pt (the state, RNG states), weights.json, and the
per-rank parts of sharded engines, written in an order that a crash at any moment cannot break.

Order of a save: every rank writes its part of u, w and their optimizers (sharded engines only,
`Distribution.save_models`); then rank 0 writes last.pt, which names the step, and weights.json;
only then are the parts of older steps deleted. last.pt holds lam, its optimizer, the step and
the RNG states, and for a replicated run (one process or DDP) also u, w and their optimizers;
and the identity of its run (`identity.py`), which a resume checks before it loads anything.

Resuming on another number of processes: an FSDP or replicated checkpoint resumes in any FSDP or
replicated run, on any number of processes (`sharding.load_parts` gives each rank its rows of
every tensor), e.g. FSDP on 8 GPUs, then 4, then one process. What else the checkpoint holds
does not depend on the process count: the sampler draws the global batch of a step from (seed,
step) alone and each rank takes every world-th sample of it; λ and its optimizer, the step and
LISA's draws (a function of seed and period) are the same on every rank. The RNG states are
the main process's, restored on every rank (as on the same count: every rank was seeded alike
and runs no dropout); CUDA states only for the devices both machines have. A DeepSpeed ZeRO
checkpoint (DeepSpeed's own partitions) resumes only on the count and stage that wrote it.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .. import files, messages
from ..errors import ConfigError
from ..parallel import sharding
from . import runs
from .build import Setup
from .identity import data_changes, differences

ENGINE_KEYS = ("fsdp", "packing", "micro_tokens")
"""Config keys that say only how the work is laid out, not what it computes (an FSDP run follows
the one-process trajectory; packed and split micro-batches give the padded ones' losses): a
resume may change them, taking an FSDP checkpoint to one process (fsdp=false) or a replicated
one into FSDP, or bounding micro_tokens on a smaller machine. Not in `identity.RESUME_IGNORED`,
which also keys the lab's finished runs: they keep their keys."""
DEEPSPEED = "deepspeed"
"""The engine whose checkpoint only it reads (on the count and stage that wrote it)."""


def save(s: Setup, run_dir: Path, weights: dict[str, float]) -> None:
    """Checkpoint the run (collective: every rank calls it); `weights` go to weights.json."""
    dist = s.dist
    dist.barrier()
    if dist.sharded:
        dist.save_models(s.state, run_dir)
        dist.barrier()
    if dist.is_main:
        sd = s.state.state_dict(models=not dist.sharded)
        sd["identity"] = s.identity()
        meta = dist.checkpoint_meta()
        if meta is not None:
            sd["shards"] = meta
        sd["rng"] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if torch.cuda.is_available():
            sd["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        files.save_torch(run_dir / runs.CHECKPOINT, sd)
        files.write_json(run_dir / runs.WEIGHTS, weights)
        if not dist.sharded:  # last.pt holds the models now: shards resumed from are stale
            sharding.drop_shards(run_dir)
    if dist.sharded:
        dist.barrier()  # last.pt names the new parts: the old ones can go
        dist.drop_old(run_dir, s.state.step)


def load(s: Setup, run_dir: Path, accept_data_change: bool = False) -> tuple[int, dict]:
    """Load the run's checkpoint into `s` (every rank): (the step to continue from, the changes
    of the data files it accepted, {file: [SHA-256 then, now]}).

    A checkpoint of another run (its config, model or data differ from this run's) is refused
    before anything is loaded, naming what differs; changed data files are accepted only with
    `accept_data_change`."""
    # gloo ranks are 'cpu:<rank>'; a sharded run takes its rows of whole tensors on the CPU
    where = "cpu" if s.device.type == "cpu" or s.dist.sharded else s.device
    path = run_dir / runs.CHECKPOINT
    try:
        sd = torch.load(path, map_location=where, weights_only=False)
    except Exception as e:  # a truncated or damaged file: torch's zip and unpickling errors
        raise ConfigError(
            f"cannot resume: {path} is unreadable ({type(e).__name__}: {str(e)[:200]}). Nothing "
            f"was changed; {run_dir / runs.TRAJECTORY} keeps the steps run so far. Only the "
            "last checkpoint is kept, so go on with a new run: python -m scalebio_core train "
            f"--config {run_dir / runs.CONFIG} out_dir=NEW_FOLDER."
        ) from e
    if not isinstance(sd, dict) or "step" not in sd:
        raise ConfigError(f"cannot resume: {path} is not a checkpoint of this package.")
    changes = check_identity(sd.get("identity"), s.identity(), path, accept_data_change)
    meta = sd.get("shards")
    saved = meta.get("engine", "fsdp") if meta is not None else "replicated"
    engine = s.dist.engine
    if saved != engine and DEEPSPEED in (saved, engine):
        raise ConfigError(
            f"{run_dir / runs.CHECKPOINT} was written by a {saved} run and this one is "
            f"{engine}: resume it the way it was launched. A DeepSpeed ZeRO checkpoint holds "
            "DeepSpeed's own partitions, which only DeepSpeed reads (FSDP and replicated "
            "checkpoints resume in either engine, on any number of processes)."
        )
    step = int(sd["step"])
    whole = {k: sd.pop(k) for k in sharding.PARTS if k in sd}  # a replicated checkpoint's
    try:
        if saved == "replicated" and not s.dist.sharded:  # whole models into whole models
            s.state.load_state_dict({**sd, **whole})
        else:
            s.state.load_state_dict(sd)  # λ, its optimizer, the step
            if saved != DEEPSPEED:  # FSDP shards of any count, or whole tensors
                parts = (
                    [whole] if meta is None else sharding.saved_parts(run_dir, step, meta["world"])
                )
                sharding.load_parts(s.state, parts)
    except (RuntimeError, KeyError) as e:  # a checkpoint of an older version without identity
        raise ConfigError(
            f"cannot resume: {path} does not fit this run's model ({str(e).splitlines()[0]}"
            f"…). It was written for another model (size); put back this run's checkpoint, or "
            "start a new out_dir."
        ) from e
    if saved == DEEPSPEED:  # its engines read their own partitions
        s.dist.load_models(s.state, run_dir, step, meta)
    if s.lisa is not None:  # the flags of the step's period; state of frozen blocks dropped as
        for lisa, opt in zip(s.lisa, (s.state.opt_w, s.state.opt_u)):  # an unbroken run has
            lisa.apply(step, opt)
    torch.set_rng_state(sd["rng"]["torch"].cpu())
    random.setstate(sd["rng"]["python"])
    np.random.set_state(sd["rng"]["numpy"])
    if "cuda" in sd["rng"] and torch.cuda.is_available():  # the devices both machines have
        cuda = sd["rng"]["cuda"]
        for i in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[i].cpu(), i)
    return step, changes


def check_identity(
    saved: dict | None, now: dict, path: Path, accept_data_change: bool = False
) -> dict[str, list]:
    """Refuse a checkpoint (`path`, its identity `saved`) that belongs to another run than `now`,
    naming what differs; returns the data changes accepted (`accept_data_change`)."""
    if saved is None:
        messages.warn(
            f"{path} was written by an older version, without its run's identity: whether it "
            "belongs to this run (config, model, data) cannot be checked.",
            stacklevel=3,
        )
        return {}
    diff = differences(_held_anyhow(saved), _held_anyhow(now))
    other = [*diff.get("config", []), *diff.get("model", [])]
    if other:
        raise ConfigError(
            f"cannot resume: {path} belongs to another run (copied from another run folder?):\n  "
            + "\n  ".join(other)
            + "\nNothing was changed. Put back this run's own checkpoint, or resume the run it "
            "came from in its own folder."
        )
    if diff.get("data") and not accept_data_change:
        raise ConfigError(
            f"cannot resume: the data differs from what the run read until its checkpoint "
            f"({path}):\n  "
            + "\n  ".join(diff["data"])
            + "\nNothing was changed. Put the data back as it was, or, to go on with the "
            "changed data, resume with --accept-changed-data (train(..., "
            "accept_data_change=True)): the change is recorded in changes.jsonl."
        )
    return data_changes(saved, now) if diff.get("data") else {}


def _held_anyhow(identity: dict) -> dict:
    """An identity without the config keys of `ENGINE_KEYS`."""
    config = {k: v for k, v in identity.get("config", {}).items() if k not in ENGINE_KEYS}
    return {**identity, "config": config}
