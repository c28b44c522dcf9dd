"""Baselines as runs on a tiny model, resampling, fine-tuning and evaluation, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from scalebio_core.errors import ConfigError, DataError
from scalebio_core.train.config import TrainConfig
from scalebio_core.train.pipeline import grade, heldout_records, resample, resample_run, sft
from scalebio_core.train.runs import read_jsonl
from scalebio_core.train.trainer import train

SMOKE = dict(
    corpus="informative",
    corpus_args={"n_terse": 45, "n_detailed": 15, "n_val": 16},
    model="embedded:nano",
    max_length=96,
    steps=4,
    batch_size=8,
    val_batch_size=4,
    lr_w=2e-3,
    lr_u=2e-3,
    checkpoint_every=2,
)


def smoke(tmp_path: Path, name: str, **kw) -> TrainConfig:
    return TrainConfig(**{**SMOKE, "out_dir": str(tmp_path / name), **kw})


def test_fixed_baselines_write_a_run_directory(tmp_path):
    for method, expected in [
        ("uniform", {"detailed": 0.5, "terse": 0.5}),
        ("natural", {"detailed": 0.25, "terse": 0.75}),
        ("validation", {"detailed": 0.0, "terse": 0.0, "validation": 1.0}),
    ]:
        cfg = smoke(tmp_path, method, method=method)
        assert train(cfg, progress=False) == pytest.approx(expected)
        run = tmp_path / method
        assert json.loads((run / "weights.json").read_text()) == pytest.approx(expected)
        assert read_jsonl(run / "trajectory.jsonl")[0]["p"] == pytest.approx(expected)
        assert (run / "config.yaml").exists()
    with pytest.raises(ConfigError, match="method must be one of"):
        smoke(tmp_path, "x", method="best")


def test_doremi_run_resumes_on_the_identical_trajectory(tmp_path):
    cfg = smoke(tmp_path, "full", method="doremi", doremi_ref_steps=3)
    weights = train(cfg, progress=False)
    rows = read_jsonl(tmp_path / "full" / "trajectory.jsonl")
    assert [r["phase"] for r in rows] == ["reference"] * 3 + ["proxy"] * 4
    assert all(r["p"] == pytest.approx({"detailed": 0.5, "terse": 0.5}) for r in rows[:3])
    proxy = np.array([[r["p"][n] for n in ("detailed", "terse")] for r in rows[3:]])
    assert list(weights.values()) == pytest.approx(proxy.mean(0).tolist())
    assert not np.allclose(proxy, 0.5)  # the weights moved

    class Crash(Exception):
        pass

    def crash_at_5(row, s):
        if row["step"] == 5:
            raise Crash

    cut = smoke(tmp_path, "cut", method="doremi", doremi_ref_steps=3)
    with pytest.raises(Crash):
        train(cut, progress=False, callback=crash_at_5)
    assert train(cut, resume=True, progress=False) == pytest.approx(weights, rel=1e-6)
    again = read_jsonl(tmp_path / "cut" / "trajectory.jsonl")
    assert [r["step"] for r in again] == list(range(7))
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_resample_counts_validation_and_errors():
    recs = {
        "a": [{"prompt": "p", "response": f"a{i}"} for i in range(3)],
        "b": [{"prompt": "p", "response": f"b{i}"} for i in range(50)],
    }
    val = [{"prompt": "q", "response": "v"}]
    out = resample({"a": 0.7, "b": 0.3}, recs, 10, seed=1)
    assert Counter(r["source"] for r in out) == {"a": 7, "b": 3}
    # a small source is used whole before any record repeats
    assert Counter(r["response"] for r in out if r["source"] == "a").most_common(1)[0][1] == 3
    assert Counter(r["source"] for r in resample({"a": 1 / 3, "b": 2 / 3}, recs, 10)) == {
        "a": 3,
        "b": 7,
    }
    only_val = resample({"a": 0.0, "b": 0.0, "validation": 1.0}, recs, 4, validation=val)
    assert [r["response"] for r in only_val] == ["v"] * 4
    added = resample({"a": 0.5, "b": 0.5}, recs, 4, validation=val, add_validation=True)
    assert len(added) == 5 and sum(r["source"] == "validation" for r in added) == 1
    with pytest.raises(ConfigError, match=r"unknown \['c'\], missing \['b'\]"):
        resample({"a": 0.5, "c": 0.5}, recs, 4)
    with pytest.raises(ConfigError, match="sum to 1"):
        resample({"a": 0.5, "b": 0.6}, recs, 4)


def test_held_out_target_set_is_disjoint(tmp_path):
    cfg = smoke(tmp_path, "t")
    test = heldout_records(cfg)
    from scalebio_core.sources.data import load_records, load_sources
    from scalebio_core.train.build import data_specs

    specs, val_spec = data_specs(cfg)
    seen = {(r["prompt"], r["response"]) for v in load_sources(specs).values() for r in v}
    seen |= {(r["prompt"], r["response"]) for r in load_records(val_spec)}
    assert test and not seen & {(r["prompt"], r["response"]) for r in test}
    with pytest.raises(ConfigError, match="no held-out test set"):
        heldout_records(smoke(tmp_path, "d", data_dir=str(tmp_path)))


def test_resample_and_fine_tune_end_to_end(tmp_path):
    cfg = smoke(tmp_path, "natural", method="natural")
    train(cfg, progress=False)
    data = resample_run(tmp_path / "natural", 40, seed=0)
    assert Counter(r["source"] for r in read_jsonl(data)) == {"terse": 30, "detailed": 10}
    result = sft(smoke(tmp_path, "x"), data, tmp_path / "sft", token_budget=3000, progress=False)
    rows = read_jsonl(tmp_path / "sft" / "trajectory.jsonl")
    assert len(rows) == result["steps"] and result["tokens"] == rows[-1]["tokens"]
    # steps from the budget: ceil(budget / (batch · mean tokens)), the budget met in expectation
    assert 0.8 * 3000 < result["tokens"] < 1.2 * 3000 + 8 * 96
    assert np.isfinite(result["target_loss"]) and 0.0 <= result["accuracy"] <= 1.0
    saved = json.loads((tmp_path / "sft" / "eval.json").read_text())
    assert saved["target_loss"] == pytest.approx(result["target_loss"])
    with pytest.raises(ConfigError, match="ran already"):
        sft(smoke(tmp_path, "x"), data, tmp_path / "sft", progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        sft(smoke(tmp_path, "x"), tmp_path / "none.jsonl", tmp_path / "sft2", progress=False)


def test_cli_resample_and_sft(tmp_path):
    train(smoke(tmp_path, "u", method="uniform"), progress=False)
    py = [sys.executable, "-m", "scalebio_core"]
    out = subprocess.run(
        [*py, "resample", "--run", str(tmp_path / "u"), "--n", "20", "--add-validation"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out)["counts"] == {"detailed": 10, "terse": 10, "validation": 16}
    cfg = tmp_path / "u" / "config.yaml"
    out = subprocess.run(
        [
            *py,
            "sft",
            "--config",
            str(cfg),
            "--data",
            str(tmp_path / "u" / "resampled.jsonl"),
            "--out",
            str(tmp_path / "sft"),
            "--no-progress",
            "steps=2",
            "method=scalebio",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out)["steps"] == 2
    bad = subprocess.run(
        [*py, "resample", "--run", str(tmp_path / "none"), "--n", "5"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "config.yaml does not exist" in bad.stderr


def _main(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr)."""
    from scalebio_core.cli import main

    capsys.readouterr()
    return main(list(args)), capsys.readouterr().err


def test_resample_never_overwrites_a_file_that_is_not_its_own(tmp_path, capsys):
    """Issue 27, item 4: `resample --out FILE` overwrote any file (a user's source, a run's
    trajectory.jsonl). An existing file is replaced only with --overwrite, and only when it is
    resample's own earlier output."""
    train(smoke(tmp_path, "u", method="uniform"), progress=False)
    run = tmp_path / "u"
    first = resample_run(run, 10)
    assert first == run / "resampled.jsonl"
    with pytest.raises(ConfigError, match=r"an earlier output of resample\); nothing was written"):
        resample_run(run, 10, seed=1)
    assert resample_run(run, 12, seed=1, overwrite=True) == first and len(read_jsonl(first)) == 12
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"prompt": "p", "response": "r"}\n')
    kept = {f: f.read_bytes() for f in (mine, run / "trajectory.jsonl", run / "weights.json")}
    for f in kept:
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match="is not an output of resample .*nothing was"):
                resample_run(run, 5, f, overwrite=overwrite)
    code, err = _main(capsys, "resample", "--run", str(run), "--n", "5", "--out", str(mine),
                      "--overwrite")  # fmt: skip
    assert code == 2 and f"{mine} exists and is not an output of resample" in err, err
    assert all(f.read_bytes() == b for f, b in kept.items())
    code, err = _main(capsys, "resample", "--run", str(run), "--n", "5", "--out", str(tmp_path))
    assert code == 2 and "is a folder" in err, err


def test_sft_never_overwrites_a_folder_that_is_not_its_own(tmp_path, capsys):
    """Issue 27, item 4: `sft --out DIR` into a folder of the user's files overwrote its
    config.yaml, trajectory.jsonl and data/validation.jsonl. Such a folder is refused (with or
    without --overwrite); sft's own earlier output is replaced only with --overwrite."""
    train(smoke(tmp_path, "u", method="uniform"), progress=False)
    out = tmp_path / "ft"
    data = resample_run(tmp_path / "u", 24, out / "data" / "train.jsonl")  # may lie in --out
    cfg = smoke(tmp_path, "x", steps=2)
    user = tmp_path / "user"
    files = {
        "config.yaml": "my: notes\n",
        "trajectory.jsonl": "{}\n",
        "data/validation.jsonl": "mine\n",
        "notes.txt": "keep\n",
    }
    for name, text in files.items():
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(text)
    held = "config.yaml, data/validation.jsonl, notes.txt, trajectory.jsonl"
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=f"not an earlier output of sft: it holds {held}. "):
            sft(cfg, data, user, progress=False, overwrite=overwrite)
    code, err = _main(capsys, "sft", "--data", str(data), "--out", str(user), "--overwrite")
    assert code == 2 and "Nothing was written" in err, err
    assert {n: (user / n).read_text() for n in files} == files
    assert sorted(p.name for p in user.iterdir()) == [
        "config.yaml",
        "data",
        "notes.txt",
        "trajectory.jsonl",
    ]

    sft(cfg, data, out, progress=False)  # a folder that holds only the data: fine
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError, match=r"ran already; nothing was written. Pass --overwrite"):
        sft(cfg, data, out, progress=False)
    (out / "eval.json").unlink()
    with pytest.raises(ConfigError, match=r"holds an unfinished fine-tuning of sft"):
        sft(cfg, data, out, progress=False)
    result = sft(cfg, data, out, progress=False, overwrite=True)
    assert json.loads((out / "eval.json").read_text())["steps"] == result["steps"] == 2
    assert len(read_jsonl(out / "timing.jsonl")) == 2  # the earlier fine-tuning's rows are gone
    assert (out / "notes.txt").read_text() == "mine\n" and len(read_jsonl(data)) == 24


def test_compare_methods_is_cached(tmp_path, monkeypatch):
    from scalebio_core.lab.experiments import compare_methods, summarize

    monkeypatch.setenv("SCALEBIO_RUNS", str(tmp_path))
    spec = {
        "methods": ["uniform", "natural"],
        "seeds": [0, 1],
        "n": 30,
        "token_budget": 1500,
        "sft": {"lr_w": 0.002, "batch_size": 8},
    }
    rows = compare_methods("informative", "smoke", spec, progress=False)
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("uniform", 0),
        ("uniform", 1),
        ("natural", 0),
        ("natural", 1),
    ]
    stamp = (tmp_path / "sft_informative_smoke" / "natural_seed1" / "eval.json").stat().st_mtime
    assert compare_methods("informative", "smoke", spec, progress=False) == rows
    assert (
        tmp_path / "sft_informative_smoke" / "natural_seed1" / "eval.json"
    ).stat().st_mtime == stamp
    table = summarize(rows)
    assert [t["method"] for t in table] == ["uniform", "natural"]
    assert all(t["seeds"] == 2 and np.isfinite(t["loss_std"]) for t in table)


@pytest.mark.parametrize("name", ["noisy", "informative", "multilingual", "math"])
def test_paper_presets_declare_a_held_out_test_set(name):
    from scalebio_core.lab.experiments import preset_config

    cfg = preset_config(name, "paper")
    assert cfg.test and (cfg.test.get("path") or cfg.test.get("hf_name"))
    assert cfg.test != cfg.validation


def test_grade_exact_and_math_verify():
    expected = "48 in April and 24 in May. The answer is 72."
    assert grade("So 72 in all. The answer is 72.", expected)
    assert not grade("The answer is 72.0.", expected)  # exact: the strings differ
    assert grade("so the total is \\boxed{72}", expected)  # exact: the last \\boxed{} is the answer
    assert not grade("\\boxed{72.0}", expected) and not grade("\\boxed{7}", expected)
    # math-verify compares the final answers as expressions, in any of the usual notations
    for said in ("The answer is 72.0.", "so the total is \\boxed{72}", "$72$"):
        assert grade(said, expected, "math-verify"), said
    assert grade("\\boxed{0.5}", "The answer is \\frac{1}{2}.", "math-verify")
    for said in ("The answer is 71.", "\\boxed{7}", "no idea"):
        assert not grade(said, expected, "math-verify"), said
    with pytest.raises(DataError, match="cannot parse the expected answer"):
        grade("72", "The answer is many.", "math-verify")
    with pytest.raises(ConfigError, match="unknown grader"):
        grade("72", expected, "fuzzy")
    with pytest.raises(ConfigError, match="grader must be one of"):
        TrainConfig(grader="fuzzy")


def test_sft_is_a_run_like_every_method(tmp_path):
    """Issue 28: sft runs through `loop.run` (its lock, its files, method 'sft'), with no
    checkpoint, no weights.json and no identity (it is rerun, never resumed)."""
    from scalebio_core.files import load_yaml
    from scalebio_core.train.runs import RunLock

    train(smoke(tmp_path, "u", method="uniform"), progress=False)
    data = resample_run(tmp_path / "u", 24, tmp_path / "train.jsonl")
    out = tmp_path / "ft"
    result = sft(smoke(tmp_path, "x", steps=2), data, out, token_budget=900, progress=False)
    saved = load_yaml((out / "config.yaml").read_text())
    assert saved["method"] == "sft" and saved["token_budget"] == 900
    assert saved["steps"] == result["steps"] == len(read_jsonl(out / "trajectory.jsonl"))
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "config.yaml", "data", "eval.json", "timing.jsonl", "trajectory.jsonl"
    ]  # fmt: skip
    held = RunLock(out).acquire()  # another process's run in that folder
    try:
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
        with pytest.raises(ConfigError, match="in use by another run"):
            sft(smoke(tmp_path, "x", steps=2), data, out, progress=False, overwrite=True)
        after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before  # nothing of the earlier fine-tuning was touched
    finally:
        held.release()
    with pytest.raises(ConfigError, match="python -m scalebio_core sft --data FILE --out DIR"):
        train(smoke(tmp_path, "m", method="sft"), progress=False)


def _leaky_run(tmp_path: Path) -> tuple[Path, Path]:
    """A data folder (the example folder: two sources of 30 records) whose test.jsonl also holds
    5 records of the source noise_0.0, and a run folder on it weighing that source 0.9 (a
    config.yaml and weights.json are all `resample` reads)."""
    from scalebio_core.files import write_yaml
    from scalebio_core.sources.data import SourceSpec, load_records
    from scalebio_core.train.pipeline import write_example_folder

    data = write_example_folder(
        tmp_path / "data", "noisy", n_per_source=30, n_val=12, noise_rates=[0.0, 1.0]
    )
    source = SourceSpec(name="noise_0.0", path=str(data / "noise_0.0.jsonl"))
    leaked = [{"prompt": r["prompt"], "response": r["response"]} for r in load_records(source)]
    with open(data / "test.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in leaked[:5]))
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(data_dir=str(data), model="embedded:nano", out_dir=str(run))
    write_yaml(run / "config.yaml", cfg.to_dict())
    (run / "weights.json").write_text(json.dumps({"noise_0.0": 0.9, "noise_1.0": 0.1}))
    return data, run


def test_resample_says_repeats_and_test_records_in_one_clean_line_each(tmp_path):
    """Issue 30, items 3 and 5: `resample --n` beyond a source's size said no repeat factor, and
    nothing of the test records it wrote; warnings echoed source paths and code lines."""
    data, run = _leaky_run(tmp_path)
    n_test = len((data / "test.jsonl").read_text().splitlines())
    py = [sys.executable, "-m", "scalebio_core"]
    done = subprocess.run(
        [*py, "resample", "--run", str(run), "--n", "90"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"] == {"noise_0.0": 81, "noise_1.0": 9}
    lines = done.stderr.splitlines()
    assert lines and all(x.startswith("warning: ") for x in lines), lines  # no path, no code
    said = "\n".join(lines)
    assert "noise_0.0: 81 draws of 30 records, each record about 2.7 times" in said
    assert f"5 of {n_test} test records are in the training data too (resampled.jsonl: 5)" in said
    assert "validation records" not in said  # the example folder's validation set is apart


def test_sft_warns_of_test_records_it_trains_on_and_takes_exact_match_on(tmp_path):
    """Issue 30: sft said nothing of the test records in resampled.jsonl; `exact_match=on` on
    the command line was refused (YAML reads on as true)."""
    data, run = _leaky_run(tmp_path)
    n_test = len((data / "test.jsonl").read_text().splitlines())
    with pytest.warns(UserWarning, match="resampling repeats records"):
        resampled = resample_run(run, 60)
    py = [sys.executable, "-m", "scalebio_core", "sft", "--data", str(resampled)]
    args = ["--out", str(tmp_path / "sft"), "--no-progress", f"data_dir={data}"]
    args += ["model=embedded:nano", "steps=1", "batch_size=4", "exact_match=on"]
    done = subprocess.run([*py, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in json.loads(done.stdout)  # exact_match=on reached the evaluation
    warned = [x for x in done.stderr.splitlines() if x.startswith("warning: ")]
    assert f"5 of {n_test} test records are in the training data too (resampled.jsonl: 5)" in (
        "\n".join(warned)
    )
    assert not [x for x in done.stderr.splitlines() if "Warning:" in x or ".py:" in x]
