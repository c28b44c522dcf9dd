"""Two processes over gloo (accelerate launch) follow the one-process trajectory."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from scalebio_core.core.distributed import free_port, run_launch
from scalebio_core.plan.scaleout import accelerate_config
from scalebio_core.train.runs import load_trajectory, read_jsonl

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


def _cmd(
    out_dir: Path,
    processes: int,
    resume: bool = False,
    config_file: Path | None = None,
    port: int = 0,
    **extra,
) -> list[str]:
    overrides = [
        f"{k}={json.dumps(v)}" for k, v in {**BASE, **extra, "out_dir": str(out_dir)}.items()
    ]
    train = ["-m", "scalebio_core", "train", "--no-progress", *overrides]
    if resume:
        train.append("--resume")
    if processes == 1:
        return [sys.executable, *train]
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:  # an accelerate config file (FSDP) with 2 processes
        return [
            *launch,
            "--config_file",
            str(config_file),
            "--main_process_port",
            str(port or free_port()),
            *train,
        ]
    # --multi_gpu without GPUs runs gloo on the CPU; --cpu would silently run one process
    return [
        *launch,
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
        str(port or free_port()),
        *train,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(
    out_dir: Path, processes: int, resume: bool = False, config_file: Path | None = None, **extra
) -> None:
    def cmd(port: int) -> list[str]:
        return _cmd(out_dir, processes, resume, config_file, port, **extra)

    out = run_launch(cmd, cwd=ROOT, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _fails(out_dir: Path, processes: int, **extra) -> str:
    """Run the trainer as `_run` does, expecting it to fail; its stderr."""
    out = run_launch(
        lambda port: _cmd(out_dir, processes, port=port, **extra), cwd=ROOT, env=ENV, timeout=300
    )
    assert out.returncode != 0
    return out.stderr


def _same_trajectory(one: Path, two: Path, p_rtol: float = 1e-5) -> None:
    """`two` (2 processes) follows `one` (1 process) to float tolerance, and really ran 2."""
    timing = read_jsonl(two / "timing.jsonl")
    assert {r["world_size"] for r in timing} == {2}, "accelerate did not start two processes"
    assert {r["world_size"] for r in read_jsonl(one / "timing.jsonl")} == {1}
    a, b = load_trajectory(one), load_trajectory(two)
    assert len(a["step"]) == len(b["step"]) == BASE["steps"]
    np.testing.assert_allclose(b["p"], a["p"], rtol=p_rtol, atol=1e-7)
    for key in ("L1", "L2_w", "L2_u"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5)
    assert not np.allclose(a["p"][-1], a["p"][0])  # the weights moved: a real comparison
    rows_one, rows_two = (read_jsonl(d / "trajectory.jsonl") for d in (one, two))
    assert [r["lisa_w"] for r in rows_one] == [r["lisa_w"] for r in rows_two]
    assert [r["tokens"] for r in rows_one] == [r["tokens"] for r in rows_two]


@pytest.mark.slow
@pytest.mark.parametrize("lisa_active", [0, 1])
def test_two_processes_follow_the_one_process_trajectory(tmp_path, lisa_active):
    extra = {"lisa_active": lisa_active, "lisa_interval": 2} if lisa_active else {}
    _run(tmp_path / "one", 1, **extra)
    _run(tmp_path / "two", 2, **extra)
    _same_trajectory(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
@pytest.mark.parametrize("lisa_active", [0, 1])
def test_fsdp_two_processes_follow_the_one_process_trajectory(tmp_path, lisa_active):
    """u and w sharded with FSDP2 over 2 gloo processes (LISA: frozen and trainable parameters
    in one FSDP unit, changing every 2 steps) against the unsharded single process. Without
    LISA through `fsdp=true`; with LISA through the shipped FSDP launch config (made for 2 CPU
    processes: no offload, fp32, GPT-2's block class)."""
    extra = {"lisa_active": lisa_active, "lisa_interval": 2} if lisa_active else {}
    _run(tmp_path / "one", 1, **extra)
    if lisa_active:
        cfg = accelerate_config("fsdp", None, gpus=2, offload=False)
        cfg["mixed_precision"] = "no"
        cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = "GPT2Block"
        (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(cfg))
        _run(tmp_path / "fsdp", 2, config_file=tmp_path / "fsdp.yaml", **extra)
    else:  # offload is ignored on CPUs (nothing to offload to), with a warning
        _run(tmp_path / "fsdp", 2, fsdp=True, fsdp_offload=True, **extra)
    _same_trajectory(tmp_path / "one", tmp_path / "fsdp")
    shards = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "shards").iterdir())
    assert shards == [f"step{BASE['steps']:07d}-rank{r}.pt" for r in (0, 1)]  # old ones dropped


@pytest.mark.slow
def test_fsdp_with_lora_on_one_shared_base_follows_the_two_copy_run(tmp_path):
    """LoRA adapters of u and w on one sharded base (lora_base: shared, the default; only the
    adapters train) against one process with two whole copies (lora_base: copies).

    The losses agree to float rounding (rtol 1e-5) as above; p to rtol 1e-4: with LoRA the gap
    l̄(w) − l̄(u) that drives λ stays 1e-4 to 3e-3 of losses near 7.6, so the losses' last-bit
    differences (summation order over ranks) are a 1e-5 part of λ's gradient (measured 1.2e-5).
    The sharded run recomputes its blocks in backward (gradient checkpointing), the one-process
    run does not: the same trajectory.
    """
    _run(tmp_path / "one", 1, lora_rank=4, lora_base="copies")
    _run(tmp_path / "fsdp", 2, fsdp=True, lora_rank=4, gradient_checkpointing=True)
    _same_trajectory(tmp_path / "one", tmp_path / "fsdp", p_rtol=1e-4)


@pytest.mark.slow
def test_fsdp_with_gradient_checkpointing_and_lisa_follows_the_one_process_trajectory(tmp_path):
    """FSDP2 gathers each recomputing block's shards again for its replay in backward; under
    LISA a frozen block above the trainable ones still passes their gradient."""
    extra = {"lisa_active": 1, "lisa_interval": 2, "lisa_train_embeddings": False}
    _run(tmp_path / "one", 1, **extra)
    _run(tmp_path / "fsdp", 2, fsdp=True, gradient_checkpointing=True, **extra)
    _same_trajectory(tmp_path / "one", tmp_path / "fsdp")


@pytest.mark.slow
def test_doremi_with_fsdp_follows_the_one_process_trajectory(tmp_path):
    """DoReMi's reference (u) and proxy (w) sharded over 2 processes against one process."""
    extra = {"method": "doremi", "doremi_ref_steps": 3, "steps": 4}
    _run(tmp_path / "one", 1, **extra)
    _run(tmp_path / "fsdp", 2, fsdp=True, **extra)
    a, b = (read_jsonl(tmp_path / d / "trajectory.jsonl") for d in ("one", "fsdp"))
    assert [r["phase"] for r in a] == [r["phase"] for r in b] == ["reference"] * 3 + ["proxy"] * 4
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    pa, pb = ([list(r["p"].values()) for r in rows] for rows in (a, b))
    np.testing.assert_allclose(pb, pa, rtol=1e-5, atol=1e-7)
    assert not np.allclose(pa[-1], pa[0])  # the proxy's weights moved
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    shards = (tmp_path / "fsdp" / "checkpoints" / "shards").iterdir()
    assert sorted(f.name for f in shards) == [f"step{7:07d}-rank{r}.pt" for r in (0, 1)]


def wait_for_rows(proc: subprocess.Popen, traj: Path, rows: int, seconds: float = 300) -> None:
    """Wait until `traj` holds `rows` lines, `proc` has ended, or `seconds` have passed."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if traj.exists() and len(traj.read_text().splitlines()) >= rows:
            return
        time.sleep(0.02)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every process under it, and reap them. torch's launcher starts each
    rank in a session of its own, so killing the launcher's process group would leave the ranks
    running to the end of the run: they are found as its children before it dies."""
    procs = []
    with contextlib.suppress(psutil.NoSuchProcess):
        procs = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    _, alive = psutil.wait_procs(procs, timeout=60)
    assert not alive, f"still running after SIGKILL: {alive}"


def _killed_and_resumed(tmp_path: Path, config_file: Path | None = None, **extra) -> dict:
    """A 2-process run killed (SIGKILL to the launcher and its workers) after 3 logged steps, then
    resumed: its trajectory and weights are byte-identical to the uninterrupted run's. Returns
    the run's config overrides."""
    extra = {"checkpoint_every": 2, "steps": 12, **extra}  # the kill lands mid-run
    _run(tmp_path / "full", 2, config_file=config_file, **extra)
    victim = subprocess.Popen(
        _cmd(tmp_path / "killed", 2, config_file=config_file, **extra),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the launcher and its two workers: one process group
    )
    traj = tmp_path / "killed" / "trajectory.jsonl"
    try:
        wait_for_rows(victim, traj, 3)
    finally:  # on every path: the launcher and its workers
        kill_tree(victim)
    assert len(traj.read_text().splitlines()) < extra["steps"], "finished before it was killed"
    _run(tmp_path / "killed", 2, resume=True, config_file=config_file, **extra)
    for name in ("trajectory.jsonl", "weights.json"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "full" / name).read_text()
    return extra


@pytest.mark.slow
def test_fsdp_killed_run_resumes_from_its_shards_on_the_same_trajectory(tmp_path):
    extra = _killed_and_resumed(tmp_path, fsdp=True, lisa_active=1, lisa_interval=2)
    with pytest.raises(AssertionError, match="fsdp: true needs several processes"):
        _run(tmp_path / "killed", 1, resume=True, **extra)


def test_sharded_checkpoint_with_a_missing_shard_is_refused_by_name(tmp_path):
    """Any process count reads the shards of every rank that wrote them (test_reshard.py): a
    missing one is named."""
    from scalebio_core.errors import ConfigError
    from scalebio_core.parallel.sharding import saved_parts

    with pytest.raises(
        ConfigError, match=r"step0000004-rank0.pt is missing: .*written by 2 processes"
    ):
        saved_parts(tmp_path, 4, saved_world=2)


def test_fsdp_in_one_process_is_refused_with_the_launch_to_use(tmp_path):
    stderr = _fails(tmp_path / "one", 1, fsdp=True)
    assert "fsdp: true needs several processes" in stderr
    assert "Traceback" not in stderr


def _zero_config(tmp_path: Path, stage: int) -> Path:
    """The shipped DeepSpeed launch config for 2 CPU processes (no offload, fp32) at `stage`."""
    cfg = accelerate_config("deepspeed_zero3", None, gpus=2, offload=False)
    cfg["mixed_precision"] = "no"
    cfg["deepspeed_config"]["zero_stage"] = stage
    path = tmp_path / f"zero{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, extra", [(1, {}), (2, {}), (3, {"lora_rank": 4, "lora_base": "copies"})]
)
def test_deepspeed_zero_follows_the_one_process_trajectory(tmp_path, stage, extra):
    """u and w as two DeepSpeed engines (ZeRO-1: optimizer states partitioned; -2: gradients too;
    -3: parameters too, here with LoRA on two copies of the base) over 2 gloo processes against
    one process without DeepSpeed. ZeRO-1 through `zero_stage=1` under a plain 2-process launch,
    the others through the shipped DeepSpeed launch config. LoRA: p to rtol 1e-4, as under FSDP.
    ZeRO-2 and -3 recompute their blocks in backward (gradient checkpointing; ZeRO-3 gathers the
    partitioned parameters again for the replay)."""
    _run(tmp_path / "one", 1, **extra)
    if stage == 1:
        _run(tmp_path / "zero", 2, zero_stage=1, **extra)
    else:
        config = _zero_config(tmp_path, stage)
        _run(tmp_path / "zero", 2, config_file=config, gradient_checkpointing=True, **extra)
    _same_trajectory(tmp_path / "one", tmp_path / "zero", p_rtol=1e-4 if extra else 1e-5)
    folders = tmp_path / "zero" / "checkpoints" / "deepspeed"
    for name in ("w", "u"):  # DeepSpeed's checkpoints, the last step's only
        assert sorted(d.name for d in (folders / name).iterdir() if d.is_dir()) == [
            f"step{BASE['steps']:07d}"
        ]


@pytest.mark.slow
def test_deepspeed_zero3_killed_run_resumes_on_the_same_trajectory(tmp_path):
    config = _zero_config(tmp_path, 3)
    extra = _killed_and_resumed(tmp_path, config_file=config)
    with pytest.raises(
        AssertionError, match="written by a deepspeed run and this one is replicated"
    ):
        _run(tmp_path / "killed", 1, resume=True, **extra)  # without the DeepSpeed launch


def test_deepspeed_refuses_what_it_cannot_run_naming_what_can(monkeypatch, tmp_path):
    """LISA, DoReMi, LoRA on a shared base, fsdp together with DeepSpeed, ZeRO stage 0, one
    process, bad config files."""
    from types import SimpleNamespace

    from scalebio_core.errors import ConfigError
    from scalebio_core.parallel import zero
    from scalebio_core.train.config import TrainConfig

    ok = SimpleNamespace(
        fsdp=False, method="scalebio", lisa_active=0, precision="fp32", lora_rank=0
    )
    shared = SimpleNamespace(**{**vars(ok), "lora_rank": 4, "lora_base": "shared"})
    with pytest.raises(ConfigError, match=r"one shared base .* Set lora_base: copies"):
        zero.check_supported(shared, copies=2)
    with pytest.raises(ConfigError, match=r"LISA cannot run under DeepSpeed.*fsdp\.yaml"):
        zero.check_supported(SimpleNamespace(**{**vars(ok), "lisa_active": 2}), copies=2)
    with pytest.raises(ConfigError, match=r"method 'doremi' .*configs/accelerate/fsdp\.yaml"):
        zero.check_supported(SimpleNamespace(**{**vars(ok), "method": "doremi"}), copies=2)
    with pytest.raises(ConfigError, match=r"plain fine-tuning \(sft\) is not run by DeepSpeed"):
        zero.check_supported(ok, copies=1)
    with pytest.raises(ConfigError, match="fsdp and DeepSpeed .* choose one"):
        zero.check_supported(SimpleNamespace(**{**vars(ok), "fsdp": True}), copies=2)
    with pytest.raises(ConfigError, match="zero_stage needs several processes"):
        zero.check_supported(ok, copies=2)  # no process group in this test process

    with pytest.raises(ConfigError, match="zero_stage must be 0 \\(off\\), 1, 2 or 3"):
        TrainConfig(zero_stage=4)
    assert zero.zero_from_launch(0, False) == (0, False)  # no DeepSpeed launch: the config's
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    assert zero.zero_from_launch(0, False) == (3, True)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")
    with pytest.raises(ConfigError, match=r"stage 0 .*configs/accelerate/ddp\.yaml"):
        zero.zero_from_launch(0, False)
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_json))
    assert zero.zero_from_launch(0, False) == (2, False)
    for bad in ("{not json", '{"zero_optimization": {"stage": "auto"}}'):
        ds_json.write_text(bad)
        with pytest.raises(ConfigError, match=f"cannot read the DeepSpeed config {ds_json}"):
            zero.zero_from_launch(0, False)

    saved = {"world": 2, "stage": 3}
    with pytest.raises(
        ConfigError, match="written by 2 processes at ZeRO stage 3, .* 4 at stage 3"
    ):
        zero.load(None, tmp_path, 4, world=4, stage=3, saved=saved)
    with pytest.raises(ConfigError, match=r"deepspeed/w/step0000004 is missing"):
        zero.load(None, tmp_path, 4, world=2, stage=3, saved=saved)


def test_sft_is_not_sharded_by_fsdp():
    from types import SimpleNamespace

    import torch

    from scalebio_core.errors import ConfigError
    from scalebio_core.train.build import setup
    from scalebio_core.train.config import TrainConfig

    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"plain fine-tuning \(sft\) is not sharded"):
        cfg = TrainConfig(model="embedded:nano", fsdp=True)
        multi = SimpleNamespace(distributed_type="MULTI_CPU", device=cpu, num_processes=2)
        setup(cfg, accelerator=multi, copies=1)


def launch_probe(tmp_path: Path, probe: str, cfg: dict) -> dict[int, dict]:
    """Run the script `probe` on 2 gloo processes (its arguments: `cfg` as JSON, and a folder
    where each rank writes its result, rank<r>.json: the ranks' shared stdout could interleave
    two lines); the results by rank (each rank must write one)."""
    script, results = tmp_path / "probe.py", tmp_path / "results"
    script.write_text(probe)
    results.mkdir()

    def cmd(port: int) -> list[str]:
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), str(script), json.dumps(cfg), str(results),
        ]  # fmt: skip

    out = run_launch(cmd, cwd=ROOT, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {int(f.stem[4:]): json.loads(f.read_text()) for f in results.glob("rank*.json")}
    assert set(rows) == {0, 1}, (rows, out.stdout[-2000:])
    return rows


LOAD_PROBE = """
import json, sys
from pathlib import Path

import torch

from scalebio_core.train.build import setup
from scalebio_core.train.config import TrainConfig
from scalebio_core.core.distributed import end_processes


def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # MiB
    raise KeyError(key)


cfg = TrainConfig(**json.loads(sys.argv[1]))
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
try:
    s = setup(cfg)
    peak = status("VmHWM") - before
    local = sum(p.to_local().numel() for p in s.state.w.parameters()) * 4 / 2**20
    row = {"rank": s.dist.rank, "peak_mib": peak, "shard_mib": local}
    (Path(sys.argv[2]) / f"rank{s.dist.rank}.json").write_text(json.dumps(row))
finally:  # the process group ends before the interpreter does, on every path
    end_processes()
"""


@pytest.mark.slow
def test_fsdp_loads_the_model_once_per_node(tmp_path):
    """Under FSDP only rank 0 holds a whole copy in host memory while the copies are built: on
    the other rank the peak host memory of the set-up, beyond the shards it keeps (half of each
    of the two copies), stays below half a model, where building both copies whole on every
    rank (as before) would add two whole models. Measured with 2 gloo processes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import save_model

    from scalebio_core.plan.memory import model_shape

    shape = {"n_layer": 8, "n_embd": 512, "n_head": 8, "vocab_size": 2048}
    save_model(tmp_path / "model", shape, positions=128)
    whole_mib = model_shape(str(tmp_path / "model")).params * 4 / 2**20
    # packing off: its check runs forwards, which gather the sharded blocks as a training step
    # does; this measures building the copies alone
    cfg = {**BASE, "model": str(tmp_path / "model"), "fsdp": True, "out_dir": str(tmp_path / "r")}
    cfg["packing"] = "off"
    rows = launch_probe(tmp_path, LOAD_PROBE, cfg)
    assert rows[1]["shard_mib"] == pytest.approx(whole_mib / 2, rel=0.01)  # half of each tensor
    beyond = {r: rows[r]["peak_mib"] - 2 * rows[r]["shard_mib"] for r in rows}  # u's, w's shards
    assert beyond[0] >= 0.8 * whole_mib, (rows, whole_mib)  # it sees rank 0's whole copy
    assert beyond[1] < 0.5 * whole_mib, (rows, whole_mib)


@pytest.mark.slow
def test_fsdp_rank0_load_failure_stops_every_rank(tmp_path):
    """Rank 0 alone reads the weights: when it cannot (a corrupted weights file), the other rank
    must not wait for a broadcast that never comes; both stop with rank 0's error."""
    from scalebio_core.train.models import save_tiny_model

    path = save_tiny_model("gpt2", tmp_path / "model")
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    stderr = _fails(tmp_path / "run", 2, fsdp=True, model=str(path))
    assert "could not load the model" in stderr, stderr[-2000:]


PACKED = {  # records of 42 to 80 tokens (cut at max_length): several to a packed row
    "corpus": "multilingual",
    "corpus_args": {"n_per_source": 24, "n_val": 16},
}


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_packed_follow_the_padded_one_process_trajectory(tmp_path, fsdp):
    """Each rank packs its share of the batch; under FSDP with micro_tokens=160 the ranks split
    their shares into the same number of micro-batches (sharded forwards are collective), else
    the run would hang. Tolerance as in the LoRA test above: p is driven by a difference of
    nearly equal losses."""
    _run(tmp_path / "one", 1, packing="off", **PACKED)
    extra = {"fsdp": True, "micro_tokens": 160} if fsdp else {}
    _run(tmp_path / "two", 2, packing="on", **PACKED, **extra)
    _same_trajectory(tmp_path / "one", tmp_path / "two", p_rtol=1e-4)
