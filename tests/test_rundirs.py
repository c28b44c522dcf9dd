"""Run folders and inputs that cannot betray the user (issue 14): every case was first seen as a
silent loss, a raw traceback or a dead end, and is reproduced here. And a folder of the user's
own data (issue 15): records without response tokens dropped and counted, held-out files never
trained on, leaks between training and held-out sets counted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import SMOKE, nan_at_fourth_validation_loss, smoke

from scalebio_core.errors import ConfigError, DataError, TrainingStopped
from scalebio_core.files import load_yaml
from scalebio_core.train.config import TrainConfig
from scalebio_core.train.losses import LMFns
from scalebio_core.train.runs import RunLock, load_trajectory, read_jsonl
from scalebio_core.train.trainer import train

ROOT = Path(__file__).resolve().parent.parent


class Crash(Exception):
    pass


def _crash_at(step: int):
    def callback(row, s):
        if row["step"] == step:
            raise Crash

    return callback


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scalebio_core", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def _main(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr)."""
    from scalebio_core.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse refuses an argument
        code = e.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ silent loss or corruption


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_dead_holders_lock_is_taken(
    tmp_path, capsys
):
    cfg = smoke(tmp_path, steps=2)
    run = Path(cfg.out_dir)
    code = f"from pathlib import Path; import time; from scalebio_core.train.runs import RunLock; RunLock(Path({str(run)!r})).acquire(); print('locked', flush=True); time.sleep(120)"  # noqa: E501
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} "):
            train(cfg, progress=False)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    capsys.readouterr()
    train(cfg, progress=False)  # the dead holder's lock is taken over, and said so
    assert (
        f"taking over the lock of a run that is gone (pid {holder.pid} " in capsys.readouterr().err
    )
    assert [r["step"] for r in read_jsonl(run / "trajectory.jsonl")] == [0, 1]
    lock = RunLock(run).acquire()  # released at the end of the run
    lock.release()


def test_two_runs_started_together_on_one_folder_write_it_once(tmp_path):
    over = {**SMOKE, "steps": 4, "out_dir": str(tmp_path / "run")}
    args = [sys.executable, "-m", "scalebio_core", "train", "--no-progress"]
    args += [f"{k}={json.dumps(v)}" for k, v in over.items()]
    first = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    second = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    outs = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    assert sorted(code for code, _ in outs) == [0, 2], outs
    refused = next(err for code, err in outs if code == 2)
    assert "in use by another run (pid" in refused or "already holds a run" in refused
    run = tmp_path / "run"
    for log in ("trajectory.jsonl", "timing.jsonl"):  # every step once
        assert [r["step"] for r in read_jsonl(run / log)] == [0, 1, 2, 3], log


def test_a_folder_of_the_users_own_files_is_refused_and_left_untouched(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    files = {"config.yaml": "my: own notes\n", "weights.json": "[1]\n", "notes.txt": "keep\n"}
    for name, text in files.items():
        (mine / name).write_text(text)
    with pytest.raises(ConfigError, match=r"not a run of this package: it holds config.yaml, "):
        train(smoke(tmp_path, out_dir=str(mine)), progress=False)
    assert {p.name: p.read_text() for p in mine.iterdir()} == files
    (tmp_path / "empty").mkdir()  # an empty folder is a fine out_dir
    train(smoke(tmp_path, out_dir=str(tmp_path / "empty"), steps=1), progress=False)


def test_resuming_a_copied_run_folder_resumes_the_copy(tmp_path):
    original = tmp_path / "run"
    with pytest.raises(Crash):
        train(smoke(tmp_path), progress=False, callback=_crash_at(2))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    before = (original / "trajectory.jsonl").read_text()
    out = _cli("train", "--config", str(copy / "config.yaml"), "--resume", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert f"resuming {copy} at step 2" in out.stderr
    assert [r["step"] for r in read_jsonl(copy / "trajectory.jsonl")] == list(range(6))
    assert (original / "trajectory.jsonl").read_text() == before  # never touched


def test_every_numeric_argument_of_every_subcommand_is_checked(capsys, tmp_path):
    for args, message in (
        (["resample", "--run", str(tmp_path), "--n", "0"], "--n: must be > 0"),
        (["resample", "--run", str(tmp_path), "--n", "many"], "'many' is not a number"),
        (["sft", "--data", "x.jsonl", "--out", "o", "--token-budget", "-5"], "must be > 0"),
        (["memory", "--model", "gpt2", "--gpus", "0"], "--gpus must be >= 1"),
        (["memory", "--model", "gpt2", "--gpu-mem", "-1"], "--gpu-mem > 0"),
        (["memory", "--model", "gpt2", "--batch-size", "0"], "batch_size"),
        (["train", "steps=0", f"out_dir={tmp_path / 'r'}"], "steps, batch_size"),
    ):
        code, err = _main(capsys, *args)
        assert code == 2 and message in err, (args, err)
        assert "Traceback" not in err


# ------------------------------------------------------------------ dead ends


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_a_message(tmp_path, capsys):
    cfg = smoke(tmp_path, steps=2)
    run = Path(cfg.out_dir)
    run.mkdir()
    (run / ".lock").write_text("pid 1 on elsewhere")  # what a kill leaves: a lock, the config,
    (run / "config.yaml").write_text(json.dumps(cfg.to_dict()))  # an empty trajectory
    (run / "trajectory.jsonl").write_text("")
    (run / ".tmp-last.pt.abc").write_text("torn")  # and a temporary file of an atomic write
    for resume in (True, False):
        train(cfg, resume=resume, progress=False)
        err = capsys.readouterr().err
        if resume:  # it had no checkpoint: it starts again
            assert "stopped before its first checkpoint: starting it again at step 0" in err
        assert [r["step"] for r in read_jsonl(run / "trajectory.jsonl")] == [0, 1]
        assert not list(run.rglob(".tmp-*"))
        if resume:
            shutil.rmtree(run / "checkpoints")  # again without a checkpoint, then a fresh start
            (run / "trajectory.jsonl").write_text("")


@pytest.mark.slow
def test_sigkill_at_ten_moments_then_resume_gives_the_uninterrupted_trajectory(tmp_path):
    """Killed (SIGKILL) right after the lock is taken, after config.yaml, during and after the
    first checkpoint, and after 1 … 6 steps; each resumed (`resume=True`, in this process)."""
    over = {**SMOKE, "steps": 7, "checkpoint_every": 3}
    args = ["train", "--no-progress", *(f"{k}={json.dumps(v)}" for k, v in over.items())]
    full = _cli(*args, f"out_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr
    expected = (tmp_path / "full" / "trajectory.jsonl").read_text()

    def rows(run: Path) -> int:
        traj = run / "trajectory.jsonl"
        return len(traj.read_text().splitlines()) if traj.exists() else -1

    moments = [
        ("lock", lambda r: (r / ".lock").exists()),
        ("config", lambda r: (r / "config.yaml").exists()),
        ("first checkpoint written", lambda r: any((r / "checkpoints").glob(".tmp-*"))),
        ("first checkpoint", lambda r: (r / "checkpoints" / "last.pt").exists()),
        *((f"{k} steps", lambda r, k=k: rows(r) >= k) for k in range(1, 7)),
    ]
    hit = []
    for i, (name, ready) in enumerate(moments):
        run = tmp_path / f"killed{i}"
        victim = subprocess.Popen(
            [sys.executable, "-m", "scalebio_core", *args, f"out_dir={run}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while time.time() < deadline and victim.poll() is None and not ready(run):
            time.sleep(0.002)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        hit.append((name, rows(run)))
        train(TrainConfig(**{**over, "out_dir": str(run)}), resume=True, progress=False)
        assert (run / "trajectory.jsonl").read_text() == expected, name
    assert sum(n < 7 for _, n in hit) >= 8, hit  # the kills fell inside the run


def test_resume_after_a_nan_stop_with_lowered_learning_rates_is_recorded(tmp_path, monkeypatch):
    real = LMFns.val_loss
    nan_at_fourth_validation_loss(monkeypatch)
    cfg = smoke(tmp_path)
    with pytest.raises(TrainingStopped, match=r"--resume lr_w=…") as stop:
        train(cfg, progress=False)
    assert str(Path(cfg.out_dir) / "config.yaml") in str(stop.value)
    monkeypatch.setattr(LMFns, "val_loss", real)
    train(cfg.replace(lr_w=5e-4, alpha=5.0), resume=True, progress=False)
    run = Path(cfg.out_dir)
    assert read_jsonl(run / "changes.jsonl") == [
        {"step": 3, "lr_w": [1e-3, 5e-4], "alpha": [10.0, 5.0]}
    ]
    rows = read_jsonl(run / "trajectory.jsonl")
    assert [r["step"] for r in rows] == list(range(6))
    assert [r["alpha"] for r in rows[2:4]] == [10.0, 5.0]
    with pytest.raises(ConfigError, match="seed: 0 -> 1"):  # other keys are still refused
        train(cfg.replace(lr_w=5e-4, alpha=5.0, seed=1), resume=True, progress=False)


def test_a_corrupted_checkpoint_is_named_and_the_trajectory_kept(tmp_path):
    with pytest.raises(Crash):
        train(smoke(tmp_path), progress=False, callback=_crash_at(2))
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = (run / "trajectory.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"last.pt is unreadable[\s\S]*out_dir=NEW_FOLDER"):
        train(smoke(tmp_path), resume=True, progress=False)
    assert (run / "trajectory.jsonl").read_text() == before


def test_an_unwritable_run_folder_is_named_before_anything_is_built(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot write the run folder .*file/run"):
        train(smoke(tmp_path, out_dir=str(tmp_path / "file" / "run")), progress=False)

    import scalebio_core.files as files
    import scalebio_core.train.runs as runs

    real_open = os.open

    def denied(path, *a, **k):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(runs.os, "open", denied)
    with pytest.raises(ConfigError, match=r"cannot write the run folder .*: Permission denied"):
        train(smoke(tmp_path, out_dir=str(tmp_path / "ro")), progress=False)
    monkeypatch.setattr(runs.os, "open", real_open)

    def fails(src, dst):  # the folder vanishes under an atomic write: the real error stays
        raise FileNotFoundError(2, "No such file or directory", str(dst))

    monkeypatch.setattr(runs.os, "replace", fails)
    with pytest.raises(FileNotFoundError, match="No such file"):
        files.write_text(tmp_path / "x.txt", "hello")
    assert not list(tmp_path.glob(".tmp-*"))  # and its temporary file is gone


def test_bad_files_name_the_file_and_the_place(tmp_path, capsys):
    from scalebio_core.sources.data import SourceSpec, load_records

    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl: line 2: not UTF-8 text .*iconv"):
        load_records(SourceSpec(name="latin", path=str(bad)))

    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: 3\nlr_w: [1e-3\n")
    code, err = _main(capsys, "train", "--config", str(broken))
    assert code == 2 and f"{broken}, line 3, column 1: not valid YAML" in err, err

    truncated = tmp_path / "weights.json"
    truncated.write_text('{"a": 0.5, "b"')
    code, err = _main(capsys, "resample", "--run", str(tmp_path), "--n", "3", "--weights",
                      str(truncated))  # fmt: skip
    assert code == 2 and f"{truncated}: not valid JSON (line 1" in err, err


def test_a_torn_weights_json_of_a_run_is_named_with_the_fix(tmp_path, capsys):
    """Issue 27, item 10: a torn weights.json of the run given to `resample --run` was an
    error without the file's name."""
    from scalebio_core.files import write_yaml

    run = tmp_path / "run"
    write_yaml(run / "config.yaml", TrainConfig(**SMOKE, out_dir=str(run)).to_dict())
    for text, says in (
        ('{"a": 0.5, "b"', "not valid JSON (line 1, column 15"),
        ("\xff\xfe", "not valid JSON"),
        ('["a", "b"]', "a weights.json maps each source name to its weight"),
    ):
        (run / "weights.json").write_bytes(text.encode("latin-1"))
        code, err = _main(capsys, "resample", "--run", str(run), "--n", "3")
        assert code == 2 and f"{run / 'weights.json'}: {says}" in err, err
        assert "--resume" in err and "--weights FILE" in err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "weights.json"]


def test_skipped_files_and_a_single_source_are_said(tmp_path):
    from scalebio_core.sources.data import specs_from_dir

    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    for name in ("a.jsonl", "b.jsonl", "test.jsonl", "validation.jsonl"):
        (data / name).write_text('{"text": "x"}\n')
    (data / "c.csv").write_text("text\nx\n")
    with pytest.warns(UserWarning) as seen:
        specs = specs_from_dir(data)
    said = " ".join(str(w.message) for w in seen)
    assert [s.name for s in specs] == ["a", "b"]  # test.jsonl is held out, never trained on
    assert "test.jsonl, validation.jsonl held out" in said
    assert "skipped c.csv, more/" in said
    for name in ("b.jsonl", "test.jsonl", "validation.jsonl", "c.csv"):
        (data / name).unlink()
    with pytest.warns(UserWarning, match=r"one source \(a.jsonl\): its weight is 1"):
        specs_from_dir(data)


def test_max_length_beyond_the_models_positions_is_refused_before_setup(tmp_path):
    with pytest.raises(ConfigError, match=r"max_length = 512 but embedded:nano embeds at most 256"):
        train(smoke(tmp_path, max_length=512), progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_progress_without_a_terminal_is_a_few_plain_lines(tmp_path):
    over = {**SMOKE, "steps": 40, "checkpoint_every": 40, "out_dir": str(tmp_path / "run")}
    out = _cli("train", *(f"{k}={json.dumps(v)}" for k, v in over.items()))
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stderr.splitlines() if "step " in x and "/40" in x]
    assert "\r" not in out.stderr and 20 <= len(lines) <= 21, out.stderr
    assert "step 40/40" in lines[-1] and "s to go" in lines[-1]


def test_run_files_are_readable_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        train(smoke(tmp_path, steps=1), progress=False)
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for name in ("config.yaml", "weights.json", "checkpoints/last.pt", "trajectory.jsonl"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"] == 1


def _alpaca_folder(folder: Path, n: int = 40) -> Path:
    """Two Alpaca-format sources and a validation set, with the warts of real data: an empty
    output in each of a and the validation set, a very long prompt in b."""
    folder.mkdir(parents=True)
    words = "river stone light paper garden window music number winter market".split()

    def rec(verb: str, i: int, output: str | None = None, long: bool = False) -> dict:
        ask = " ".join(words[(i + k) % len(words)] for k in range(200 if long else 4))
        out = words[i % 10] if output is None else output
        return {"instruction": f"{verb} {i}: {ask}", "input": "", "output": out}

    sets = {
        "a": [rec("Repeat", i, output=" " if i == 3 else None) for i in range(n)],
        "b": [rec("Spell", i, long=i == 5) for i in range(n)],
        "validation": [rec("Say", i, output="" if i == 0 else None) for i in range(n // 2)],
    }
    for name, rows in sets.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_records_without_response_tokens_are_dropped_and_counted(tmp_path):
    data = _alpaca_folder(tmp_path / "data")
    cfg = smoke(tmp_path, data_dir=str(data), steps=2)
    with pytest.warns(UserWarning) as seen:
        train(cfg, progress=False)
    said = [str(w.message) for w in seen]
    assert "source 'a': dropped 1 of 40 records (1 with an empty response; max_length = 80)" in said
    assert (
        "source 'b': dropped 1 of 40 records (1 with a prompt that fills max_length; "
        "max_length = 80)" in said
    )
    assert any("source 'validation': dropped 1 of 20" in x for x in said)

    def run(**kw):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        return train(smoke(tmp_path, data_dir=str(data), steps=1, out_dir=str(out), **kw))

    with pytest.raises(DataError, match=r"source 'a': 1 of 40 .* strict_data is on"):
        run(strict_data=True)
    with pytest.raises(DataError, match=r"more than max_drop_share = 2% of the source"):
        run(max_drop_share=0.02)
    with pytest.warns(UserWarning, match=r"source 'b': 1 of 40 prompts cut from the left"):
        run(truncate_prompts=True)


def test_held_out_files_take_their_roles_and_leaks_are_counted(tmp_path, capsys):
    data = _alpaca_folder(tmp_path / "data")
    (data / "validation.jsonl").rename(data / "val.jsonl")
    a = (data / "a.jsonl").read_text().splitlines()
    (data / "test.jsonl").write_text("\n".join(a[:2]) + "\n")  # two training records leak
    cfg = smoke(tmp_path, data_dir=str(data), steps=1)
    with pytest.warns(UserWarning) as seen:
        train(cfg, progress=True)
    table = capsys.readouterr().err.splitlines()  # the start table, then the progress
    head = next(i for i, x in enumerate(table) if x.startswith("source "))
    assert table[head].split() == "source from records dropped samples tokens at max_length".split()
    rows = [x.split() for x in table[head + 1 : head + 4]]
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        ("a", str(data / "a.jsonl"), "40", "1", "39"),
        ("b", str(data / "b.jsonl"), "40", "1", "39"),
        ("validation", str(data / "val.jsonl"), "20", "1", "19"),
    ]
    said = " ".join(str(w.message) for w in seen)
    assert load_trajectory(tmp_path / "run")["names"] == ["a", "b"]  # test.jsonl is not trained on
    assert "2 of 2 test records are in the training data too (a.jsonl: 2)" in said
    assert load_yaml((tmp_path / "run" / "config.yaml").read_text())["corpus"] is None
    (data / "dev.jsonl").write_text((data / "val.jsonl").read_text())
    with pytest.raises(DataError, match=r"several validation sets \(dev.jsonl, val.jsonl\)"):
        train(smoke(tmp_path, data_dir=str(data), steps=1, out_dir=str(tmp_path / "r2")))


def test_a_data_dir_run_recorded_with_the_default_corpus_still_resumes(tmp_path):
    """Issue 30, item 5: a data_dir run's config.yaml claimed `corpus: noisy`; it now records
    null. A run folder written before (config.yaml and checkpoint identity say noisy) resumes."""
    data = _alpaca_folder(tmp_path / "data")
    cfg = smoke(tmp_path, data_dir=str(data), steps=2, checkpoint_every=1)
    assert cfg.corpus is None and TrainConfig(**{**cfg.to_dict(), "corpus": "noisy"}) == cfg
    with pytest.warns(UserWarning):
        first = train(cfg, progress=False)
    run = tmp_path / "run"
    saved = load_yaml((run / "config.yaml").read_text())
    assert saved["corpus"] is None
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "corpus": "noisy"}))  # as before
    ckpt = run / "checkpoints" / "last.pt"
    sd = torch.load(ckpt, weights_only=False)
    sd["identity"]["config"]["corpus"] = "noisy"
    torch.save(sd, ckpt)
    with pytest.warns(UserWarning):
        assert train(cfg, resume=True, progress=False) == pytest.approx(first)
    sd["identity"]["config"]["seed"] = 5  # the identity is compared: another run is refused
    torch.save(sd, ckpt)
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="seed"):
        train(cfg, resume=True, progress=False)


def test_the_convergence_verdict_reads_the_trajectory(tmp_path, capsys):
    from scalebio_core.train.convergence import convergence

    def rows(ps):
        return [{"step": i, "p": {"a": q, "b": 1 - q}} for i, q in enumerate(ps)]

    n = 200
    assert convergence(rows([0.5 + 1e-4 * i / n for i in range(n)]))["verdict"] == "not moved"
    moving = convergence(rows([0.5 + 0.3 * i / n for i in range(n)]))
    assert moving["verdict"] == "moving"
    assert moving["text"].startswith("moving (not converged): p moves 0.15 per 100 steps")
    assert convergence(rows([0.5]))["verdict"] == "too short"  # one step
    settled = convergence(rows([0.8 - 0.3 * 0.9**i for i in range(n)]))
    assert settled["verdict"] == "settled" and settled["text"].startswith("settled (converged)")

    train(smoke(tmp_path, steps=8), progress=False)  # a real run ends with its verdict
    verdict = json.loads((tmp_path / "run" / "verdict.json").read_text())
    assert verdict["steps"] == 8 and verdict["verdict"] == "too short"
    assert verdict["lam_grad_norm"] > 0
    assert verdict["text"] in capsys.readouterr().err
