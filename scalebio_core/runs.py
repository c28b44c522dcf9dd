"""The run directory (DESIGN §5) and the package's one way of writing files atomically.

A run directory holds config.yaml, trajectory.jsonl, timing.jsonl, weights.json, checkpoints/.
Every file of the package is written atomically (a temporary file in the same folder, then
`os.replace`; a folder: a temporary folder, then `os.rename`), so a crash at any moment leaves
either the old or the new version, never a torn one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

CONFIG, TRAJECTORY, WEIGHTS, TIMING = (
    "config.yaml",
    "trajectory.jsonl",
    "weights.json",
    "timing.jsonl",
)
CHECKPOINT = Path("checkpoints") / "last.pt"


class _Loader(yaml.SafeLoader):
    """YAML with '1e-3' read as a number (YAML 1.1 wants '1.0e-3' and reads '1e-3' as text)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
