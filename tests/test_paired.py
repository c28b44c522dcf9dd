"""Each notebook has a py:percent twin beside it (jupytext) with the same cells, and the twins
pass ruff: the notebooks' code is linted and can be reviewed as text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SYNC = "jupytext --sync notebooks/[0-9][0-9]_*.ipynb"


def _cells(path: Path) -> list[tuple[str, str, list[str]]]:
    """(type, source, tags) of each cell of a notebook or of its text file; a newline that ends
    a cell's source is not kept (the text format has no place for it)."""
    nb = jupytext.read(path)
    return [
        (c.cell_type, c.source.rstrip("\n"), list(c.metadata.get("tags", []))) for c in nb.cells
    ]


def test_every_notebook_and_only_a_notebook_has_a_twin():
    assert NOTEBOOKS
    twins = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    assert [p.stem for p in twins] == [p.stem for p in NOTEBOOKS], f"run `{SYNC}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_twin_holds_the_notebooks_cells(path: Path):
    twin = path.with_suffix(".py")
    assert twin.read_text().startswith("# ---\n# jupyter:\n"), "not written by jupytext"
    assert jupytext.read(twin).metadata["jupytext"]["text_representation"]["format_name"] == (
        "percent"
    )
    ours, theirs = _cells(path), _cells(twin)
    assert len(ours) == len(theirs), f"{path.name}: {len(ours)} cells, the .py {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, f"{path.name} cell {i} differs from its .py (run `{SYNC}`)"


def test_the_twins_pass_ruff_and_ruff_reads_no_notebook():
    ruff = [sys.executable, "-m", "ruff", "check", "--no-cache"]
    files = subprocess.run(
        [*ruff, "--show-files", "notebooks"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    linted = sorted(Path(line.strip()).name for line in files.splitlines() if line.strip())
    assert linted == sorted(p.with_suffix(".py").name for p in NOTEBOOKS), files
    out = subprocess.run([*ruff, "notebooks"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
