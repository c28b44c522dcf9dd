"""The GPU check runs end to end on the CPU with tiny shapes, ready for a GPU session."""

from __future__ import annotations

import sys

import pytest

from scalebio_core.lab import experiments
from scalebio_core.lab.experiments import benchmark


def test_benchmark_loads_a_script_once_and_names_a_missing_one(tmp_path, monkeypatch):
    module = benchmark("memory")
    assert benchmark("memory") is module and module.TOLERANCE == 0.10  # the script itself
    with pytest.raises(FileNotFoundError, match="ship with the repository"):
        benchmark("no_such_benchmark")
    monkeypatch.setattr(experiments, "CONFIG_DIR", tmp_path / "configs")  # a repository in tmp
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "broken.py").write_text("raise RuntimeError('broken script')\n")
    with pytest.raises(RuntimeError, match="broken script"):
        benchmark("broken")
    (tmp_path / "benchmarks" / "broken.py").write_text("VALUE = 1\n")
    assert benchmark("broken").VALUE == 1  # the failed load left nothing behind
    del sys.modules["scalebio_benchmark_broken"]


def test_gpu_check_tiny_on_cpu(tmp_path, capsys):
    module = benchmark("gpu_check")
    out = tmp_path / "gpu.md"
    assert module.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for mode in module.MODES:  # plain, full and LISA, with checkpointing and bf16-weights
        assert table.count(f"| {mode} |") == 2, mode
    assert "## GPU check" in out.read_text()


def _numbers(row: str) -> list[float]:
    """The numeric cells of a markdown table row ('0.12–0.34' gives both ends)."""
    import re

    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    number = r"^-?[\d.]+(?=M?$)|[\d.]+(?=–)|(?<=–)[\d.]+"
    return [float(x) for c in cells for x in re.findall(number, c)]


def test_step_cost_tiny(tmp_path, capsys):
    import math

    out = tmp_path / "RESULTS.md"
    out.write_text("# Other benchmark\n\nkept\n")
    assert benchmark("step_cost").main(["--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    labels = ("ScaleBiO full", "ScaleBiO full + gradient checkpointing", "ScaleBiO + LISA 2/12")
    for label in (*labels, "plain fine-tuning"):
        rows = [r for r in printed.splitlines() if r.startswith(f"| {label} |")]
        assert len(rows) == 1, label
        nums = _numbers(rows[0])
        assert len(nums) >= 5 and all(math.isfinite(x) for x in nums), rows[0]
        assert all(x > 0 for x in nums[:3]), rows[0]  # seconds (page faults may be 0)
    text = out.read_text()
    assert text.startswith("# Other benchmark\n\nkept\n") and "## Step cost" in text
    assert "- command: `python " in text and "- CPU: " in text


def test_cost_scaling_tiny(tmp_path, capsys, monkeypatch):
    import math

    monkeypatch.setenv("SCALEBIO_FIGURES", str(tmp_path / "figures"))
    out = tmp_path / "RESULTS.md"
    assert benchmark("cost_scaling").main(["--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    size_rows = [r for r in printed.splitlines() if r.startswith("| 0.") and "vocab 512" in r]
    k_rows = [r for r in printed.splitlines() if r.startswith(("| 2 |", "| 4 |"))]
    assert len(size_rows) == 2 and len(k_rows) == 2
    for row in size_rows + k_rows:
        nums = _numbers(row)
        assert len(nums) >= 5 and all(math.isfinite(x) and x > 0 for x in nums), row
    slopes = [r for r in printed.splitlines() if r.startswith("| **log-log slope** |")]
    assert len(slopes) == 2 and all(math.isfinite(x) for r in slopes for x in _numbers(r))
    assert (tmp_path / "figures" / "cost_scaling.png").stat().st_size > 0
    assert "## Cost scaling" in out.read_text()


def test_memory_benchmark_tiny_on_cpu(tmp_path, capsys):
    import math
    import re

    module = benchmark("memory")
    out = tmp_path / "results.md"
    out.write_text("# Other\n\nkept\n")
    assert module.main(["--tiny", "--steps", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    for name, _, _ in module.CONFIGS:
        row = next(r for r in rows if r.startswith(f"| {name} |"))
        measured, predicted = (float(c.split()[0]) for c in row.split("|")[3:5])
        assert math.isfinite(measured) and measured > 0 and math.isfinite(predicted)
    for name, *_ in (*module.SCALE_CONFIGS, *module.DEEP_CONFIGS):  # issue 13: tables 2 and 3
        row = [r for r in rows if r.startswith(f"| {name} |")][-1]
        measured, predicted = (float(c.split()[0]) for c in (row.split("|")[2], row.split("|")[4]))
        assert math.isfinite(measured) and measured > 0 and math.isfinite(predicted)
    text = out.read_text()
    assert text.startswith("# Other\n\nkept\n") and text.count("## Memory\n") == 1
    assert text.count("## Memory of the scale-out options\n") == 1
    assert text.count("## Memory of 16-bit weights on a deep model\n") == 1
    assert re.search(r"- command: `", text)
    module.write_section(out, "Memory", ["again"])  # replaces the section, does not append
    assert out.read_text().count("## Memory\n") == 1 and "kept" in out.read_text()


def test_quality_smoke(tmp_path, capsys):
    out = tmp_path / "results.md"
    args = ["--preset", "smoke", "--seeds", "0", "--runs", str(tmp_path / "runs")]
    assert benchmark("quality").main([*args, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for method in ("scalebio", "uniform", "natural", "validation", "doremi"):
        row = next(r for r in table.splitlines() if r.startswith(f"| noisy | {method} |"))
        loss = float(row.split("|")[4].split("±")[0])  # the target-loss cell: mean ± std
        assert 0 < loss < 20
    assert "## Quality" in out.read_text()


def test_peers_tiny_runs_every_method_side_by_side(tmp_path, capsys):
    """`benchmarks/peers.py --tiny` (issue 17): Betty's three hypergradients and BOAT's two
    first-order methods beside ScaleBiO, on the exact toy and on the planted mixture, from the
    `peers` extra that `make test` installs; a peer that fails would print "failed: …"."""
    out = tmp_path / "results.md"
    assert benchmark("peers").main(["--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [r for r in printed.splitlines() if r.startswith("| ") and "---" not in r]
    module = benchmark("peers")
    for method in [*module.METHODS, *module.LM_METHODS]:
        mine = [r for r in rows if r.startswith(f"| {method} |")]
        assert mine and not any("failed" in r for r in mine), (method, mine)
    lm = [r for r in rows if r.startswith("| ScaleBiO |")][-1]  # the table of (b)
    distance, heldout = (float(c) for c in lm.split("|")[5:7])
    assert 0 <= distance <= 1 and 0 < heldout < 20
    assert "## Peers: Betty and BOAT beside ScaleBiO" in out.read_text()


def test_quality_planted_reports_the_time_to_the_planted_mixture(tmp_path, capsys):
    out = tmp_path / "results.md"
    args = ["--planted", "--preset", "smoke", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert benchmark("quality").main(args) == 0
    table = capsys.readouterr().out
    for method in ("scalebio", "doremi", "uniform"):
        row = next(
            r for r in table.splitlines() if r.startswith(f"| 50 / 30 / 20 / 0 | {method} |")
        )
        final = float(row.split("|")[4].split("±")[0])
        assert 0 <= final < 1 and ("never" in row or " s (" in row)
    assert "## Quality: time to reach a planted mixture" in out.read_text()


def test_paper_scale_tiny_on_cpu(tmp_path, capsys):
    """The paper-scale check's code path (the trainer's set-up of `random:<model>`, its step, the
    memory model's prediction) on the shipped architectures scaled down."""
    import math

    module = benchmark("gpu_check")
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n## Other\n\nkept\n")
    argv = ["--paper-scale", "--device", "cpu", "--tiny", "--out", str(out)]
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("| model | params |") :].splitlines()[2:]
    assert len(table) == len(module.PAPER)
    for row, (name, gib, label, _) in zip(table, module.PAPER):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == name.split("/")[-1] and cells[2] == f"{label}, on 1 × {gib} GiB"
        assert cells[4] == "not measured (CPU)"  # no GPU peak is made up on a CPU
        predicted, s_step, tokens = float(cells[3]), float(cells[6]), float(cells[7])
        assert predicted > 0 and s_step > 0 and math.isfinite(tokens)
    text = out.read_text()
    assert "## Paper scale on one GPU" in text and "kept" in text


def test_paper_scale_reports_out_of_memory_and_budget(tmp_path, monkeypatch, capsys):
    """A configuration that runs out of GPU memory is a 'does not fit' row and the next one
    runs; configurations left when the time budget is spent are 'skipped' rows."""
    import torch

    from scalebio_core.train import trainer

    module = benchmark("gpu_check")
    real = trainer.run_step
    calls = {"n": 0}

    def first_case_runs_out(s, step, fns, step_data=None):
        calls["n"] += 1
        if "Yi-34B" in s.cfg.model:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(s, step, fns, step_data)

    monkeypatch.setattr(trainer, "run_step", first_case_runs_out)
    assert module.main(["--paper-scale", "--device", "cpu", "--tiny"]) == 0
    rows = capsys.readouterr().out.split("| model | params |")[1].splitlines()[2:]
    assert "**does not fit** (out of memory in warm-up)" in rows[0]
    assert all("does not fit" not in r and "not measured (CPU)" in r for r in rows[1:])
    assert calls["n"] > len(module.PAPER)  # the other configurations stepped
    assert module.main(["--paper-scale", "--device", "cpu", "--tiny", "--budget", "0"]) == 0
    rows = capsys.readouterr().out.split("| model | params |")[1].splitlines()[2:]
    assert len(rows) == len(module.PAPER) and all("skipped: time budget" in r for r in rows)


def test_readme_quotes_the_measured_paper_scale_table():
    """The one-GPU rows of docs/scaling.md are the GPU run's (benchmarks/RESULTS.md), and their
    predicted column is what the memory model says today for the configurations gpu_check.py
    runs."""
    import re
    from pathlib import Path

    from scalebio_core.plan.memory import GIB, plan
    from scalebio_core.plan.scaleout import plan_config

    root = Path(__file__).resolve().parent.parent
    module = benchmark("gpu_check")
    results = (root / "benchmarks" / "RESULTS.md").read_text()
    section = results.split("## Paper scale on one GPU")[1].split("\n## ")[0]
    measured = [r for r in section.splitlines() if re.match(r"\| \S+ \| [\d.]+B \|", r)]
    readme = (root / "docs" / "scaling.md").read_text()
    quoted = readme.split("**The paper's scale on one GPU (measured).**")[1].split("\n\n**")[0]
    rows = [r for r in quoted.splitlines() if re.match(r"\| (Yi|Llama|GPT-NeoX)", r)]
    assert len(measured) == len(rows) == len(module.PAPER)
    for got, quote, (name, gib, _, fields) in zip(measured, rows, module.PAPER):
        m = [c.strip() for c in got.strip("|").split("|")]
        q = [c.strip() for c in quote.strip("|").split("|")]
        peak, reserved = re.match(r"([\d.]+) \(([\d.]+)\)", m[4]).groups()
        assert q[1] == f"{m[3]} GiB" and q[2] == f"{peak} GiB ({reserved})", quote
        assert q[3] == m[5].replace("-", "−") and q[4:6] == m[6:8], quote
        cfg = plan_config(None, {"model": name, "max_length": 1024, **fields}, gpus=1)
        assert m[3] == f"{plan(cfg, 1, gib).prediction['total'] / GIB:.1f}", name
    yi = [c.strip() for c in measured[0].strip("|").split("|")]
    peak, reserved = re.match(r"([\d.]+) \(([\d.]+)\)", yi[4]).groups()
    front = " ".join((root / "README.md").read_text().split())  # it quotes the Yi-34B row
    assert f"Yi-34B with LoRA peaked at {peak} GiB ({reserved} reserved)" in front


def test_allreduce_tiny_gives_the_same_sums_in_fewer_calls(tmp_path):
    """2 gloo processes reduce the same gradients per tensor and in buckets; the script raises
    when a sum differs, and the table says how many calls each way made."""
    import subprocess

    script = benchmark("gpu_check").__file__.replace("gpu_check.py", "allreduce.py")
    out = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, script, "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r.split("|")[2].strip(): r for r in done.stdout.splitlines() if r.startswith("| ")}
    assert _numbers(rows["per tensor"])[0] == 28 and _numbers(rows["buckets"])[0] == 1
    assert "equal to the bit" in out.read_text()


def test_packing_benchmark_tiny_packs_the_varied_lengths_only(tmp_path):
    """Fresh processes per row: on the Alpaca-like lengths packing lays out fewer tokens than
    padding, with the same real tokens and weights equal to float rounding; on one length it
    lays out the same (the padded layout)."""
    import subprocess

    script = benchmark("gpu_check").__file__.replace("gpu_check.py", "packing.py")
    out = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, script, "--tiny", "--rounds", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r.split("|")[1].strip(): r for r in done.stdout.splitlines() if r.startswith("| ")}
    cells = {k: [c.strip() for c in r.strip().strip("|").split("|")] for k, r in rows.items()}
    padded, packed = (float(x) for x in cells["alpaca"][2].split(" / "))
    assert padded < packed <= 1.0
    assert cells["uniform"][2] == "1.00 / 1.00"
    assert float(cells["alpaca"][-1]) < 1e-3 and float(cells["uniform"][-1]) == 0.0
    text = out.read_text()
    assert "## Packed batches" in text and "median 126, 90th percentile 30" in text


def test_gpu_check_packing_tiny_on_cpu(tmp_path, capsys):
    module = benchmark("gpu_check")
    out = tmp_path / "gpu.md"
    assert module.main(["--packing", "--device", "cpu", "--tiny", "--out", str(out)]) == 0
    assert "| sdpa | 4 |" in capsys.readouterr().out
    assert "## GPU check: packed batches" in out.read_text()
