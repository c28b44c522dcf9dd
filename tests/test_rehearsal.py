"""The paper presets rehearsed offline (issue 16): every notebook's `paper` preset runs against
the rehearsal cache (`scalebio_core.lab.rehearsal`: tiny models and datasets under the paper's
names, HF_HUB_OFFLINE=1) through the same from_pretrained / load_dataset code as on a GPU node,
with steps and sizes shrunk to seconds. Its expectation cell runs on the real names: it passes,
or fails on the result (an AssertionError in the cell tagged "expectations"), never on a name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import papermill as pm
import pytest

from scalebio_core.lab.rehearsal import build

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"steps": 3, "batch_size": 8, "val_batch_size": 8, "grad_accum": 1, "checkpoint_every": 3}
SFT = {"lr_w": 2.0e-5, "batch_size": 8, "grad_accum": 1, "warmup_ratio": 0.03}
PARAMETERS = {
    "03_noisy_data": {"OVERRIDES": SMALL},
    "04_language_filtering": {"OVERRIDES": SMALL},
    "05_informative_sources": {"OVERRIDES": SMALL},
    "06_scaling_up": {},
    "07_baselines": {
        "OVERRIDES": SMALL,
        "SPEC": {"seeds": [0], "n": 40, "token_budget": 3000, "sft": SFT},
    },
    "08_math_reasoning": {
        "OVERRIDES": {**SMALL, "lisa_active": 1},
        "SPEC": {"seeds": [0], "n": 40, "equal_tokens": None, "sft": {**SFT, "steps": 2}},
    },
    "10_planted_mixture": {
        "OVERRIDES": {**SMALL, "corpus_args": {"n_per_source": 40, "n_val": 40}},
        "SPEC": {"seeds": [0], "mixtures": [[0.5, 0.3, 0.2, 0.0]]},
    },
}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> tuple[Path, Path]:
    """(HF_HOME of the rehearsal cache, a working folder holding the presets' data/ files)."""
    root = tmp_path_factory.mktemp("rehearsal")
    home = build(root / "hf", data_root=root / "work")
    return home, root / "work"


@pytest.mark.notebook
@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_the_paper_preset_runs_offline_against_the_rehearsal_cache(
    name, rehearsal, tmp_path, monkeypatch
):
    home, work = rehearsal
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("SCALEBIO_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("SCALEBIO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SCALEBIO_RESULTS", str(tmp_path / "results"))
    out = tmp_path / f"{name}.ipynb"
    try:
        pm.execute_notebook(
            str(ROOT / "notebooks" / f"{name}.ipynb"),
            str(out),
            parameters={"PRESET": "paper", **PARAMETERS[name]},
            cwd=str(work),
            kernel_name="python3",
            progress_bar=False,
            execution_timeout=600,
        )
    except pm.PapermillExecutionError as e:
        cells = json.loads(out.read_text())["cells"]
        failed = next(  # papermill puts a note above the cells: find the cell by its error
            c for c in cells if any(o.get("output_type") == "error" for o in c.get("outputs", []))
        )
        tags = failed["metadata"].get("tags", [])
        assert e.ename == "AssertionError" and "expectations" in tags, (e.ename, e.evalue)
    assert list((tmp_path / "figures").glob(f"{name}*.png")), "no figure was saved"
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
