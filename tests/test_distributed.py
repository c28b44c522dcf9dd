"""Two processes over gloo (accelerate launch) follow the one-process trajectory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scalebio_core.runs import load_trajectory, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
BASE = {
    "corpus": "noisy",
    "corpus_args": {"n_per_source": 24, "n_val": 16, "noise_rates": [0.0, 0.5, 1.0]},
    "model": "embedded:nano",
    "max_length": 80,
    "steps": 6,
    "batch_size": 12,
    "val_batch_size": 8,
    "lr_w": 1e-3,
    "lr_u": 1e-3,
    "lr_lam": 0.05,
    "checkpoint_every": 3,
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out_dir: Path, processes: int, **extra) -> None:
    overrides = [
        f"{k}={json.dumps(v)}" for k, v in {**BASE, **extra, "out_dir": str(out_dir)}.items()
    ]
    train = ["-m", "scalebio_core", "train", "--no-progress", *overrides]
    if processes == 1:
        cmd = [sys.executable, *train]
    else:  # --multi_gpu without GPUs runs gloo on the CPU; --cpu would silently run one process
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_port()),
            *train,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("lisa_active", [0, 1])
def test_two_processes_follow_the_one_process_trajectory(tmp_path, lisa_active):
    extra = {"lisa_active": lisa_active, "lisa_interval": 2} if lisa_active else {}
    _run(tmp_path / "one", 1, **extra)
    _run(tmp_path / "two", 2, **extra)
    timing = read_jsonl(tmp_path / "two" / "timing.jsonl")
    assert {r["world_size"] for r in timing} == {2}, "accelerate did not start two processes"
    assert {r["world_size"] for r in read_jsonl(tmp_path / "one" / "timing.jsonl")} == {1}
    a, b = load_trajectory(tmp_path / "one"), load_trajectory(tmp_path / "two")
    assert len(a["step"]) == len(b["step"]) == BASE["steps"]
    np.testing.assert_allclose(b["p"], a["p"], rtol=1e-5, atol=1e-7)
    for key in ("L1", "L2_w", "L2_u"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5)
    assert not np.allclose(a["p"][-1], a["p"][0])  # the weights moved: a real comparison
    one = [
        json.loads(x) for x in (tmp_path / "one" / "trajectory.jsonl").read_text().split("\n") if x
    ]
    two = [
        json.loads(x) for x in (tmp_path / "two" / "trajectory.jsonl").read_text().split("\n") if x
    ]
    assert [r["lisa_w"] for r in one] == [r["lisa_w"] for r in two]
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
