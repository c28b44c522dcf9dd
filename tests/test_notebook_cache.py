"""Notebook 09 never shows another folder's results (issue 30): runs and fine-tunings are kept
in folders keyed by their config and the SHA-256 of their data files, so two `DATA_DIR`s in the
same runs folder each get their own numbers, and a rerun with the same folder reuses its run
and says so. Also: the lab's keys themselves, and where figures go by default."""

from __future__ import annotations

import json
import re
from pathlib import Path

import papermill as pm
import pytest

from scalebio_core.errors import ConfigError
from scalebio_core.lab import experiments
from scalebio_core.lab.experiments import data_files, preset_config, run_key
from scalebio_core.train.pipeline import write_example_folder

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "09_your_data.ipynb"


def _lines(path: Path) -> int:
    return sum(1 for line in path.open() if line.strip())


def _printed(nb) -> str:
    """Everything the notebook's cells printed (stdout and stderr)."""
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )


WIDGET = "application/vnd.jupyter.widget-view+json"


def _run_09(data_dir: Path, tmp_path: Path, tag: str) -> str:
    """What notebook 09 printed at smoke on `data_dir`; its run shows a widget bar."""
    nb = pm.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / f"09_{tag}.ipynb"),
        parameters={"PRESET": "smoke", "DATA_DIR": str(data_dir)},
        cwd=str(NOTEBOOK.parent),
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=600,
    )
    widgets = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if WIDGET in out.get("data", {})
    ]
    assert widgets, "no widget was shown"
    return _printed(nb)


def _weights(text: str) -> dict[str, float]:
    line = next(x for x in text.splitlines() if x.startswith("{'"))
    return json.loads(line.replace("'", '"'))


def _test_counts(text: str) -> set[int]:
    return {int(n) for n in re.findall(r"on (\d+) test records", text)}


@pytest.fixture
def two_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two small data folders that differ in their sources, sizes, seed and test set."""
    a = write_example_folder(tmp_path / "a", "noisy", n_per_source=40, n_val=24, seed=0)
    b = write_example_folder(
        tmp_path / "b", "noisy", n_per_source=30, n_val=36, seed=1, noise_rates=(0.0, 1.0)
    )
    assert _lines(a / "test.jsonl") != _lines(b / "test.jsonl")
    return a, b


@pytest.mark.notebook
def test_notebook_09_shows_each_data_folders_own_numbers(two_folders, tmp_path, monkeypatch):
    a, b = two_folders
    monkeypatch.setenv("SCALEBIO_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("SCALEBIO_RUNS", str(tmp_path / "runs"))  # one runs folder for all
    monkeypatch.setenv("SCALEBIO_RESULTS", str(tmp_path / "results"))

    first = _run_09(a, tmp_path, "a")
    assert _test_counts(first) == {_lines(a / "test.jsonl")}, first
    assert "reusing" not in first

    second = _run_09(b, tmp_path, "b")  # another folder: its own run and fine-tunings
    assert "reusing" not in second, second
    assert _test_counts(second) == {_lines(b / "test.jsonl")}, second
    assert sorted(_weights(second)) == ["noise_0.0", "noise_1.0"], second
    assert len(_weights(first)) == 6

    third = _run_09(a, tmp_path, "a_again")  # the first folder again: reused, and said so
    run = re.search(r"reusing the finished run in (\S+) \(trained in [\d.]+ s on ", third)
    assert run, third
    assert "delete it to retrain" in third
    assert Path(run.group(1)).name.startswith("your_data_smoke_")
    assert third.count("reusing the finished fine-tuning in") == 2, third
    assert _test_counts(third) == {_lines(a / "test.jsonl")}
    assert _weights(third) == _weights(first)
    # the run's own time (timing.jsonl), and its start table shown again
    took = float(re.search(r"run: ([\d.]+) s of training steps", third).group(1))
    assert took == pytest.approx(experiments.training_seconds(Path(run.group(1))), abs=0.1)
    assert "validation" in third.split("reusing the finished run", 1)[1]
    # the widget bar, not the trainer's plain lines
    assert "step 8/8" not in first + second


def test_run_folders_are_keyed_by_the_config_and_the_data_files(two_folders, tmp_path, monkeypatch):
    a, b = two_folders
    monkeypatch.setenv("SCALEBIO_RUNS", str(tmp_path / "runs"))
    ca = preset_config("your_data", "smoke", data_dir=str(a))
    assert Path(ca.out_dir).name == f"your_data_smoke_{run_key(ca)}"
    assert Path(ca.out_dir) == Path(preset_config("your_data", "smoke", data_dir=str(a)).out_dir)
    assert ca.out_dir != preset_config("your_data", "smoke", data_dir=str(b)).out_dir
    assert ca.out_dir != preset_config("your_data", "smoke", data_dir=str(a), seed=1).out_dir
    # the test set and the manifest count, though the run does not train on them
    assert {Path(f).name for f in data_files(ca)} >= {"test.jsonl", "manifest.json"}
    with (a / "test.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": "one more", "response": "record"}) + "\n")
    assert preset_config("your_data", "smoke", data_dir=str(a)).out_dir != ca.out_dir
    # a baseline's folder names its method
    doremi = preset_config("noisy", "smoke", method="doremi")
    assert Path(doremi.out_dir).name.startswith("noisy_smoke_doremi_")


def test_a_reused_run_says_so_and_a_given_folder_of_other_data_is_refused(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SCALEBIO_RUNS", str(tmp_path / "runs"))
    folder = write_example_folder(
        tmp_path / "data", "noisy", n_per_source=20, n_val=12, seed=0, noise_rates=(0.0, 1.0)
    )
    kw = {"data_dir": str(folder), "steps": 2, "progress": False}
    run = experiments.run_preset("your_data", "smoke", **kw)
    assert "reusing" not in capsys.readouterr().out
    assert (run / "table.txt").read_text().strip()  # saved for a reuse to show
    assert experiments.run_preset("your_data", "smoke", **kw) == run
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"reusing the finished run in {run} (trained")
    # a folder given by out_dir keeps its name, and refuses a run of other data files
    given = {**kw, "out_dir": str(tmp_path / "mine")}
    experiments.run_preset("your_data", "smoke", **given)
    with (folder / "test.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": "one more", "response": "record"}) + "\n")
    with pytest.raises(ConfigError, match=r"test\.jsonl: changed since the run"):
        experiments.run_preset("your_data", "smoke", **given)
    # while the keyed folders give the changed data a run of its own
    assert experiments.run_preset("your_data", "smoke", **kw) != run


def test_figures_go_to_a_build_folder_unless_make_reproduce_says_otherwise(monkeypatch):
    from scalebio_core.lab.plots import figures_dir

    monkeypatch.delenv("SCALEBIO_FIGURES", raising=False)
    monkeypatch.chdir(ROOT / "notebooks")  # where JupyterLab runs a notebook
    assert figures_dir() == ROOT / "build" / "figures"
    makefile = (ROOT / "Makefile").read_text()
    reproduce = makefile.split("\nreproduce:", 1)[1].split("\n\n", 1)[0]
    assert "SCALEBIO_FIGURES=$(CURDIR)/figures" in reproduce
