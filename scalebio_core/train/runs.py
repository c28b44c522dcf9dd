"""The run directory (docs/run-folder.md): its file names, its logs read back and cut, the
check of an out_dir before a run writes there, and the run's lock.

A run directory holds config.yaml, trajectory.jsonl, timing.jsonl, weights.json, checkpoints/;
every file is written atomically (`files.py`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .. import messages
from ..errors import ConfigError, DataError
from ..files import CHECKPOINT_FILE, CHECKPOINTS, TMP_PREFIX, disk_full, file_mode, write_text
from . import nullband

CONFIG, TRAJECTORY, WEIGHTS, TIMING = (
    "config.yaml",
    "trajectory.jsonl",
    "weights.json",
    "timing.jsonl",
)
CHECKPOINT = Path(CHECKPOINTS) / CHECKPOINT_FILE
LOCK = ".lock"
CHANGES = "changes.jsonl"


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
        line = json.dumps(row) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            full = disk_full(e, self.path, len(line))
            if full is None:
                raise
            raise full from e

    def rewrite(self, rows: list[dict]) -> None:
        """Replace the file by `rows` (atomic): a resume keeps the rows its checkpoint covers
        (`covered_rows`) and drops what came after."""
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))


def _parse_row(text: str) -> dict | None:
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON Lines log. A torn last line (what a crash while appending leaves) is
    left out; a damaged line with whole lines after it is damage from outside, refused by line
    (no row is dropped silently)."""
    rows, bad = [], None
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            if bad is not None:
                raise DataError(
                    f"{path}: line {bad[0]} is damaged ({bad[1]!r}) and whole lines follow it: "
                    "a crash tears only the last line, so the file was changed from outside. "
                    "Restore it from a copy; nothing was read."
                )
            row = _parse_row(text)
            if row is None:
                bad = (n, text[:60])
            else:
                rows.append(row)
    return rows


def covered_rows(path: Path, n_steps: int) -> list[dict]:
    """The rows of steps 0 … n_steps−1 of a run's log (trajectory.jsonl, timing.jsonl), each
    step once and in order: what a checkpoint at step n_steps covers. Rows after them and a torn
    last line are left out (the resume runs those steps again); a damaged line between whole
    rows is left out with a warning when every covered step is there; a covered step missing or
    repeated is refused, naming the damaged lines. Nothing is written."""
    path = Path(path)
    if not path.exists():
        if n_steps == 0:
            return []
        raise ConfigError(
            f"cannot resume: {path} is missing, and the checkpoint covers steps 0..{n_steps - 1}. "
            "Nothing was changed. Restore the file, or start a new run in a new out_dir."
        )
    rows, damaged, last_covered = [], [], 0
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            row = _parse_row(text)
            if row is None or not isinstance(row.get("step"), int):
                damaged.append((n, text[:60]))
            elif row["step"] < n_steps:
                rows.append(row)
                last_covered = n
    steps = [r["step"] for r in rows]
    inside = [(n, t) for n, t in damaged if n < last_covered]
    if steps != list(range(n_steps)):
        missing = sorted(set(range(n_steps)) - set(steps))
        repeated = sorted(s for s, c in Counter(steps).items() if c > 1)
        problems = [f"steps {_spans(missing)} are missing"] if missing else []
        problems += [f"steps {_spans(repeated)} are repeated"] if repeated else []
        lines = "; ".join(f"line {n}: {t!r}" for n, t in damaged[:5]) or "none"
        raise ConfigError(
            f"cannot resume: {path} should hold steps 0..{n_steps - 1} (the checkpoint covers "
            f"them), but {', '.join(problems) or 'they are out of order'} (damaged lines: "
            f"{lines}). A crash tears only the last line: the file was changed from outside. "
            "Nothing was changed. Restore it from a copy, or start a new run in a new out_dir."
        )
    if inside:
        messages.warn(
            f"{path}: damaged lines between whole rows left out ("
            + "; ".join(f"line {n}: {t!r}" for n, t in inside[:5])
            + f"); every step 0..{n_steps - 1} is there.",
            stacklevel=2,
        )
    return rows


def _spans(steps: list[int]) -> str:
    """[1, 2, 3, 7] -> '1..3, 7'."""
    out, i = [], 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        out.append(str(steps[i]) if i == j else f"{steps[i]}..{steps[j]}")
        i = j + 1
    return ", ".join(out)


def load_trajectory(run_dir: str | Path) -> dict[str, Any]:
    """A run's trajectory as arrays: step, p (steps × K), L1, L2_w, L2_u, gap, alpha, names.
    A run with the null band's halves (`nullband`): p and names are the sources' (halves
    summed), `halves` and `half_names` the halves'; `null_band` its band (null_band.json)."""
    run_dir = Path(run_dir)
    path = run_dir / TRAJECTORY
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} is empty: the run has not finished a step yet.")
    out: dict[str, Any] = {}
    if nullband.is_split(rows[0]["p"]):
        out["half_names"] = list(rows[0]["p"])
        out["halves"] = np.array([[r["p"][n] for n in out["half_names"]] for r in rows])
        rows = [nullband.combine_row(r) for r in rows]
        if (run_dir / nullband.NULL_BAND).exists():
            out["null_band"] = json.loads((run_dir / nullband.NULL_BAND).read_text())
    names = list(rows[0]["p"])
    out |= {"names": names, "step": np.array([r["step"] for r in rows])}
    out["p"] = np.array([[r["p"][n] for n in names] for r in rows])
    for key in ("L1", "L2_w", "L2_u", "gap", "alpha"):
        out[key] = np.array([r.get(key, np.nan) for r in rows], float)
    if (run_dir / WEIGHTS).exists():
        out["weights"] = json.loads((run_dir / WEIGHTS).read_text())
    return out


def is_run_dir(folder: Path) -> bool:
    """Whether `folder` holds a run of this package (its config and its trajectory, or a
    checkpoint), rather than files of the user's own."""
    folder = Path(folder)
    return (folder / CONFIG).is_file() and (
        (folder / TRAJECTORY).is_file() or (folder / CHECKPOINT).is_file()
    )


def check_out_dir(folder: Path) -> None:
    """Refuse an existing, non-empty folder that is not a run of this package: its files would
    be overwritten (config.yaml, weights.json, …). A run killed before it wrote its config
    leaves its lock, an empty trajectory.jsonl and temporary files, and nothing else: a lock
    beside other files is not a run's (a run writes trajectory.jsonl before config.yaml)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"out_dir {folder} is a file, not a folder: choose another out_dir.")
    if not folder.is_dir() or is_run_dir(folder):
        return  # new, or a run

    def ours(p: Path) -> bool:  # what a run writes before its config
        if p.name == LOCK or p.name.startswith(TMP_PREFIX):
            return True
        return p.name == TRAJECTORY and p.is_file() and p.stat().st_size == 0

    held = sorted(p.name for p in folder.iterdir() if not ours(p))
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
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
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
