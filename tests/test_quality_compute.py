"""Quality per compute (issue 32, item 2): `benchmarks/quality.py --compute` at smoke end to end,
the compute each method is charged, the swarm at N as the first N proxies of a larger run, and
notebook 11 reading the same runs back."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import papermill as pm
import pytest

from scalebio_core.lab import compute
from scalebio_core.lab.experiments import benchmark, run_preset
from scalebio_core.train import runs

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "11_quality_per_compute.ipynb"
TITLE = "## Quality per compute: ScaleBiO, swarm, DoReMi, uniform"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset run once by the benchmark: (runs folder, RESULTS.md, printed text)."""
    tmp = tmp_path_factory.mktemp("compute")
    mp = pytest.MonkeyPatch()
    mp.setenv("SCALEBIO_RUNS", str(tmp / "runs"))
    out = tmp / "RESULTS.md"
    args = ["--compute", "--preset", "smoke", "--runs", str(tmp / "runs"), "--out", str(out)]
    buf = io.StringIO()  # the printed table, without capsys (a module-scoped fixture)
    with contextlib.redirect_stdout(buf):
        assert benchmark("quality").main(args) == 0
    yield tmp / "runs", out, buf.getvalue()
    mp.undo()


def _rows(runs_dir: Path, monkeypatch) -> list[dict]:
    monkeypatch.setenv("SCALEBIO_RUNS", str(runs_dir))
    return compute.run_all("smoke", progress=False)  # every run cached by the benchmark


def test_the_table_has_every_method_and_the_section_is_written(smoke):
    _, out, text = smoke
    spec = compute.settings("smoke")
    for problem in compute.problems(spec):
        lines = [ln for ln in text.splitlines() if ln.startswith(f"| {problem['name']} (")]
        methods = [ln.split(" | ")[1] for ln in lines]
        swarm = [f"swarm N={n}" for n in sorted(spec["swarm_runs"])]
        assert methods == ["ScaleBiO", *swarm, "DoReMi", "uniform"], lines
        for ln in lines:  # quality mean ± std over the seeds
            assert re.search(r"\| \d+\.\d{4} ± \d+\.\d{4} \|$", ln), ln
    section = out.read_text()
    assert TITLE in section and "What each method got" in section
    assert "swarm: proxies of 3 steps each" in section and "lr_w 0.002" in section


def test_each_method_is_charged_its_passes(smoke, monkeypatch):
    runs_dir, _, _ = smoke
    rows = _rows(runs_dir, monkeypatch)
    spec = compute.settings("smoke")
    assert {r["method"] for r in rows} == set(spec["methods"])
    for problem in {r["problem"] for r in rows}:
        for seed in spec["seeds"]:
            sel = [r for r in rows if r["problem"] == problem and r["seed"] == seed]
            by = {compute.label(r["method"], r["n"]): r for r in sel}
            swarm = sorted((r for r in sel if r["method"] == "swarm"), key=lambda r: r["n"])
            assert [r["n"] for r in swarm] == sorted(spec["swarm_runs"])
            for a, b in zip(swarm, swarm[1:]):  # more proxies, more compute and seconds
                assert a["compute"] < b["compute"] and a["fb_tokens"] < b["fb_tokens"]
                assert a["seconds"] < b["seconds"]
            sb = by["ScaleBiO"]
            traj = runs.read_jsonl(sb["run_dir"] / runs.TRAJECTORY)
            seen = sum(r["tokens"] for r in traj)  # train + validation batches
            # three passes a step: 2·train + val, more than the batches' tokens, less than twice
            assert seen < sb["fb_tokens"] < 2 * seen and sb["fo_tokens"] == 0
            assert sb["compute"] == sb["fb_tokens"] > 0 and sb["seconds"] > 0
            dr = by["DoReMi"]
            proxy = sum(r["tokens"] for r in runs.read_jsonl(dr["run_dir"] / runs.TRAJECTORY)
                        if r["phase"] == "proxy")  # fmt: skip
            assert dr["fo_tokens"] == 2 * proxy > 0
            assert by["uniform"]["compute"] == by["uniform"]["seconds"] == 0
            for r in sel:
                assert math.isfinite(r["quality"]) and r["quality"] >= 0
                assert abs(sum(r["weights"].values()) - 1) < 1e-6
            summary = json.loads((swarm[-1]["run_dir"] / "swarm.json").read_text())
            assert swarm[-1]["fb_tokens"] == summary["compute"]["forward_backward_tokens"]


def test_the_swarm_at_n_is_the_run_with_n_proxies(smoke, monkeypatch):
    """The first N proxies of the largest swarm, fitted alone, are the swarm a run with
    swarm_runs = N trains: the same proxies' losses and the same weights."""
    runs_dir, _, _ = smoke
    monkeypatch.setenv("SCALEBIO_RUNS", str(runs_dir))
    spec = compute.settings("smoke")
    problem = compute.problems(spec)[0]
    big = compute.method_run(problem, "swarm", 0, "smoke", spec)
    n = min(spec["swarm_runs"])
    fields = {**problem["run"], "seed": 0, "method": "swarm", "swarm_runs": n}
    small = run_preset("planted", "smoke", progress=False, swarm_steps=problem["swarm_steps"],
                       **fields)  # fmt: skip
    assert small != big
    losses = [r["target_loss"] for r in runs.read_jsonl(small / "swarm.jsonl")]
    assert losses == pytest.approx(
        [r["target_loss"] for r in runs.read_jsonl(big / "swarm.jsonl")][:n], abs=1e-6
    )
    weights, cost = compute.swarm_at(big, n)
    own = json.loads((small / runs.WEIGHTS).read_text())
    assert weights == pytest.approx(own, abs=1e-5)
    assert cost["fb_tokens"][-1] == sum(r["tokens"] for r in runs.read_jsonl(small / "swarm.jsonl"))


def test_a_rerun_reads_every_run_back(smoke, capsys):
    runs_dir, out, text = smoke
    args = ["--compute", "--preset", "smoke", "--runs", str(runs_dir), "--out", str(out)]
    assert benchmark("quality").main(args) == 0
    again = capsys.readouterr().out
    table = [ln for ln in text.splitlines() if ln.startswith("| ")]
    # the same numbers, but the swarm's fit is timed again: compare all but the seconds
    strip = [re.sub(r"\| [\d.]+ \| (\d+\.\d{4} ±)", r"| \1", ln) for ln in table]
    assert strip == [
        re.sub(r"\| [\d.]+ \| (\d+\.\d{4} ±)", r"| \1", ln)
        for ln in again.splitlines()
        if ln.startswith("| ")
    ]
    assert "reusing the finished run" in again


@pytest.mark.notebook
def test_notebook_11_runs_at_smoke_on_the_benchmarks_runs(smoke, tmp_path, monkeypatch):
    runs_dir, _, _ = smoke
    monkeypatch.setenv("SCALEBIO_RUNS", str(runs_dir))
    monkeypatch.setenv("SCALEBIO_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("SCALEBIO_RESULTS", str(tmp_path / "results"))
    nb = pm.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / NOTEBOOK.name),
        parameters={"PRESET": "smoke"},
        cwd=str(NOTEBOOK.parent),
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=300,
    )
    printed = "".join(
        o.get("text", "") for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]
    )
    assert "reusing the finished run" in printed  # the benchmark's runs, not new ones
    assert (tmp_path / "figures" / "11_quality_per_compute.png").stat().st_size > 10_000
    record = json.loads((tmp_path / "results" / "11_quality_per_compute.json").read_text())
    assert record["preset"] == "smoke" and "ScaleBiO" in record["sentence"]
