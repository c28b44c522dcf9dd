"""A run folder that cannot be spliced or clobbered, and stops that say what they kept (issue 27):
every case was first seen as a silent loss (exit 0), a raw traceback or silence, and is
reproduced here: a checkpoint of another run, data edited between a kill and its resume, a
damaged trajectory, a stray lock, SIGTERM and SIGINT, a full disk, another model size."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from test_distributed import wait_for_rows
from test_rundirs import Crash, _crash_at
from test_trainer import SMOKE, smoke

from scalebio_core.errors import ConfigError, DataError, Interrupted, TrainingStopped
from scalebio_core.files import DiskFullError
from scalebio_core.train import loop
from scalebio_core.train.config import TrainConfig
from scalebio_core.train.runs import load_trajectory, read_jsonl
from scalebio_core.train.trainer import train

ROOT = Path(__file__).resolve().parent.parent


def _killed(cfg: TrainConfig, at: int) -> Path:
    """The run of `cfg` stopped by a crash after step `at` (its checkpoint: the last multiple of
    checkpoint_every at or before it)."""
    with pytest.raises(Crash):
        train(cfg, progress=False, callback=_crash_at(at))
    return Path(cfg.out_dir)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------ 1, 8: a checkpoint of another run


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path):
    """Same config with another seed, or a longer run: its checkpoint copied into checkpoints/
    is refused before anything changes (it used to be resumed, splicing the trajectory)."""
    run = _killed(smoke(tmp_path), at=2)  # checkpoint at step 2
    other_seed = _killed(smoke(tmp_path, seed=1, out_dir=str(tmp_path / "seed1")), at=2)
    longer = _killed(smoke(tmp_path, steps=12, out_dir=str(tmp_path / "longer")), at=4)
    mine = (run / "checkpoints" / "last.pt").read_bytes()
    for other, differs in ((other_seed, "seed: 1 in the checkpoint, 0 in this run"),
                           (longer, "steps: 12 in the checkpoint, 6 in this run")):  # fmt: skip
        shutil.copy(other / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
        before = _files(run)
        with pytest.raises(ConfigError, match="belongs to another run") as refused:
            train(smoke(tmp_path), resume=True, progress=False)
        assert differs in str(refused.value)
        assert _files(run) == before  # nothing changed: no log cut, no weights.json written
    (run / "checkpoints" / "last.pt").write_bytes(mine)  # its own: resumes to the end
    train(smoke(tmp_path), resume=True, progress=False)
    assert [r["step"] for r in read_jsonl(run / "trajectory.jsonl")] == list(range(6))


def test_a_checkpoint_of_another_model_size_is_refused_by_name(tmp_path):
    run = _killed(smoke(tmp_path), at=2)
    tiny = _killed(smoke(tmp_path, model="embedded:tiny", out_dir=str(tmp_path / "tiny")), at=2)
    shutil.copy(tiny / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    with pytest.raises(ConfigError, match="belongs to another run") as refused:
        train(smoke(tmp_path), resume=True, progress=False)
    text = str(refused.value)
    assert "model: 'embedded:tiny' in the checkpoint, 'embedded:nano' in this run" in text
    assert "the checkpoint's model has" in text and "size mismatch" not in text
    # a checkpoint of an older version (no identity): its shapes still get a clear error
    sd = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    del sd["identity"]
    torch.save(sd, run / "checkpoints" / "last.pt")
    with (
        pytest.warns(UserWarning, match="without its run's identity"),
        pytest.raises(ConfigError, match="does not fit this run's model"),
    ):
        train(smoke(tmp_path), resume=True, progress=False)


# ------------------------------------------------------------------ 2: data edited before a resume


def _data_dir(tmp_path: Path) -> Path:
    from scalebio_core.train.pipeline import write_example_folder

    return write_example_folder(
        tmp_path / "data", "noisy", n_per_source=24, n_val=16, noise_rates=[0.0, 0.5, 1.0]
    )


def test_data_edited_between_a_kill_and_its_resume_is_refused_by_file_or_recorded(tmp_path, capsys):
    data = _data_dir(tmp_path)
    over = {k: v for k, v in SMOKE.items() if k not in ("corpus", "corpus_args")}
    cfg = TrainConfig(**over, data_dir=str(data), out_dir=str(tmp_path / "run"))
    run = _killed(cfg, at=2)
    identity = json.loads((run / "identity.json").read_text())
    edited = sorted(data.glob("noise_0.5*"))[0]
    assert identity["data"]["files"][str(edited.resolve())]  # every data file is fingerprinted
    lines = edited.read_text().splitlines()
    record = json.loads(lines[0])
    record["output"] = "an edited answer"
    edited.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    before = _files(run)
    with pytest.raises(ConfigError, match="the data differs") as refused:
        train(cfg, resume=True, progress=False)
    assert f"{edited.resolve()}: changed" in str(refused.value)
    assert "--accept-changed-data" in str(refused.value)
    assert _files(run) == before
    from scalebio_core.cli import main

    capsys.readouterr()
    args = ["train", "--config", str(run / "config.yaml"), "--resume", "--no-progress"]
    assert main([*args, "--accept-changed-data"]) == 0, capsys.readouterr().err
    assert "changed data: " + str(edited.resolve()) in capsys.readouterr().err
    (change,) = read_jsonl(run / "changes.jsonl")
    assert change["step"] == 2 and str(edited.resolve()) in change["data"]
    assert "tokenized train" in change["data"] and "tokenized validation" not in change["data"]
    assert [r["step"] for r in read_jsonl(run / "trajectory.jsonl")] == list(range(6))
    now = json.loads((run / "identity.json").read_text())
    assert now["data"]["files"][str(edited.resolve())] == change["data"][str(edited.resolve())][1]


# ------------------------------------------------------------------ 3: a damaged trajectory


def test_a_damaged_line_in_the_covered_trajectory_is_refused_never_dropped(tmp_path):
    run = _killed(smoke(tmp_path), at=4)  # checkpoint at step 4: rows 0..3 are covered
    traj = run / "trajectory.jsonl"
    whole = traj.read_text().splitlines()
    traj.write_text("\n".join([whole[0], "garbage{", *whole[2:]]) + "\n")  # step 1 damaged
    before = _files(run)
    with pytest.raises(ConfigError, match=r"steps 1 are missing \(damaged lines: line 2: "):
        train(smoke(tmp_path), resume=True, progress=False)
    assert _files(run) == before  # no row dropped, no log cut
    with pytest.raises(DataError, match="line 2 is damaged"):  # readers refuse it too
        load_trajectory(run)
    # a stray line between whole rows, every step there: left out, said, and the run goes on
    traj.write_text("\n".join([*whole[:2], "[1, 2", *whole[2:]]) + "\n")
    with pytest.warns(UserWarning, match=r"damaged lines between whole rows left out \(line 3"):
        train(smoke(tmp_path), resume=True, progress=False)
    assert [r["step"] for r in read_jsonl(traj)] == list(range(6))
    assert "[1, 2" not in traj.read_text()


def test_a_torn_last_line_is_what_a_crash_leaves_and_is_run_again(tmp_path):
    full = tmp_path / "full"
    train(smoke(tmp_path, out_dir=str(full)), progress=False)
    run = _killed(smoke(tmp_path), at=4)
    with open(run / "trajectory.jsonl", "a") as f:
        f.write('{"step": 5, "p": {"noi')  # a crash while appending
    train(smoke(tmp_path), resume=True, progress=False)
    assert (run / "trajectory.jsonl").read_text() == (full / "trajectory.jsonl").read_text()


# ------------------------------------------------------------------ 5: a lock is not a run


@pytest.mark.parametrize("resume", [False, True])
def test_a_stray_lock_beside_the_users_config_is_not_taken_for_a_run(tmp_path, resume):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".lock").write_text("")
    (mine / "config.yaml").write_text("my: own settings\n")
    before = _files(mine)
    with pytest.raises(ConfigError, match="not a run of this package: it holds config.yaml"):
        train(smoke(tmp_path, out_dir=str(mine)), resume=resume, progress=False)
    assert _files(mine) == before


def test_a_run_killed_between_its_lock_and_its_config_is_started_again(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("pid 1 on elsewhere")  # a run writes its empty trajectory
    (run / "trajectory.jsonl").write_text("")  # before its config
    train(smoke(tmp_path, steps=2), progress=False)
    assert [r["step"] for r in read_jsonl(run / "trajectory.jsonl")] == [0, 1]


# ------------------------------------------------------------------ 6: SIGTERM and SIGINT


def _signal_at(step: int, *signals: int):
    def callback(row, s):
        if row["step"] == step:
            for sig in signals:
                os.kill(os.getpid(), sig)

    return callback


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_at_the_next_step_with_a_checkpoint(tmp_path, sig):
    full = tmp_path / "full"
    train(smoke(tmp_path, out_dir=str(full)), progress=False)
    cfg = smoke(tmp_path)
    with pytest.raises(Interrupted) as stopped:
        train(cfg, progress=False, callback=_signal_at(2, sig))
    e, run = stopped.value, Path(cfg.out_dir)
    assert e.exit_code == 128 + sig
    name = signal.Signals(sig).name
    assert f"stopped by {name} after step 3 of 6: its checkpoint is at step 3" in str(e)
    resume = f"python -m scalebio_core train --config {run.resolve() / 'config.yaml'} --resume"
    assert str(e).endswith(f"Resume with: {resume}")
    assert len(read_jsonl(run / "trajectory.jsonl")) == 3
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"] == 3
    assert not isinstance(signal.getsignal(sig), loop.CaughtSignals)  # the handlers are back
    train(cfg, resume=True, progress=False)
    assert (run / "trajectory.jsonl").read_text() == (full / "trajectory.jsonl").read_text()


def test_a_second_signal_stops_at_once_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "REPEAT_WINDOW", 0.0)
    cfg = smoke(tmp_path)
    with pytest.raises(Interrupted, match="its checkpoint is at step 2"):
        train(cfg, progress=False, callback=_signal_at(2, signal.SIGTERM, signal.SIGTERM))
    assert (
        torch.load(Path(cfg.out_dir) / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
    )


def test_a_signal_while_the_run_is_set_up_stops_it_at_once(tmp_path, monkeypatch):
    from scalebio_core.train import trainer

    real = trainer.ScaleBiORun.__init__

    def signalled(self, cfg, accelerator):
        real(self, cfg, accelerator)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer.ScaleBiORun, "__init__", signalled)
    with pytest.raises(Interrupted, match="while the run was set up: nothing was trained"):
        train(smoke(tmp_path), progress=False)
    monkeypatch.undo()
    train(smoke(tmp_path), progress=False)  # the same command again starts it
    assert len(read_jsonl(tmp_path / "run" / "trajectory.jsonl")) == 6


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_command_line_stopped_by_a_signal_says_how_to_resume(tmp_path, sig):
    """A batch scheduler's SIGTERM (was: silent, status -15) and Ctrl-C (was: a 40-line
    traceback): a message with the resume command, status 128 + N, and the resume works."""
    over = {**SMOKE, "steps": 60, "checkpoint_every": 50, "out_dir": str(tmp_path / "run")}
    args = [sys.executable, "-m", "scalebio_core", "train", "--no-progress"]
    args += [f"{k}={json.dumps(v)}" for k, v in over.items()]
    proc = subprocess.Popen(
        args, cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    traj = tmp_path / "run" / "trajectory.jsonl"
    try:
        wait_for_rows(proc, traj, 3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:  # on every path: nothing it started outlives the test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and f"stopped by {signal.Signals(sig).name} after step" in err
    command = err.split("Resume with: ")[1].split()
    done = len(read_jsonl(traj))
    assert (
        torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["step"] == done
    )
    assert command[:4] == ["python", "-m", "scalebio_core", "train"]
    out = subprocess.run(  # as printed, from another folder
        [sys.executable, *command[1:], "--no-progress"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["step"] for r in read_jsonl(traj)] == list(range(60))


# ------------------------------------------------------------------ 7: a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 14 MB tmpfs (two 6 MB checkpoints of the smoke run fit, three do not); skipped where
    this user cannot mount one."""
    where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(folder: Path, leave_mb: float) -> Path:
    """A file that leaves `leave_mb` MB free on the disk of `folder`."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, int(free - leave_mb * 1e6)))
    return filler


def test_a_disk_filled_mid_run_stops_keeping_the_last_checkpoint_and_resumes(tmp_path, small_disk):
    full = tmp_path / "full"
    train(smoke(tmp_path, out_dir=str(full)), progress=False)
    cfg = smoke(tmp_path, out_dir=str(small_disk / "run"))
    filled = []

    def fill_at_3(row, s):
        if row["step"] == 2:
            filled.append(_fill(small_disk, leave_mb=1.0))  # 1 MB left before step 4's save

    with pytest.raises(TrainingStopped) as stopped:
        train(cfg, progress=False, callback=fill_at_3)
    text = str(stopped.value)
    assert text.startswith("no space left on tmpfs (mounted at ")
    assert re.search(r"\d\.\d MB free, the checkpoint needs ~[67]\.\d MB\)", text), text
    assert "The last good checkpoint, step 2, is kept" in text and "--resume" in text
    run = Path(cfg.out_dir)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
    assert not list(run.rglob(".tmp-*"))  # the torn temporary file is gone
    filled[0].unlink()
    train(cfg, resume=True, progress=False)
    assert (run / "trajectory.jsonl").read_text() == (full / "trajectory.jsonl").read_text()


def test_a_disk_too_small_for_the_first_checkpoint_is_said_by_the_command_line(small_disk):
    _fill(small_disk, leave_mb=3.0)
    over = {**SMOKE, "out_dir": str(small_disk / "run")}
    out = subprocess.run(
        [sys.executable, "-m", "scalebio_core", "train", "--no-progress"]
        + [f"{k}={json.dumps(v)}" for k, v in over.items()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: no space left on tmpfs" in out.stderr and "Traceback" not in out.stderr
    assert re.search(r"\d\.\d MB free, the checkpoint needs ~[67]\.\d MB", out.stderr)


def test_a_full_disk_under_any_write_names_the_device_and_keeps_the_old_file(tmp_path, monkeypatch):
    from scalebio_core import files

    target = tmp_path / "kept.json"
    files.write_json(target, {"old": 1})

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFullError, match=r"no space left on .* \(mounted at /.*kept.json"):
        files.write_json(target, {"new": 2})
    assert json.loads(target.read_text()) == {"old": 1}
    assert not list(tmp_path.glob(".tmp-*"))
