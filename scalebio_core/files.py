"""The package's one way of writing files: atomically (a temporary file in the same folder, then
`os.replace`; a folder: a temporary folder, then `os.rename`), so a crash at any moment leaves
either the old or the new version, never a torn one; a full disk is said as such, before any
earlier file is replaced; YAML read with its errors located.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import ConfigError

CHECKPOINTS, CHECKPOINT_FILE = "checkpoints", "last.pt"
"""The folder of a run's checkpoints (the engines' per-rank parts go there too) and the
checkpoint's file name (`runs.CHECKPOINT`), which a full disk names as such."""


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


def file_mode() -> int:
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
        os.chmod(tmp, file_mode())  # mkstemp makes 0600: readable as the folder's other files
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
    what = "the checkpoint" if Path(path).name == CHECKPOINT_FILE else Path(path).name
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
