"""The one training loop of every method, and the run folder it writes and resumes.

A method (ScaleBiO, the fixed mixtures, DoReMi, plain fine-tuning) supplies its steps as a
`Method`; `run_loop` owns everything around them: the progress bar, the NaN stop, the
trajectory and timing logs, the tracker, the checkpoint cadence and the callback. `run` adds the
run folder of docs/run-folder.md: a new run writes config.yaml, an empty trajectory and a first
checkpoint; a resumed one loads its checkpoint and drops the log lines after it, so it continues
the identical trajectory.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .. import files
from ..core.distributed import RunDistribution
from ..errors import ConfigError, Interrupted, NonFiniteLossError, TrainingStopped
from ..parallel.engines import make_accelerator, processes
from . import convergence, nullband, runs
from .checkpoint import ENGINE_KEYS
from .config import TrainConfig, read_run_config
from .identity import IDENTITY, RESUME_CHANGEABLE, RESUME_IGNORED

Callback = Callable[[dict, Any], None]
"""callback(row, setup): after every step, with the trajectory row and the method's `Setup`."""


class Method(Protocol):
    """One method's steps, as `run_loop` runs them."""

    desc: str
    """Its name in the progress bar and in messages."""
    total: int
    """Steps of the whole run (rows of a finished trajectory.jsonl)."""
    dist: RunDistribution
    """Its distribution: the main process writes the logs."""
    setup: Any
    """The `build.Setup` its steps read (None for a method without models)."""
    checkpoints: bool
    """Whether `save` writes a checkpoint that a run can resume from."""
    advice: str
    """What to lower after a non-finite loss."""
    learns_weights: bool
    """Whether its steps learn the weights p (a convergence verdict ends the run)."""
    recorded_config: dict | None
    """What config.yaml records, when it is more than the run config (sft: its token budget
    and the steps that budget gave); None: the run config."""

    def step(self, t: int) -> tuple[dict, int]:
        """Run step t; returns its trajectory row and its tokens (every process)."""

    def weights(self) -> dict[str, float]:
        """The method's product now: weights by source (weights.json)."""

    def postfix(self, row: dict) -> str:
        """What the progress bar shows after a step."""

    def save(self, run_dir: Path, weights: dict[str, float]) -> None:
        """Checkpoint (every rank calls it)."""

    def load(self, run_dir: Path, accept_data_change: bool = False) -> tuple[int, dict]:
        """Load the checkpoint (refusing one of another run): (the step to continue from, the
        data changes accepted, {file: [SHA-256 then, now]})."""


# ------------------------------------------------------------------ the run folder


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
    old = read_run_config(run_dir).to_dict()
    new = cfg.to_dict()
    diff = runs.config_diff(old, new, ignore=RESUME_IGNORED + ENGINE_KEYS + RESUME_CHANGEABLE)
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


def _say(dist: RunDistribution, text: str) -> None:
    if dist.is_main:
        print(text, file=sys.stderr, flush=True)


def open_run(
    cfg: TrainConfig,
    resume: bool,
    build: Callable[[TrainConfig, Any], Method],
    accept_data_change: bool = False,
    fresh: bool = False,
) -> tuple[Method, Path, int, runs.RunLock | None]:
    """Lock and check the folder, build the method (`build(cfg, accelerator)`), then start or
    resume the run folder. Returns (method, run folder, first step, the lock to release).
    A resume refuses a checkpoint of another run and damaged logs before it changes a file.
    `fresh`: a run that is never resumed, into a folder its caller has checked by its own rules
    and cleared of its earlier output (`pipeline.sft`); it starts at step 0."""
    accelerator = make_accelerator(cfg)
    ranks = processes(accelerator)  # the ranks' agreement, before the method's engine exists
    if fresh:
        if resume:
            raise ConfigError("a fresh run (fresh=True) cannot be resumed.")
        run_dir, mode, changed = Path(cfg.out_dir), "new", {}
    else:  # every rank reads the same …
        run_dir, mode, changed = prepare_run_dir(cfg, resume)
    ranks.barrier()  # … before rank 0 locks and writes anything
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
    if not ranks.agree(error is None):
        raise error or ConfigError(f"{run_dir}: the main process could not lock it (above).")
    try:
        torch.manual_seed(cfg.seed)
        method = build(cfg, accelerator)
        if mode == "resume":
            start = _resume_folder(method, cfg, run_dir, changed, accept_data_change)
            return method, run_dir, start, lock
        _start_folder(method, cfg, run_dir, mode)
        return method, run_dir, 0, lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _resume_folder(
    method: Method, cfg: TrainConfig, run_dir: Path, changed: dict, accept_data_change: bool
) -> int:
    """Load the checkpoint (refusing one of another run) and cut the logs to the steps it
    covers (refusing damage inside them), then record what the resume changed; the step to
    continue from."""
    dist = method.dist
    start, data_changed = method.load(run_dir, accept_data_change)
    kept = {  # checked on every rank before any is cut: all refuse, or none
        log: runs.covered_rows(run_dir / log, start)
        for log in (runs.TRAJECTORY, runs.TIMING)
        if log == runs.TRAJECTORY or (run_dir / log).exists()
    }
    dist.barrier()
    if dist.is_main:
        for log, rows in kept.items():  # the steps after the checkpoint run again
            runs.JsonlLog(run_dir / log).rewrite(rows)
        files.clean_temporary(run_dir)
        if changed:
            files.write_yaml(run_dir / runs.CONFIG, cfg.to_dict())
        record = {"step": start, **changed}
        if data_changed:
            record["data"] = data_changed
            files.write_json(run_dir / IDENTITY, method.setup.identity())
        if changed or data_changed:
            runs.JsonlLog(run_dir / runs.CHANGES).append(record)
    what = [f"{k} {a} -> {b}" for k, (a, b) in changed.items()]
    if data_changed:
        what.append("changed data: " + ", ".join(data_changed))
    _say(dist, f"resuming {run_dir} at step {start}" + (f" ({'; '.join(what)})" if what else ""))
    return start


def _start_folder(method: Method, cfg: TrainConfig, run_dir: Path, mode: str) -> None:
    """Write a new run's folder (or restart one stopped before its first checkpoint) and its
    first checkpoint, in an order that leaves the folder recognisably ours at every moment."""
    dist = method.dist
    if mode == "restart":
        _say(
            dist,
            f"{run_dir} holds a run stopped before its first checkpoint: starting it again "
            "at step 0.",
        )
    if dist.is_main:  # trajectory.jsonl before config.yaml: `runs.check_out_dir`
        run_dir.mkdir(parents=True, exist_ok=True)
        files.clean_temporary(run_dir)
        (run_dir / runs.TRAJECTORY).write_text("")
        (run_dir / runs.TIMING).unlink(missing_ok=True)
        record = method.recorded_config
        files.write_yaml(run_dir / runs.CONFIG, cfg.to_dict() if record is None else record)
        if method.setup is not None and method.checkpoints:  # what its checkpoints carry
            files.write_json(run_dir / IDENTITY, method.setup.identity())
    method.save(run_dir, method.weights())


def write_verdict(
    run_dir: Path,
    weighted: bool,
    halves: dict[str, float] | None = None,
    sight: dict | None = None,
) -> dict | None:
    """The convergence verdict of a finished run (`convergence.convergence`) into verdict.json, and
    said on stderr; None for a run without weights to learn. `halves`: the final weights of the
    null band's halves (`nullband`): convergence is judged on the sources (halves summed), and
    the band joins the verdict and null_band.json. `sight`: what the run can tell about its model
    (`evaluation.model_sight`), said after the verdict."""
    rows = runs.read_jsonl(run_dir / runs.TRAJECTORY)
    if not weighted or not rows or not isinstance(rows[0].get("p"), dict):
        return None
    if halves:
        rows = [nullband.combine_row(r) for r in rows]
    verdict = convergence.convergence(rows)
    if halves:
        band = nullband.band(halves)
        files.write_json(run_dir / nullband.NULL_BAND, band)
        verdict["null_band"] = band
        verdict["text"] += f"; {band['summary']}"
    if sight:
        verdict["model_sight"] = sight
        verdict["text"] += "".join(f"; {note}" for note in sight["notes"])
    files.write_json(run_dir / convergence.VERDICT, verdict)
    print(f"{run_dir}: {verdict['text']}", file=sys.stderr, flush=True)
    return verdict


def run(
    cfg: TrainConfig,
    build: Callable[[TrainConfig, Any], Method],
    resume: bool = False,
    progress: bool = True,
    callback: Callback | None = None,
    accept_data_change: bool = False,
    fresh: bool = False,
) -> dict[str, float]:
    """Run (or resume) a method into cfg.out_dir; returns its final weights (weights.json).
    `fresh`: a run that is never resumed, into a folder its caller checked (`open_run`).

    SIGINT and SIGTERM (`caught_signals`) stop it at the next step boundary with a checkpoint,
    raising `Interrupted` (its message holds the resume command); while the run is set up, they
    stop it at once (nothing is trained yet, and every file is written atomically)."""
    with caught_signals() as stop:
        try:
            method, run_dir, start, lock = open_run(cfg, resume, build, accept_data_change, fresh)
        except Interrupted as e:
            raise Interrupted(
                f"{e} while the run was set up: nothing was trained"
                + (", and the checkpoint is as it was" if resume else "")
                + ". Run the same command again to "
                + ("resume." if resume else "start it."),
                e.signum,
            ) from None
        stop.deferred = True
        return _finish(method, cfg, run_dir, start, lock, progress, callback, stop)


def _finish(method, cfg, run_dir, start, lock, progress, callback, stop) -> dict[str, float]:
    """`run` after the run folder is open: the loop, weights.json, the verdict; the lock is
    released on every path."""
    table = getattr(method.setup, "table", "")
    if progress and table:
        _say(method.dist, table)
    try:
        run_loop(method, cfg, run_dir, start, progress, callback, stop)
        weights = method.weights()
        if method.dist.is_main and weights:  # a method without weights (sft) writes none
            files.write_json(run_dir / runs.WEIGHTS, weights)
            halves = getattr(method, "half_weights", lambda: None)()
            sight = getattr(method, "sight", lambda: None)()
            write_verdict(run_dir, method.learns_weights and len(weights) > 1, halves, sight)
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


class _Progress:
    """What a run shows while it steps: a bar on a terminal; without one (a log file, a pipe)
    one plain line per 1/20 of the run or per minute; nothing off the main process."""

    def __init__(self, method: Method, start: int, progress: bool):
        self.method, self.start, self.progress = method, start, progress
        shown = progress and method.dist.is_main
        self.plain = shown and not sys.stderr.isatty()
        self.every = max(1, method.total // PLAIN_LINES)
        self.began, self.last = time.perf_counter(), 0.0
        self.bar = tqdm(
            range(start, method.total),
            initial=start,
            total=method.total,
            disable=not shown or self.plain,
            desc=method.desc,
            dynamic_ncols=True,
        )

    def after(self, t: int, row: dict) -> None:
        m = self.method
        if self.progress and not self.plain:
            self.bar.set_postfix_str(m.postfix(row))
        now = time.perf_counter() - self.began
        due = (t + 1) % self.every == 0 or t + 1 == m.total or now - self.last >= PLAIN_SECONDS
        if self.plain and due:
            self.last, done = now, t + 1 - self.start
            eta = now / done * (m.total - t - 1)
            print(
                f"{m.desc}: step {t + 1}/{m.total}, {m.postfix(row)} "
                f"({now:.0f} s, about {eta:.0f} s to go)",
                file=sys.stderr,
                flush=True,
            )


def run_loop(
    method: Method,
    cfg: TrainConfig,
    run_dir: Path,
    start: int = 0,
    progress: bool = True,
    callback: Callback | None = None,
    stop: CaughtSignals | None = None,
) -> None:
    """Steps start … method.total − 1: rows to trajectory.jsonl and timing.jsonl (main process),
    the tracker, a checkpoint every cfg.checkpoint_every steps and after the last, the callback.
    A non-finite loss checkpoints the last good state and raises `TrainingStopped`; so does a
    full disk, keeping the last good checkpoint. A signal caught by `stop` ends the run at the
    next step boundary, after a checkpoint (`Interrupted`, with the resume command)."""
    dist = method.dist
    traj, timing = runs.JsonlLog(run_dir / runs.TRAJECTORY), runs.JsonlLog(run_dir / runs.TIMING)
    tracking = cfg.tracker != "none"
    if tracking:
        dist.accelerator.init_trackers(Path(cfg.out_dir).name, config=_tracker_config(cfg))
    shown = _Progress(method, start, progress)
    saved, t = start, start  # the step of the last checkpoint; the step under way
    try:
        for t in shown.bar:
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
                saved = t + 1
            shown.after(t, row)
            if callback is not None:
                callback(row, method.setup)
            if stop is not None and stop.agreed(dist):
                if method.checkpoints and saved != t + 1:
                    method.save(run_dir, method.weights())
                    saved = t + 1
                text = _interrupted(stop.name, t + 1, saved, run_dir, method)
                raise Interrupted(text, stop.signum)
    except files.DiskFullError as e:
        raise TrainingStopped(_disk_full(e, t, saved, run_dir, method)) from e
    except Interrupted as e:
        if e.final:
            raise
        raise Interrupted(_interrupted(e.name, t, saved, run_dir, method), e.signum) from None
    finally:  # a stopped run keeps what the tracker received
        if tracking:
            dist.accelerator.end_training()


def _resume_command(run_dir: Path) -> str:
    """The command that resumes the run in `run_dir`, from any folder."""
    config = Path(run_dir).resolve() / runs.CONFIG
    return f"python -m scalebio_core train --config {config} --resume"


def _interrupted(name: str, done: int, saved: int, run_dir: Path, method: Method) -> str:
    """What a run stopped by signal `name` after `done` steps says (the checkpoint at `saved`)."""
    head = f"stopped by {name} after step {done} of {method.total}"
    if not method.checkpoints:
        return f"{head}; {method.desc} keeps no checkpoint: run it again."
    return (
        f"{head}: its checkpoint is at step {saved} "
        f"({Path(run_dir).resolve() / runs.CHECKPOINT}); a resume runs the steps after it "
        f"again. Resume with: {_resume_command(run_dir)}"
    )


def _disk_full(e: OSError, t: int, saved: int, run_dir: Path, method: Method) -> str:
    if not method.checkpoints:
        return f"{e}\nStopped at step {t} ({method.desc}); run it again once there is space."
    return (
        f"{e}\nStopped at step {t} ({method.desc}). The last good checkpoint, step {saved}, is "
        f"kept in {Path(run_dir).resolve() / runs.CHECKPOINT}. Once there is space, resume with: "
        f"{_resume_command(run_dir)}"
    )


# ------------------------------------------------------------------ signals

REPEAT_WINDOW = 2.0
"""Seconds after a first signal in which a second is the same request: a launcher passes on to
its ranks the Ctrl-C they received too (torch's elastic agent does)."""


class CaughtSignals:
    """SIGINT and SIGTERM while a run is open (the handler of `caught_signals`). Until
    `deferred` is set they raise `Interrupted` at once (the run is being set up); then the first
    one is noted, and the loop stops at the next step boundary (`agreed`); another one after
    `REPEAT_WINDOW` seconds raises at once."""

    def __init__(self):
        self.signum: int | None = None
        self.at = 0.0
        self.deferred = False

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def __call__(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signum is not None and now - self.at < REPEAT_WINDOW:
            return
        if self.deferred and self.signum is None:
            self.signum, self.at = signum, now
            return
        raise Interrupted(f"stopped by {signal.Signals(signum).name}", signum, final=False)

    def agreed(self, dist: Any) -> bool:
        """Whether any process caught a signal (every process stops at the same step)."""
        asked = self.signum is not None
        if dist.world > 1:
            asked = float(dist.reduce(torch.tensor([float(asked)])).item()) > 0
            self.signum = self.signum or (signal.SIGTERM if asked else None)
        return asked


@contextlib.contextmanager
def caught_signals() -> Iterator[CaughtSignals]:
    """SIGINT and SIGTERM handled by a `CaughtSignals` inside the block (in the main thread;
    elsewhere signals cannot be caught and nothing changes); the old handlers after it."""
    catcher = CaughtSignals()
    if threading.current_thread() is not threading.main_thread():
        yield catcher
        return
    old = {sig: signal.signal(sig, catcher) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield catcher
    finally:
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
