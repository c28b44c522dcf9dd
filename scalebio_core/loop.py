"""The one training loop of every method, and the run folder it writes and resumes.

A method (ScaleBiO, the fixed mixtures, DoReMi, plain fine-tuning) supplies its steps as a
`Method`; `run_loop` owns everything around them: the progress bar, the NaN stop, the
trajectory and timing logs, the tracker, the checkpoint cadence and the callback. `run` adds the
run folder of DESIGN §5: a new run writes config.yaml, an empty trajectory and a first
checkpoint; a resumed one loads its checkpoint and drops the log lines after it, so it continues
the identical trajectory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from . import runs
from .config import TrainConfig
from .distributed import Local
from .engines import make_accelerator
from .errors import ConfigError, NonFiniteLossError, TrainingStopped

Callback = Callable[[dict, Any], None]
"""callback(row, setup): after every step, with the trajectory row and the method's `Setup`."""


class Method(Protocol):
    """One method's steps, as `run_loop` runs them."""

    desc: str
    """Its name in the progress bar and in messages."""
    total: int
    """Steps of the whole run (rows of a finished trajectory.jsonl)."""
    dist: Local
    """Its distribution: the main process writes the logs."""
    setup: Any
    """The `build.Setup` its steps read (None for a method without models)."""
    checkpoints: bool
    """Whether `save` writes a checkpoint that a run can resume from."""
    advice: str
    """What to lower after a non-finite loss."""

    def step(self, t: int) -> tuple[dict, int]:
        """Run step t; returns its trajectory row and its tokens (every process)."""

    def weights(self) -> dict[str, float]:
        """The method's product now: weights by source (weights.json)."""

    def postfix(self, row: dict) -> str:
        """What the progress bar shows after a step."""

    def save(self, run_dir: Path, weights: dict[str, float]) -> None:
        """Checkpoint (every rank calls it)."""

    def load(self, run_dir: Path) -> int:
        """Load the checkpoint; returns the step to continue from."""


# ------------------------------------------------------------------ the run folder

RESUME_IGNORED = ("out_dir", "tracker", "cpu_malloc", "fsdp_offload", "zero_offload")
"""Config keys a resume may change: where and how the run is written or held, not what it does."""


def prepare_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    """The run folder, checked before anything is built: a resume needs a checkpoint and the
    same config; a new run needs a folder without one."""
    run_dir = Path(cfg.out_dir)
    has_run = (run_dir / runs.TRAJECTORY).exists() or (run_dir / runs.CHECKPOINT).exists()
    if resume:
        if not (run_dir / runs.CHECKPOINT).exists():
            raise ConfigError(
                f"cannot resume: {run_dir / runs.CHECKPOINT} does not exist. Start "
                "the run without --resume."
            )
        old = TrainConfig.from_dict(runs.load_yaml((run_dir / runs.CONFIG).read_text()))
        diff = runs.config_diff(old.to_dict(), cfg.to_dict(), ignore=RESUME_IGNORED)
        if diff:
            raise ConfigError(
                f"cannot resume {run_dir}: the config differs from the run's config.yaml:\n  "
                + "\n  ".join(diff)
                + "\nResume with the run's own config (python -m scalebio_core train --config "
                f"{run_dir / runs.CONFIG} --resume), or start a new out_dir."
            )
    elif has_run:
        raise ConfigError(
            f"{run_dir} already holds a run (trajectory or checkpoint); nothing was "
            "overwritten. Pass --resume to continue it, or choose another out_dir."
        )
    return run_dir


def open_run(
    cfg: TrainConfig, resume: bool, build: Callable[[TrainConfig, Any], Method]
) -> tuple[Method, Path, int]:
    """Check the folder, build the method (`build(cfg, accelerator)`), then start or resume the
    run folder. Returns (method, run folder, first step)."""
    accelerator = make_accelerator(cfg)
    run_dir = prepare_run_dir(cfg, resume)  # every rank reads the same folder …
    accelerator.wait_for_everyone()  # … before rank 0 writes anything
    torch.manual_seed(cfg.seed)
    method = build(cfg, accelerator)
    if resume:
        start = method.load(run_dir)
        method.dist.barrier()
        if method.dist.is_main:
            for log in (runs.TRAJECTORY, runs.TIMING):
                runs.JsonlLog(run_dir / log).truncate_to(start)
        return method, run_dir, start
    if method.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_yaml(run_dir / runs.CONFIG, cfg.to_dict())
        (run_dir / runs.TRAJECTORY).write_text("")
    method.save(run_dir, method.weights())
    return method, run_dir, 0


def run(
    cfg: TrainConfig,
    build: Callable[[TrainConfig, Any], Method],
    resume: bool = False,
    progress: bool = True,
    callback: Callback | None = None,
) -> dict[str, float]:
    """Run (or resume) a method into cfg.out_dir; returns its final weights (weights.json)."""
    method, run_dir, start = open_run(cfg, resume, build)
    run_loop(method, cfg, run_dir, start, progress, callback)
    weights = method.weights()
    if method.dist.is_main:
        runs.write_json(run_dir / runs.WEIGHTS, weights)
    method.dist.barrier()
    return weights


# ------------------------------------------------------------------ the loop


def _stopped(e: NonFiniteLossError, t: int, run_dir: Path, method: Method) -> str:
    if method.checkpoints:
        kept = (
            f"The last good state (before step {t}) is saved in {run_dir / runs.CHECKPOINT} and "
            f"{run_dir / runs.WEIGHTS}; "
        )
        then = f"Resume with --resume after lowering {method.advice}."
    else:
        kept, then = "", f"Run it again after lowering {method.advice}."
    held = f"trajectory.jsonl holds steps 0..{t - 1}."
    return f"{e}\nStopped at step {t} ({method.desc}). {kept}{held} {then}"


def _tracked(row: dict) -> dict[str, float]:
    """The scalars of a row, and the weights as p/<source>, for a tracker."""
    out = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
    if isinstance(row.get("p"), dict):
        out.update({f"p/{n}": v for n, v in row["p"].items()})
    return out


def run_loop(
    method: Method,
    cfg: TrainConfig,
    run_dir: Path,
    start: int = 0,
    progress: bool = True,
    callback: Callback | None = None,
) -> None:
    """Steps start … method.total − 1: rows to trajectory.jsonl and timing.jsonl (main process),
    the tracker, a checkpoint every cfg.checkpoint_every steps and after the last, the callback.
    A non-finite loss checkpoints the last good state and raises `TrainingStopped`."""
    dist = method.dist
    traj, timing = runs.JsonlLog(run_dir / runs.TRAJECTORY), runs.JsonlLog(run_dir / runs.TIMING)
    tracking = cfg.tracker != "none"
    if tracking:
        dist.accelerator.init_trackers(Path(cfg.out_dir).name, config=cfg.to_dict())
    bar = tqdm(
        range(start, method.total),
        initial=start,
        total=method.total,
        disable=not (progress and dist.is_main),
        desc=method.desc,
        dynamic_ncols=True,
    )
    for t in bar:
        t0 = time.perf_counter()
        try:
            row, tokens = method.step(t)
        except NonFiniteLossError as e:
            method.save(run_dir, method.weights())  # the state is untouched: the last good one
            raise TrainingStopped(_stopped(e, t, run_dir, method)) from e
        seconds = time.perf_counter() - t0
        if dist.is_main:
            traj.append(row)
            timing.append(
                {"step": t, "seconds": seconds, "tokens": tokens, "world_size": dist.world}
            )
        if tracking:
            dist.accelerator.log(_tracked(row), step=t)
        if (t + 1) % cfg.checkpoint_every == 0 or t + 1 == method.total:
            method.save(run_dir, method.weights())
        if progress:
            bar.set_postfix_str(method.postfix(row))
        if callback is not None:
            callback(row, method.setup)
    if tracking:
        dist.accelerator.end_training()
