"""The run directory (DESIGN §5) and the package's one way of writing files atomically.

A run directory holds config.yaml, trajectory.jsonl, timing.jsonl, weights.json, checkpoints/.
Every file of the package is written atomically (a temporary file in the same folder, then
`os.replace`; a folder: a temporary folder, then `os.rename`), so a crash at any moment leaves
either the old or the new version, never a torn one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .errors import ConfigError

CONFIG, TRAJECTORY, WEIGHTS, TIMING = (
    "config.yaml",
    "trajectory.jsonl",
    "weights.json",
    "timing.jsonl",
)
CHECKPOINT = Path("checkpoints") / "last.pt"
LOCK = ".lock"
CHANGES = "changes.jsonl"


class _Loader(yaml.SafeLoader):
    """YAML with '1e-3' read as a number (YAML 1.1 wants '1.0e-3' and reads '1e-3' as text)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str, source: str | Path | None = None) -> Any:
    """YAML text as Python values; a syntax error names `source`, its line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source or 'YAML'}"
        if mark is not None:
            where += f", line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}). Fix the file there.") from e


def _file_mode() -> int:
    """0666 less the process's umask: what `open()` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


TMP_PREFIX = ".tmp-"
"""Temporary files of `atomic_path` (a crash may leave one; `clean_temporary` removes them)."""


def clean_temporary(folder: Path) -> list[Path]:
    """Remove leftover temporary files of atomic writes under `folder`; returns them."""
    found = [p for p in Path(folder).rglob(f"{TMP_PREFIX}*") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600: readable as the folder's other files
        os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except OSError:  # replaced, or the folder is gone: the real error is the one above
            pass


@contextmanager
def atomic_dir(path: Path, complete: Callable[[Path], bool]):
    """Yield a temporary folder beside `path`; on success it becomes `path` in one rename. If
    another process made `path` first, theirs is kept when `complete(path)`, else replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:  # `path` exists: written by another process, or a stale leftover
            if not complete(path):
                shutil.rmtree(path, ignore_errors=True)
                os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def save_torch(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def config_diff(old: dict, new: dict, ignore: Iterable[str] = ()) -> list[str]:
    """Lines `key: old -> new` for every key whose value differs (ignoring `ignore`)."""
    skip = set(ignore)
    keys = sorted((set(old) | set(new)) - skip)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class JsonlLog:
    """Append-only JSON-lines file, flushed and synced after each line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_to(self, n_steps: int) -> None:
        """Keep only rows with step < n_steps (a resume drops what came after its checkpoint)."""
        if not self.path.exists():
            return
        rows = [r for r in read_jsonl(self.path) if r["step"] < n_steps]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by a crash: stop there
                    break
    return rows


def load_trajectory(run_dir: str | Path) -> dict[str, Any]:
    """A run's trajectory as arrays: step, p (steps × K), L1, L2_w, L2_u, gap, alpha, names."""
    run_dir = Path(run_dir)
    path = run_dir / TRAJECTORY
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} is empty: the run has not finished a step yet.")
    names = list(rows[0]["p"])
    out: dict[str, Any] = {"names": names, "step": np.array([r["step"] for r in rows])}
    out["p"] = np.array([[r["p"][n] for n in names] for r in rows])
    for key in ("L1", "L2_w", "L2_u", "gap", "alpha"):
        out[key] = np.array([r.get(key, np.nan) for r in rows], float)
    if (run_dir / WEIGHTS).exists():
        out["weights"] = json.loads((run_dir / WEIGHTS).read_text())
    return out


VERDICT = "verdict.json"
SETTLED_SHARE, UNMOVED, MIN_STEPS, DRIFT_Z = 0.1, 0.01, 40, 3.0


def convergence(rows: list[dict], tail: float = 0.25) -> dict[str, Any]:
    """Whether the weights p of a run have settled, from its trajectory rows.

    Measured over the last `tail` of the steps: how far p moved there (the largest change of one
    weight), per 100 steps, against its whole move from the first step; and the mean norm of λ's
    gradient α·(diag(p) − p pᵀ)(l̄(w) − l̄(u)) there (ScaleBiO rows; None otherwise). The verdict:
    "too short" under 40 steps; "not moved" when p never moved more than 0.01 (λ learned
    nothing yet); "moving" when the last quarter carries more than a tenth of the whole move (a
    steady trend carries a quarter); "drifting" when p barely moves there but λ's gradient still
    points one way (for some source its mean over the tail is more than DRIFT_Z standard errors
    from 0: a decayed lr_lam, not a stationary point, holds p still); else "settled".
    """
    names = list(rows[0]["p"])
    p = np.array([[r["p"][n] for n in names] for r in rows])
    k = min(len(rows), max(2, int(round(len(rows) * tail))))
    total = float(np.abs(p - p[0]).max())
    recent = float(np.abs(p[-1] - p[-k]).max())
    rate = recent / max(k - 1, 1) * 100
    grads: list[np.ndarray] = []
    for r, q in zip(rows[-k:], p[-k:]):
        if "loss_w" in r and "loss_u" in r:
            w, u = (
                [r[key][n] for n in names] if isinstance(r[key], dict) else r[key]
                for key in ("loss_w", "loss_u")
            )
            d = np.asarray(w, float) - np.asarray(u, float)
            grads.append(r["alpha"] * q * (d - q @ d))
    grad = float(np.mean([np.linalg.norm(g) for g in grads])) if grads else None
    drift = None  # the largest |mean| / standard error of one source's λ-gradient over the tail
    if len(grads) >= 3:
        g = np.asarray(grads)
        se = g.std(0, ddof=1) / np.sqrt(len(g))
        drift = float(np.max(np.abs(g.mean(0)) / np.maximum(se, 1e-30)))
    span = f"over the last {k} of {len(rows)} steps"
    knob = "doremi_eta" if "phase" in rows[0] else "lr_lam"  # DoReMi's weights step, or λ's
    if len(rows) < MIN_STEPS:
        state = "too short"
        text = f"too few steps ({len(rows)}) to judge convergence: run at least {MIN_STEPS}"
    elif total < UNMOVED:
        state = "not moved"
        text = (
            f"not converged: p has not moved (at most {total:.2g} from its start in "
            f"{len(rows)} steps); raise {knob} or run longer"
        )
    elif recent > SETTLED_SHARE * total:
        state = "moving"
        text = (
            f"not converged: p still moving {rate:.2g} per 100 steps {span} ({recent / total:.0%} "
            f"of its whole move); run longer or raise {knob}"
        )
    elif drift is not None and drift > DRIFT_Z:
        state = "drifting"
        lrs = [r["lr_lam"] for r in rows if "lr_lam" in r]
        fell = (
            f" (lr_lam fell to {lrs[-1] / max(lrs):.1%} of its peak)"
            if lrs and max(lrs) > 0 and lrs[-1] < 0.5 * max(lrs)
            else ""
        )
        text = (
            f"not converged: p moved only {recent:.2g} {span}{fell}, but λ's gradient still "
            f"points one way ({drift:.1f} standard errors from 0); run longer or raise lr_lam"
        )
    else:
        state = "settled"
        text = f"converged: p moved {recent:.2g} {span} ({recent / total:.0%} of its whole move)"
    if grads:
        text += f"; λ-gradient norm {grad:.2g}"
        if drift is not None and state == "settled":
            text += f", no steady direction ({drift:.1f} standard errors at most)"
    return {
        "verdict": state,
        "text": text,
        "steps": len(rows),
        "tail_steps": k,
        "moved_tail": recent,
        "moved_total": total,
        "per_100_steps": rate,
        "lam_grad_norm": grad,
        "lam_grad_drift": drift,
    }


# ------------------------------------------------------------------ the run folder's guards


def is_run_dir(folder: Path) -> bool:
    """Whether `folder` holds a run of this package (its config and its trajectory, or a
    checkpoint), rather than files of the user's own."""
    folder = Path(folder)
    return (folder / CONFIG).is_file() and (
        (folder / TRAJECTORY).is_file() or (folder / CHECKPOINT).is_file()
    )


def check_out_dir(folder: Path) -> None:
    """Refuse an existing, non-empty folder that is not a run of this package: its files would
    be overwritten (config.yaml, weights.json, …)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"out_dir {folder} is a file, not a folder: choose another out_dir.")
    if not folder.is_dir() or is_run_dir(folder) or (folder / LOCK).exists():
        return  # new, a run, or a run killed before it wrote its first files (its lock)
    held = sorted(
        p.name for p in folder.iterdir() if p.name != LOCK and not p.name.startswith(TMP_PREFIX)
    )
    if held:
        shown = ", ".join(held[:10]) + (f", … ({len(held)} in all)" if len(held) > 10 else "")
        raise ConfigError(
            f"out_dir {folder} is not empty and is not a run of this package: it holds {shown}. "
            "Nothing was written. Choose a new or empty out_dir."
        )


class RunLock:
    """An exclusive lock on a run folder for the whole run (`.lock`, fcntl.flock): a second
    writer is refused with the holder's pid. The kernel drops the lock when its holder dies, so
    a lock left by a killed run is taken over (and said so)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None
        self.previous: str = ""
        """The holder a killed run left in the file ("pid N on HOST"), or "" (none, or a run
        that ended and released it)."""

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _file_mode())
        except OSError as e:
            raise ConfigError(
                f"cannot write the run folder {self.path.parent}: {e.strerror}. Choose an "
                "out_dir you can write, or fix its permissions."
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent} is in use by another run ({holder}); nothing was written. "
                "Wait for it to finish, stop it, or choose another out_dir."
            ) from None
        self.previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
