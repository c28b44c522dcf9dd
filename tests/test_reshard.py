"""A checkpoint resumes on another number of processes: FSDP2 shards written by 2 gloo processes
resume in one process (unsharded), a one-process checkpoint resumes sharded over 2, and a DDP
checkpoint of 2 processes resumes in one. Each resumed run continues from its checkpoint's step
and follows the uninterrupted runs.

What is compared, and how exactly: the steps before the checkpoint were run by the count that
wrote it, so they equal (bit for bit) the uninterrupted run on that count. After it, the run
follows the uninterrupted runs of both counts to float tolerance only: 2 and 1 processes compute
the same sums in another order (each rank sums its samples, then the ranks are summed), so the
trajectories of 2 and of 1 process differ in their last bits from the first step on
(test_distributed.py holds the same tolerance between them, rtol 1e-5 for p and the losses). The
final weights of u and w, and AdamW's second moments, are compared with the uninterrupted run's
for the same reason to a tolerance: AdamW divides by the root of the second moment, so where a
gradient is tiny (rare tokens' rows) the last-bit differences grow. Measured: the uninterrupted
runs of 1 and 2 processes differ by up to 2.0e-5 in a weight and 1.5e-5 (relative, a tensor's
norm) in the second moments; a resumed run from either by up to 4.0e-5 and 1.4e-5. The
tolerances (2e-4 and 1e-3) stay below what a wrong resume gives: rows in the wrong place move a
weight by its size (about 0.02), a lost optimizer state by about one step, lr = 1e-3.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distributed import ENV, ROOT, _cmd, kill_tree, wait_for_rows

from scalebio_core.core.distributed import run_launch
from scalebio_core.train.runs import load_trajectory, read_jsonl

STEPS = 8
EXTRA = {"steps": STEPS, "checkpoint_every": 2, "lisa_active": 1, "lisa_interval": 3}
"""A checkpoint every 2 steps, LISA's period 3: the kill lands mid-run, mid-period."""
FSDP = {1: {"fsdp": False}, 2: {"fsdp": True}}
"""One process runs unsharded; two shard u and w with FSDP2 (a resume may change `fsdp`)."""


def _launch(out_dir: Path, processes: int, resume: bool = False, **extra) -> str:
    """Run (or resume) the trainer on `processes` processes; its stderr."""
    out = run_launch(
        lambda port: _cmd(out_dir, processes, resume, None, port, **extra),
        cwd=ROOT,
        env=ENV,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def _killed(out_dir: Path, processes: int, rows: int = 3, **extra) -> int:
    """Start a run and SIGKILL it (the launcher and its ranks) once `rows` steps are logged;
    the step of the checkpoint it left."""
    proc = subprocess.Popen(
        _cmd(out_dir, processes, **extra),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the launcher and its workers: one process group
    )
    try:
        wait_for_rows(proc, out_dir / "trajectory.jsonl", rows)
    finally:  # on every path: the launcher and its workers
        kill_tree(proc)
    step = int(torch.load(out_dir / "checkpoints" / "last.pt", weights_only=False)["step"])
    assert 0 < step < STEPS, f"the kill left the checkpoint of step {step}"
    return step


def _models(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final w, u (parameters) and AdamW's exp_avg_sq of a run, whole: from last.pt, or
    its FSDP shards concatenated in rank order (FSDP2 splits every tensor by rows)."""
    sd = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    if "shards" in sd:
        world, step = sd["shards"]["world"], sd["step"]
        folder = run_dir / "checkpoints" / "shards"
        parts = [
            torch.load(folder / f"step{step:07d}-rank{r}.pt", weights_only=False)
            for r in range(world)
        ]
        whole = {
            k: {n: torch.cat([p[k][n] for p in parts]) for n in parts[0][k] if ":" not in n}
            for k in ("w", "u")
        }
        opt = {
            k: {
                i: torch.cat([p[k]["state"][i]["exp_avg_sq"] for p in parts])
                for i in parts[0][k]["state"]
            }
            for k in ("opt_w", "opt_u")
        }
    else:
        whole = {k: sd[k] for k in ("w", "u")}
        opt = {
            k: {i: s["exp_avg_sq"] for i, s in sd[k]["state"].items()} for k in ("opt_w", "opt_u")
        }
    out = {f"{k}.{n}": t for k, tensors in whole.items() for n, t in tensors.items()}
    out.update({f"{k}.state{i}": t for k, states in opt.items() for i, t in states.items()})
    return out


def _same_models(a: Path, b: Path) -> None:
    ma, mb = _models(a), _models(b)
    common = set(ma) & set(mb)
    assert len(common) >= 0.9 * len(mb) and any(".state" in k for k in common), sorted(mb)
    for k in sorted(common):
        if ".state" in k:  # AdamW's second moments: to 1e-3 of each tensor's norm
            assert float((mb[k] - ma[k]).norm()) <= 1e-3 * float(ma[k].norm()), k
        else:  # the weights: to 2e-4, a fifth of one step's move (lr 1e-3)
            np.testing.assert_allclose(mb[k].numpy(), ma[k].numpy(), rtol=0, atol=2e-4, err_msg=k)


def _check_resumed(run: Path, step: int, counts: tuple[int, int], stderr: str, ref: dict) -> None:
    """`run` was written by counts[0] processes until its checkpoint at `step`, then resumed by
    counts[1]: it continues from that step, its earlier rows equal the uninterrupted run on
    counts[0] (`ref[count]`: its folder), and all rows follow both uninterrupted runs."""
    assert f"resuming {run} at step {step}" in stderr, stderr[-2000:]
    worlds = [r["world_size"] for r in read_jsonl(run / "timing.jsonl")]
    assert worlds == [counts[0]] * step + [counts[1]] * (STEPS - step)
    rows = read_jsonl(run / "trajectory.jsonl")
    assert [r["step"] for r in rows] == list(range(STEPS))
    before = read_jsonl(ref[counts[0]] / "trajectory.jsonl")[:step]
    assert rows[:step] == before  # the same count and code: the same bits
    mine = load_trajectory(run)
    for count in (1, 2):
        other = load_trajectory(ref[count])
        np.testing.assert_allclose(mine["p"], other["p"], rtol=1e-5, atol=1e-7)
        for key in ("L1", "L2_w", "L2_u"):
            np.testing.assert_allclose(mine[key], other[key], rtol=1e-5)
    assert not np.allclose(mine["p"][-1], mine["p"][0])  # the weights moved: a real comparison
    assert [r["lisa_w"] for r in rows] == [
        r["lisa_w"] for r in read_jsonl(ref[1] / "trajectory.jsonl")
    ]
    _same_models(ref[counts[1]], run)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, Path]:
    """The uninterrupted runs: one process (unsharded) and two (FSDP2), by process count."""
    root = tmp_path_factory.mktemp("uninterrupted")
    out = {}
    for count in (1, 2):
        out[count] = root / f"world{count}"
        _launch(out[count], count, **EXTRA, **FSDP[count])
    return out


@pytest.mark.slow
def test_fsdp_shards_of_two_processes_resume_in_one(tmp_path, uninterrupted):
    run = tmp_path / "run"
    step = _killed(run, 2, **EXTRA, **FSDP[2])
    shards = sorted(p.name for p in (run / "checkpoints" / "shards").iterdir())
    assert shards == [f"step{step:07d}-rank{r}.pt" for r in (0, 1)]
    stderr = _launch(run, 1, resume=True, **EXTRA, **FSDP[1])
    _check_resumed(run, step, (2, 1), stderr, uninterrupted)
    assert not list((run / "checkpoints" / "shards").iterdir())  # last.pt holds the models now


@pytest.mark.slow
def test_one_process_checkpoint_resumes_sharded_over_two(tmp_path, uninterrupted):
    run = tmp_path / "run"
    step = _killed(run, 1, **EXTRA, **FSDP[1])
    stderr = _launch(run, 2, resume=True, **EXTRA, **FSDP[2])
    _check_resumed(run, step, (1, 2), stderr, uninterrupted)
    shards = sorted(p.name for p in (run / "checkpoints" / "shards").iterdir())
    assert shards == [f"step{STEPS:07d}-rank{r}.pt" for r in (0, 1)]


@pytest.mark.slow
def test_ddp_checkpoint_of_two_processes_resumes_in_one(tmp_path, uninterrupted):
    """DDP and one process both keep whole models in last.pt: the trajectory goes on."""
    run = tmp_path / "run"
    step = _killed(run, 2, **EXTRA, **FSDP[1])
    stderr = _launch(run, 1, resume=True, **EXTRA, **FSDP[1])
    assert f"resuming {run} at step {step}" in stderr, stderr[-2000:]
    worlds = [r["world_size"] for r in read_jsonl(run / "timing.jsonl")]
    assert worlds == [2] * step + [1] * (STEPS - step)
    mine, one = load_trajectory(run), load_trajectory(uninterrupted[1])
    np.testing.assert_allclose(mine["p"], one["p"], rtol=1e-5, atol=1e-7)
    for key in ("L1", "L2_w", "L2_u"):
        np.testing.assert_allclose(mine[key], one[key], rtol=1e-5)
    _same_models(uninterrupted[1], run)


def test_shards_of_any_count_load_as_whole_tensors_row_by_row():
    """The reassembly alone, in this process: a model's state split by rows as FSDP2 splits it
    over 3 ranks (torch.chunk: 2, 2 and 1 rows of a 5-row tensor; an empty last part of a
    2-row one) loads into an unsharded copy as the whole state; the rest of the state (steps,
    hyperparameters) as saved."""
    from types import SimpleNamespace

    from scalebio_core.parallel.sharding import load_parts

    torch.manual_seed(0)

    def model() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))

    def state(w: torch.nn.Module, u: torch.nn.Module) -> SimpleNamespace:
        opts = [torch.optim.AdamW(m.parameters(), lr=0.1) for m in (w, u)]
        return SimpleNamespace(w=w, u=u, opt_w=opts[0], opt_u=opts[1])

    src = state(model(), model())
    for m, opt in ((src.w, src.opt_w), (src.u, src.opt_u)):
        m(torch.randn(4, 3)).square().sum().backward()
        opt.step()

    def split(t: torch.Tensor, r: int) -> torch.Tensor:
        chunks = list(torch.chunk(t, 3))
        chunks += [t[:0]] * (3 - len(chunks))
        return chunks[r].clone()

    def part(r: int) -> dict:
        out = {}
        for name in ("w", "u"):
            m, opt = getattr(src, name), getattr(src, f"opt_{name}")
            out[name] = {n: split(p.detach(), r) for n, p in m.named_parameters()}
            sd = opt.state_dict()
            states = {
                i: {k: split(v, r) if v.ndim else v.clone() for k, v in s.items()}
                for i, s in sd["state"].items()
            }
            out[f"opt_{name}"] = {"state": states, "param_groups": sd["param_groups"]}
        return out

    dst = state(model(), model())
    load_parts(dst, [part(r) for r in range(3)])
    for name in ("w", "u"):
        a, b = getattr(src, name), getattr(dst, name)
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), n
        sa, sb = getattr(src, f"opt_{name}").state_dict(), getattr(dst, f"opt_{name}").state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        for i in sa["state"]:
            for k in sa["state"][i]:
                assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (name, i, k)


def test_a_part_saved_whole_on_every_rank_is_read_once():
    """Older versions saved FSDP's gathered root parameters whole in each rank's file: such a
    tensor is the whole, not twice its rows; parts that do not add up are refused by name."""
    from scalebio_core.errors import ConfigError
    from scalebio_core.parallel.sharding import _rows

    t = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(_rows([t, t.clone()], 0, 5, "x", t.shape), t)
    assert torch.equal(_rows([t[:3], t[3:]], 2, 4, "x", t.shape), t[2:4])
    with pytest.raises(ConfigError, match=r"x is saved with shape \[4, 2\] .* \[5, 2\]"):
        _rows([t[:3], t[4:]], 0, 5, "x", t.shape)
