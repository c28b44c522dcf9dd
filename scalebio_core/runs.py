"""The run directory (docs/run-folder.md) and the package's one way of writing files atomically.

A run directory holds config.yaml, trajectory.jsonl, timing.jsonl, weights.json, checkpoints/.
Every file of the package is written atomically (a temporary file in the same folder, then
`os.replace`; a folder: a temporary folder, then `os.rename`), so a crash at any moment leaves
either the old or the new version, never a torn one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .errors import ConfigError, DataError

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
def atomic_path(path: Path, needed: int = 0):
    """Yield a temporary path beside `path`; on success it replaces `path` in one step. A write
    that fails for want of space (`needed`: its expected size in bytes) raises `DiskFullError`,
    and `path` keeps its old contents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600: readable as the folder's other files
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as e:
        taken = _size(tmp)  # freed by the unlink (once the failed writer lets go of it)
        _unlink(tmp)
        tmp = None
        full = None if isinstance(e, DiskFullError) else disk_full(e, path, needed, taken)
        if full is None:
            raise
        raise full from e
    finally:
        _unlink(tmp)


def _size(path: str | None) -> int:
    try:
        return os.stat(path).st_blocks * 512 if path is not None else 0
    except OSError:
        return 0


def _unlink(path: str | None) -> None:
    try:
        if path is not None:
            os.unlink(path)
    except OSError:  # the folder is gone: the real error is another one
        pass


class DiskFullError(OSError):
    """A write failed for want of space; the message names the device, the path, the space free
    and the space needed. Nothing written before is lost (every write is atomic)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _mount_of(path: Path) -> tuple[str, str]:
    """(device, mount point) of the file system holding `path`."""
    where = Path(path).resolve()
    while not where.exists() or not os.path.ismount(where):
        if where.parent == where:
            break
        where = where.parent
    device = str(where)
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, *_ = line.split()
            if mnt == str(where):
                device = dev  # the last mount at that point is the one in use
    except OSError:
        pass
    return device, str(where)


def disk_full(
    error: BaseException, path: Path, needed: int = 0, freed: int = 0
) -> DiskFullError | None:
    """A `DiskFullError` for `error` if a full disk caused it: errno ENOSPC or EDQUOT, or a
    stream error of torch's writer while less than `needed` bytes (and 1 MiB) are free; else
    None (another error). `freed`: bytes of a failed temporary file, free again once removed."""
    folder = Path(path).parent
    free = (shutil.disk_usage(folder).free if folder.exists() else 0) + freed
    if isinstance(error, OSError):
        if error.errno not in NO_SPACE:
            return None
    elif free >= max(needed, 1) + 2**20:
        return None  # torch's RuntimeError, with room to spare: not a full disk
    device, mount = _mount_of(Path(path).parent)
    what = "the checkpoint" if Path(path).name == CHECKPOINT.name else Path(path).name
    need = f", {what} needs ~{needed / 1e6:.1f} MB" if needed else ""
    return DiskFullError(
        f"no space left on {device} (mounted at {mount}; writing {path}, {free / 1e6:.1f} MB "
        f"free{need}). What was written before is kept; free space there (or choose an out_dir "
        "on another disk) and go on.",
    )


def nbytes(obj: Any) -> int:
    """The bytes of the tensors in `obj` (nested dicts, lists, tuples): what saving it needs."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(nbytes(v) for v in obj)
    return 0


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
    with atomic_path(path, len(text.encode())) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def save_torch(path: Path, obj: Any) -> None:
    with atomic_path(path, nbytes(obj)) as tmp:
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
        warnings.warn(
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
