"""The null band (how far weights move by chance, measured on the user's own data) and what the
run can tell about its model: identical sources end inside the band, the noisy corpus's clean
source above it; arithmetic sources either separate or the verdict says the model cannot see
what they differ in, and names the fix."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from scalebio_core.errors import ConfigError
from scalebio_core.sources.data import TokenizedData
from scalebio_core.train import nullband
from scalebio_core.train.config import TrainConfig, read_run_config
from scalebio_core.train.convergence import VERDICT
from scalebio_core.train.pipeline import write_example_folder
from scalebio_core.train.runs import load_trajectory, read_jsonl
from scalebio_core.train.trainer import train


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_split_halves_every_source_at_random_and_keeps_the_samples():
    ids = torch.tensor([0] * 7 + [1] * 4 + [2] * 5)
    data = TokenizedData(("a", "b", "c"), [torch.ones(1)] * 16, [torch.ones(1)] * 16, ids)
    halves = nullband.split(data, seed=0)
    assert halves.names == ("a#1", "a#2", "b#1", "b#2", "c#1", "c#2")
    counts = halves.counts().tolist()
    assert counts == [3, 4, 2, 2, 2, 3]
    assert ((halves.source_ids // 2) == ids).all()  # every sample stays in its source
    again = nullband.split(data, seed=0).source_ids
    other = nullband.split(data, seed=1).source_ids
    assert torch.equal(again, halves.source_ids) and not torch.equal(other, halves.source_ids)
    assert nullband.is_split(halves.names) and not nullband.is_split(data.names)


def test_the_band_places_each_source_against_what_chance_gives():
    halves = {"a#1": 0.30, "a#2": 0.28, "b#1": 0.09, "b#2": 0.11, "c#1": 0.11, "c#2": 0.11}
    band = nullband.band(halves)
    spread = ((0.02**2 + 0.02**2 + 0.0) / 3) ** 0.5
    assert band["spread"] == pytest.approx(spread)
    assert band["high"] == pytest.approx(1 / 3 + nullband.t95(3) * spread)
    assert {n: v["where"] for n, v in band["sources"].items()} == {
        "a": "above",
        "b": "below",
        "c": "below",
    }
    assert band["sources"]["a"]["weight"] == pytest.approx(0.58)
    calm = nullband.band({"a#1": 0.17, "a#2": 0.16, "b#1": 0.16, "b#2": 0.17, "c#1": 0.17,
                          "c#2": 0.17})  # fmt: skip
    assert "no source differs" in calm["summary"]


def test_halves_that_cannot_run_are_refused_or_said(tmp_path):
    folder = write_example_folder(tmp_path / "data", "noisy", n_per_source=20, n_val=16)
    cfg = TrainConfig(data_dir=str(folder), out_dir=str(tmp_path / "r"), steps=2, batch_size=8,
                      null_band="halves")  # fmt: skip
    with pytest.raises(ConfigError, match="batch_size 8 < 2 × 6 sources; set batch_size=12"):
        train(cfg, progress=False)
    weights = train(cfg.replace(null_band="auto"), progress=False)  # said, then one per source
    assert sorted(weights) == sorted(load_trajectory(tmp_path / "r")["names"])
    assert not (tmp_path / "r" / nullband.NULL_BAND).exists()
    saved = (tmp_path / "r" / "config.yaml").read_text().replace("null_band: auto\n", "")
    (tmp_path / "r" / "config.yaml").write_text(saved)  # a run from before the band
    assert read_run_config(tmp_path / "r").null_band == "off"


def _run(folder: Path, out: Path, steps: int = 400) -> dict:
    """The README's five-minute run on `folder`: every setting at its default."""
    train(TrainConfig(data_dir=str(folder), out_dir=str(out), steps=steps), progress=False)
    return json.loads((out / VERDICT).read_text())


def test_identical_sources_end_inside_the_band(tmp_path):
    made = write_example_folder(tmp_path / "made", "noisy", n_per_source=800, n_val=200,
                                noise_rates=[0.0])  # fmt: skip
    folder = tmp_path / "same"
    folder.mkdir()
    rows = (made / "noise_0.0.jsonl").read_text().splitlines(keepends=True)
    for i, name in enumerate("abcd"):  # one distribution, four files
        (folder / f"{name}.jsonl").write_text("".join(rows[i * 200 : (i + 1) * 200]))
    for held in ("validation.jsonl", "test.jsonl"):
        shutil.copy(made / held, folder / held)
    verdict = _run(folder, tmp_path / "run")
    band = verdict["null_band"]
    assert {v["where"] for v in band["sources"].values()} == {"inside"}, band
    assert "no source differs from the others beyond chance" in verdict["text"]
    traj = load_trajectory(tmp_path / "run")
    assert traj["names"] == list("abcd") and len(traj["half_names"]) == 8
    assert traj["p"][-1] == pytest.approx(traj["halves"][-1].reshape(4, 2).sum(1))
    assert len(read_jsonl(tmp_path / "run" / "trajectory.jsonl")[0]["p"]) == 8


def test_the_noisy_corpus_clean_source_ends_above_the_band(tmp_path):
    folder = write_example_folder(tmp_path / "data", "noisy", n_per_source=500, n_val=200)
    verdict = _run(folder, tmp_path / "run")
    where = {n: v["where"] for n, v in verdict["null_band"]["sources"].items()}
    assert where["noise_0.0"] == "above", verdict["null_band"]
    saved = json.loads((tmp_path / "run" / "weights.json").read_text())
    assert sorted(saved) == sorted(where) and sum(saved.values()) == pytest.approx(1.0)


def _sum_records(r: random.Random, n: int, how: str) -> list[dict]:
    out = []
    for _ in range(n):
        a, b = r.randint(10, 99), r.randint(10, 99)
        answer = a + b + (r.choice([-3, -2, -1, 1, 2, 3]) if how == "wrong" else 0)
        said = f"La réponse est {answer}." if how == "french" else f"The answer is {answer}."
        out.append({"instruction": f"What is {a} + {b}?", "input": "", "output": said})
    return out


def test_arithmetic_sources_separate_or_the_verdict_says_the_model_cannot_see(tmp_path):
    """Correct sums, wrong sums and French answers; validation and test of correct sums. The run
    reports the model's accuracy on the target, and either the correct source ends above the
    band and the wrong one below, or the verdict says the model cannot tell them apart and names
    a pretrained model as the fix (the embedded default cannot add)."""
    r = random.Random(0)
    folder = tmp_path / "sums"
    folder.mkdir()
    for name in ("correct", "wrong", "french"):
        _jsonl(folder / f"{name}.jsonl", _sum_records(r, 300, name))
    _jsonl(folder / "validation.jsonl", _sum_records(r, 150, "correct"))
    _jsonl(folder / "test.jsonl", _sum_records(r, 150, "correct"))
    verdict = _run(folder, tmp_path / "run")
    sight = verdict["model_sight"]
    assert 0 <= sight["accuracy"] <= 1 and sight["n"] == 100 and "accuracy" in sight
    where = {n: v["where"] for n, v in verdict["null_band"]["sources"].items()}
    separated = where["correct"] == "above" and where["wrong"] == "below"
    said = any(
        words in verdict["text"]
        for words in ("cannot tell a right answer from a wrong one", "not by correctness")
    )
    assert separated or (said and "model=gpt2" in verdict["text"]), verdict["text"]
    assert sight["blind"]  # embedded:tiny, randomly initialised: named whatever the accuracy
    assert "separate sources by form" in verdict["text"]


class _Crash(Exception):
    pass


def test_a_run_with_halves_resumes_on_the_same_trajectory(tmp_path):
    folder = write_example_folder(tmp_path / "data", "noisy", n_per_source=40, n_val=24)
    cfg = TrainConfig(data_dir=str(folder), out_dir=str(tmp_path / "full"), steps=24,
                      checkpoint_every=10)  # fmt: skip
    train(cfg, progress=False)

    def crash(row: dict, setup) -> None:
        if row["step"] == 15:
            raise _Crash

    cut = cfg.replace(out_dir=str(tmp_path / "cut"))
    with pytest.raises(_Crash):
        train(cut, progress=False, callback=crash)
    train(cut, resume=True, progress=False)
    for name in ("trajectory.jsonl", "weights.json", nullband.NULL_BAND):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "full" / name).read_text()
    assert nullband.is_split(read_jsonl(tmp_path / "cut" / "trajectory.jsonl")[0]["p"])
