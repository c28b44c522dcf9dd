"""The one training loop of every method, and the run folder it writes and resumes.

A method (ScaleBiO, the fixed mixtures, DoReMi, plain fine-tuning) supplies its steps as a
`Method`; `run_loop` owns everything around them: the progress bar, the NaN stop, the
trajectory and timing logs, the tracker, the checkpoint cadence and the callback. `run` adds the
run folder of DESIGN §5: a new run writes config.yaml, an empty trajectory and a first
checkpoint; a resumed one loads its checkpoint and drops the log lines after it, so it continues
the identical trajectory.
"""

from __future__ import annotations

import json
import sys
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
    learns_weights: bool
    """Whether its steps learn the weights p (a convergence verdict ends the run)."""

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
RESUME_CHANGEABLE = ("lr_w", "lr_u", "lr_lam", "alpha")
"""Config keys a resume may change with a record (changes.jsonl, and each row's lr_w, lr_u,
alpha): the learning rates and α, what a stop on a non-finite loss advises lowering."""


def _agree(ok: bool, dist_ready: bool, device: torch.device) -> bool:
    """Whether every process had `ok` (an all-reduce of failures when several run; on the
    device, which NCCL needs)."""
    if not dist_ready:
        return ok
    bad = torch.tensor([0.0 if ok else 1.0], device=device)
    torch.distributed.all_reduce(bad)
    return bad.item() == 0


def prepare_run_dir(cfg: TrainConfig, resume: bool) -> tuple[Path, str, dict]:
    """The run folder, checked before anything is built. Returns (folder, what to do, the
    changed learning rates): "new" (a new run), "restart" (a run stopped before its first
    checkpoint: it starts again at step 0) or "resume" (from its checkpoint, with the same
    config up to `RESUME_CHANGEABLE`)."""
    run_dir = Path(cfg.out_dir)
    runs.check_out_dir(run_dir)
    has_ckpt = (run_dir / runs.CHECKPOINT).exists()
    started = any((run_dir / f).exists() for f in (runs.LOCK, runs.CONFIG, runs.TRAJECTORY))
    traj = run_dir / runs.TRAJECTORY
    empty = not traj.exists() or not traj.read_text().strip()
    if not has_ckpt:
        if started and empty:
            return run_dir, "restart", {}
        if resume:
            raise ConfigError(
                f"cannot resume: {run_dir / runs.CHECKPOINT} does not exist"
                + ("" if started else f" and {run_dir} holds no run")
                + ". Start the run without --resume"
                + (" in a new out_dir." if started else ".")
            )
        if started:
            raise ConfigError(
                f"{run_dir} already holds a run (a trajectory without a checkpoint); nothing was "
                "overwritten. Choose another out_dir."
            )
        return run_dir, "new", {}
    if not resume:
        raise ConfigError(
            f"{run_dir} already holds a run (trajectory or checkpoint); nothing was "
            "overwritten. Pass --resume to continue it, or choose another out_dir."
        )
    old = TrainConfig.from_dict(
        runs.load_yaml((run_dir / runs.CONFIG).read_text(), run_dir / runs.CONFIG)
    ).to_dict()
    new = cfg.to_dict()
    diff = runs.config_diff(old, new, ignore=RESUME_IGNORED + RESUME_CHANGEABLE)
    if diff:
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from the run's config.yaml:\n  "
            + "\n  ".join(diff)
            + "\nResume with the run's own config (python -m scalebio_core train --config "
            f"{run_dir / runs.CONFIG} --resume; learning rates and alpha may change: "
            f"{', '.join(RESUME_CHANGEABLE)}), or start a new out_dir."
        )
    changed = {k: [old.get(k), new.get(k)] for k in RESUME_CHANGEABLE if old.get(k) != new.get(k)}
    return run_dir, "resume", changed


def _say(dist: Local, text: str) -> None:
    if dist.is_main:
        print(text, file=sys.stderr, flush=True)


def open_run(
    cfg: TrainConfig, resume: bool, build: Callable[[TrainConfig, Any], Method]
) -> tuple[Method, Path, int, runs.RunLock | None]:
    """Lock and check the folder, build the method (`build(cfg, accelerator)`), then start or
    resume the run folder. Returns (method, run folder, first step, the lock to release)."""
    accelerator = make_accelerator(cfg)
    ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    run_dir, mode, changed = prepare_run_dir(cfg, resume)  # every rank reads the same …
    accelerator.wait_for_everyone()  # … before rank 0 locks and writes anything
    lock, error = None, None
    try:
        if accelerator.is_main_process:
            lock = runs.RunLock(run_dir).acquire()
            if lock.previous:
                print(
                    f"{run_dir}: taking over the lock of a run that is gone ({lock.previous})",
                    file=sys.stderr,
                    flush=True,
                )
            if mode != "resume" and (run_dir / runs.CHECKPOINT).exists():
                lock.release()  # another run started and checkpointed here since the check
                raise ConfigError(
                    f"{run_dir} already holds a run (written while this one started); nothing "
                    "was overwritten. Choose another out_dir."
                )
    except ConfigError as e:
        error = e
    if not _agree(error is None, ready, accelerator.device):
        raise error or ConfigError(f"{run_dir}: the main process could not lock it (above).")
    try:
        torch.manual_seed(cfg.seed)
        method = build(cfg, accelerator)
        dist = method.dist
        if mode == "resume":
            start = method.load(run_dir)
            dist.barrier()
            if dist.is_main:
                for log in (runs.TRAJECTORY, runs.TIMING):
                    runs.JsonlLog(run_dir / log).truncate_to(start)
                runs.clean_temporary(run_dir)
                if changed:
                    runs.write_yaml(run_dir / runs.CONFIG, cfg.to_dict())
                    runs.JsonlLog(run_dir / runs.CHANGES).append({"step": start, **changed})
            what = "; ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            _say(dist, f"resuming {run_dir} at step {start}" + (f" ({what})" if what else ""))
            return method, run_dir, start, lock
        if mode == "restart":
            _say(
                dist,
                f"{run_dir} holds a run stopped before its first checkpoint: starting it again "
                "at step 0.",
            )
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            runs.clean_temporary(run_dir)
            runs.write_yaml(run_dir / runs.CONFIG, cfg.to_dict())
            (run_dir / runs.TRAJECTORY).write_text("")
            (run_dir / runs.TIMING).unlink(missing_ok=True)
        method.save(run_dir, method.weights())
        return method, run_dir, 0, lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def write_verdict(run_dir: Path, weighted: bool) -> dict | None:
    """The convergence verdict of a finished run (`runs.convergence`) into verdict.json, and
    said on stderr; None for a run without weights to learn."""
    rows = runs.read_jsonl(run_dir / runs.TRAJECTORY)
    if not weighted or not rows or not isinstance(rows[0].get("p"), dict):
        return None
    verdict = runs.convergence(rows)
    runs.write_json(run_dir / runs.VERDICT, verdict)
    print(f"{run_dir}: {verdict['text']}", file=sys.stderr, flush=True)
    return verdict


def run(
    cfg: TrainConfig,
    build: Callable[[TrainConfig, Any], Method],
    resume: bool = False,
    progress: bool = True,
    callback: Callback | None = None,
) -> dict[str, float]:
    """Run (or resume) a method into cfg.out_dir; returns its final weights (weights.json)."""
    method, run_dir, start, lock = open_run(cfg, resume, build)
    table = getattr(method.setup, "table", "")
    if progress and table:
        _say(method.dist, table)
    try:
        run_loop(method, cfg, run_dir, start, progress, callback)
        weights = method.weights()
        if method.dist.is_main:
            runs.write_json(run_dir / runs.WEIGHTS, weights)
            write_verdict(run_dir, method.learns_weights and len(weights) > 1)
        method.dist.barrier()
    finally:
        if lock is not None:
            lock.release()
    return weights


# ------------------------------------------------------------------ the loop


def _stopped(e: NonFiniteLossError, t: int, run_dir: Path, method: Method) -> str:
    if method.checkpoints:
        kept = (
            f"The last good state (before step {t}) is saved in {run_dir / runs.CHECKPOINT} and "
            f"{run_dir / runs.WEIGHTS}; "
        )
        then = (
            f"Resume after lowering {method.advice}, e.g. python -m scalebio_core train "
            f"--config {run_dir / runs.CONFIG} --resume {method.advice.split('/')[0]}=… (the "
            f"change is recorded in {runs.CHANGES})."
        )
    else:
        kept, then = "", f"Run it again after lowering {method.advice}."
    held = f"trajectory.jsonl holds steps 0..{t - 1}."
    return f"{e}\nStopped at step {t} ({method.desc}). {kept}{held} {then}"


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """The run config as a tracker's hyperparameters take it: numbers, flags and names as they
    are; None, lists and mappings as their JSON text (TensorBoard refuses anything else)."""
    return {
        k: v if isinstance(v, int | float | str | bool) else json.dumps(v)
        for k, v in cfg.to_dict().items()
    }


def _tracked(row: dict) -> dict[str, float]:
    """The scalars of a row, and its per-source values (the weights p, the losses of w and u)
    as <key>/<source>, for a tracker."""
    out = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
    for key in ("p", "loss_w", "loss_u"):
        if isinstance(row.get(key), dict):
            out.update({f"{key}/{n}": v for n, v in row[key].items()})
    return out


PLAIN_LINES, PLAIN_SECONDS = 20, 60.0
"""Without a terminal, the progress is one line per 1/20 of the run, or per minute."""


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
        dist.accelerator.init_trackers(Path(cfg.out_dir).name, config=_tracker_config(cfg))
    shown = progress and dist.is_main
    plain = shown and not sys.stderr.isatty()  # a log file or a pipe: lines, not a redrawn bar
    every, began, last = max(1, method.total // PLAIN_LINES), time.perf_counter(), 0.0
    bar = tqdm(
        range(start, method.total),
        initial=start,
        total=method.total,
        disable=not shown or plain,
        desc=method.desc,
        dynamic_ncols=True,
    )
    try:
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
            if progress and not plain:
                bar.set_postfix_str(method.postfix(row))
            now = time.perf_counter() - began
            due = (t + 1) % every == 0 or t + 1 == method.total or now - last >= PLAIN_SECONDS
            if plain and due:
                last, done = now, t + 1 - start
                eta = now / done * (method.total - t - 1)
                print(
                    f"{method.desc}: step {t + 1}/{method.total}, {method.postfix(row)} "
                    f"({now:.0f} s, about {eta:.0f} s to go)",
                    file=sys.stderr,
                    flush=True,
                )
            if callback is not None:
                callback(row, method.setup)
    finally:  # a stopped run keeps what the tracker received
        if tracking:
            dist.accelerator.end_training()
