"""The result sentences of the notebooks and the README column `make reproduce` builds from them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scalebio_core.lab import results

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

TABLE = f"""intro
{results.BEGIN}
| notebook | question | figure | result at quick | runtime at quick |
|---|---|---|---|---|
| [`00_a`](notebooks/00_a.ipynb) | q a | f | old a | 1 s |
| [`01_b`](notebooks/01_b.ipynb) | q b | f | old b | 2 s |
{results.END}
after the table
"""


def test_report_writes_the_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCALEBIO_RESULTS", str(tmp_path))
    results.report("00_a", "quick", "p ends at 0.25;\n  q at 0.75.")
    assert capsys.readouterr().out.strip() == "p ends at 0.25; q at 0.75."
    record = json.loads((tmp_path / "00_a.json").read_text())
    assert record["sentence"] == "p ends at 0.25; q at 0.75." and record["preset"] == "quick"
    with pytest.raises(ValueError, match="empty"):
        results.report("00_a", "quick", "  ")


def test_update_readme_rewrites_only_the_rows_with_results(tmp_path, monkeypatch):
    readme, res = tmp_path / "README.md", tmp_path / "res"
    readme.write_text(TABLE)
    monkeypatch.setenv("SCALEBIO_RESULTS", str(res))
    results.report("01_b", "quick", "loss 1.5 | 2.5")
    (res / "01_b.seconds").write_text("754\n")
    assert results.update_readme(readme, res) == ["01_b"]
    text = readme.read_text()
    assert "| [`00_a`](notebooks/00_a.ipynb) | q a | f | old a | 1 s |" in text
    assert "| [`01_b`](notebooks/01_b.ipynb) | q b | f | loss 1.5 \\| 2.5 | 12 min 34 s |" in text
    assert text.startswith("intro\n") and text.endswith("after the table\n")
    results.update_readme(readme, res)  # idempotent
    assert readme.read_text() == text


def test_update_readme_refuses_other_presets_and_missing_markers(tmp_path, monkeypatch):
    readme, res = tmp_path / "README.md", tmp_path / "res"
    readme.write_text(TABLE)
    monkeypatch.setenv("SCALEBIO_RESULTS", str(res))
    results.report("00_a", "smoke", "a smoke number")
    with pytest.raises(ValueError, match="'smoke' result"):
        results.update_readme(readme, res)
    assert readme.read_text() == TABLE  # nothing written
    readme.write_text("no table here\n")
    with pytest.raises(ValueError, match="markers"):
        results.update_readme(readme, res)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_each_notebook_reports_and_has_a_readme_row(path: Path):
    nb = json.loads(path.read_text())
    code = [("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]
    assert re.search(rf'report\(\s*"{path.stem}", PRESET,', code[-1]), "the last cell must report"
    readme = (ROOT / "README.md").read_text()
    table = readme.split(results.BEGIN, 1)[1].split(results.END, 1)[0]
    rows = [r for r in table.splitlines() if r.startswith(f"| [`{path.stem}`]")]
    assert len(rows) == 1 and rows[0].count(" | ") >= 4, rows
