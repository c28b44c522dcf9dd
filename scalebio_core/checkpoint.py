"""Checkpoints of a run: checkpoints/last.pt (the state, RNG states), weights.json, and the
per-rank parts of sharded engines, written in an order that a crash at any moment cannot break.

Order of a save: every rank writes its part of u, w and their optimizers (sharded engines only,
`Distribution.save_models`); then rank 0 writes last.pt, which names the step, and weights.json;
only then are the parts of older steps deleted. last.pt holds lam, its optimizer, the step and
the RNG states, and for a replicated run (one process or DDP) also u, w and their optimizers.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from . import runs
from .build import Setup
from .errors import ConfigError


def save(s: Setup, run_dir: Path, weights: dict[str, float]) -> None:
    """Checkpoint the run (collective: every rank calls it); `weights` go to weights.json."""
    dist = s.dist
    dist.barrier()
    if dist.sharded:
        dist.save_models(s.state, run_dir)
        dist.barrier()
    if dist.is_main:
        sd = s.state.state_dict(models=not dist.sharded)
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
        runs.save_torch(run_dir / runs.CHECKPOINT, sd)
        runs.write_json(run_dir / runs.WEIGHTS, weights)
    if dist.sharded:
        dist.barrier()  # last.pt names the new parts: the old ones can go
        dist.drop_old(run_dir, s.state.step)


def load(s: Setup, run_dir: Path) -> int:
    """Load the run's checkpoint into `s` (every rank); returns the step to continue from."""
    where = "cpu" if s.device.type == "cpu" else s.device  # gloo ranks are 'cpu:<rank>'
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
    saved = sd["shards"].get("engine", "fsdp") if "shards" in sd else "replicated"
    if saved != s.dist.engine:
        raise ConfigError(
            f"{run_dir / runs.CHECKPOINT} was written by a {saved} run and this one is "
            f"{s.dist.engine}: resume it the way it was launched."
        )
    step = int(sd["step"])
    s.state.load_state_dict(sd)
    s.dist.load_models(s.state, run_dir, step, sd.get("shards"))
    if s.lisa is not None:  # the flags of the step's period; state of frozen blocks dropped as
        for lisa, opt in zip(s.lisa, (s.state.opt_w, s.state.opt_u)):  # an unbroken run has
            lisa.apply(step, opt)
    torch.set_rng_state(sd["rng"]["torch"].cpu())
    random.setstate(sd["rng"]["python"])
    np.random.set_state(sd["rng"]["numpy"])
    if "cuda" in sd["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(sd["rng"]["cuda"])
    return step
