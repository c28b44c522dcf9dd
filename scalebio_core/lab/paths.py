"""Where the notebooks' outputs go (the figures, the result records): a folder of the repository,
movable by an environment variable (the tests and `make reproduce` move them)."""

from __future__ import annotations

import os
from pathlib import Path


def project_dir(env: str, *parts: str) -> Path:
    """`$env` if set, else `parts` under the repository root (found upwards from the working
    directory: a notebook runs in notebooks/), else under the working directory."""
    if os.environ.get(env):
        return Path(os.environ[env])
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").exists() and (d / "scalebio_core").is_dir():
            return d.joinpath(*parts)
    return here.joinpath(*parts)
