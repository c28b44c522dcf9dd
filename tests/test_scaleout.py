"""Launch configs parse as accelerate configs; the FSDP wrap class is found generically."""

from __future__ import annotations

import html
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from test_scaleup import _memory

from scalebio_core.errors import ConfigError
from scalebio_core.plan.scaleout import KINDS, accelerate_config, block_class, plan_command
from scalebio_core.train.config import CONFIG_DIR
from scalebio_core.train.runs import read_jsonl


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_configs_parse_with_accelerate(kind):
    cfg = load_config_from_file(str(CONFIG_DIR / "accelerate" / f"{kind}.yaml"))
    assert cfg.num_processes == 8 and cfg.mixed_precision == "bf16"


@pytest.mark.parametrize(
    "arch, cls",
    [("llama", "LlamaDecoderLayer"), ("gpt_neox", "GPTNeoXLayer"), ("gpt2", "GPT2Block")],
)
def test_fsdp_wrap_class_resolved_on_tiny_models(arch, cls, tmp_path):
    from scalebio_core.train.models import save_tiny_model

    path = save_tiny_model(arch, tmp_path / arch)
    assert block_class(str(path)) == cls
    cfg = accelerate_config("fsdp", str(path), gpus=2, offload=True)
    assert cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == cls
    assert cfg["fsdp_config"]["fsdp_version"] == 2  # per-parameter sharding: LISA can freeze
    out = tmp_path / "fsdp.yaml"
    out.write_text(yaml.safe_dump(cfg))
    assert load_config_from_file(str(out)).fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == cls


def test_paper_models_wrap_classes_offline():
    assert block_class("01-ai/Yi-34B") == "LlamaDecoderLayer"
    assert block_class("EleutherAI/gpt-neox-20b") == "GPTNeoXLayer"
    with pytest.raises(ConfigError, match="unknown launch kind"):
        accelerate_config("zero9")


# ------------------------------------------------------------------ issue 27, items 12–15

ROOT = Path(__file__).resolve().parent.parent
YI = ["--model", "01-ai/Yi-34B", "--gpus", "8", "--gpu-mem", "48", "--lisa-active", "2"]
NOISY_PAPER = ["--config", "noisy", "--preset", "paper"]


def _printed(out: str, label: str) -> str:
    """The command printed after `label:` by `memory --emit`."""
    return next(line for line in out.splitlines() if line.strip().startswith(label + ":")).split(
        label + ": ", 1
    )[1]


def _total(text: str) -> float:
    """The first `total … GiB` of a plan's text."""
    return float(re.search(r"total\s+([\d.]+) GiB", text).group(1))


@pytest.mark.slow
def test_emitted_launch_runs_as_printed_from_another_directory_without_a_venv(
    tmp_path, capsys, monkeypatch
):
    """Item 12: launch.sh holds this environment's python and absolute paths (the model folder
    and out_dir given relative to where it was emitted), and runs from another directory with
    no environment on PATH; the printed launch is launch.sh's command."""
    from scalebio_core.train.models import save_tiny_model

    here = tmp_path / "here"
    save_tiny_model("llama", here / "tiny")
    monkeypatch.chdir(here)
    code, out, err = _memory(
        capsys, "--config", "noisy", "--preset", "smoke", "--model", "tiny", "--gpus", "1",
        "--gpu-mem", "1", "--emit", "plan", "steps=2", "out_dir=runs/emitted",
    )  # fmt: skip
    assert code == 0, err
    launch = (here / "plan" / "launch.sh").read_text().splitlines()[-1]
    assert _printed(out, "launch") == launch
    argv = shlex.split(launch)
    assert argv[0] == sys.executable and Path(argv[-1]) == here / "plan" / "config.yaml"
    cfg = yaml.safe_load((here / "plan" / "config.yaml").read_text())
    assert cfg["out_dir"] == str(here / "runs" / "emitted") and cfg["model"] == str(here / "tiny")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PATH")}
    env.update(PATH="/usr/bin:/bin", OMP_NUM_THREADS="1")
    run = subprocess.run(
        ["sh", str(here / "plan" / "launch.sh")],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(read_jsonl(here / "runs" / "emitted" / "trajectory.jsonl")) == 2
    assert not (elsewhere / "runs").exists()


def test_emit_requires_the_data_and_keeps_the_users_files(tmp_path, capsys, monkeypatch):
    """Item 12: no data (no --config, data_dir or sources) is refused naming the fix, unless
    --demo-data, which says loudly what it trains on; files of the user in the folder stay."""
    monkeypatch.chdir(tmp_path)
    gpt2 = ["--model", "gpt2", "--gpus", "1", "--emit", "plan"]
    code, out, err = _memory(capsys, *gpt2)
    assert code == 2 and "no data given" in err and "--config noisy --preset paper" in err
    assert "--demo-data" in err and not (tmp_path / "plan").exists()
    code, out, err = _memory(capsys, *gpt2, "--demo-data")
    assert code == 0 and "EMBEDDED DEMO CORPUS 'noisy'" in _printed(out, "data"), err
    assert "EMBEDDED DEMO CORPUS" in (tmp_path / "plan" / "launch.sh").read_text()
    code, out, err = _memory(capsys, *NOISY_PAPER, *gpt2[:-1], "alpaca")
    assert code == 0 and _printed(out, "data") == "trains on 6 sources from tatsu-lab/alpaca"

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own config\n")
    emit = [*NOISY_PAPER, "--model", "gpt2", "--gpus", "1", "--emit", str(mine)]
    code, out, err = _memory(capsys, *emit)
    assert code == 2 and "already holds config.yaml" in err and "--overwrite" in err
    assert (mine / "config.yaml").read_text() == "my: own config\n"
    assert not (mine / "launch.sh").exists()  # nothing was written
    code, out, err = _memory(capsys, *emit, "--overwrite")
    assert code == 0, err
    code, out, err = _memory(capsys, *emit)  # the same plan again: the same files
    assert code == 0, err
    code, out, err = _memory(capsys, *emit[:-4], "--gpus", "2", "--emit", str(tmp_path / "two"))
    assert code == 0 and (tmp_path / "two" / "accelerate.yaml").exists(), err
    one = [*emit[:-1], str(tmp_path / "two")]  # one GPU: the accelerate config is not its own
    code, out, err = _memory(capsys, *one)
    assert code == 2 and "accelerate.yaml" in err
    code, out, err = _memory(capsys, *one, "--overwrite")
    assert code == 0 and not (tmp_path / "two" / "accelerate.yaml").exists(), err


def test_memory_predicts_the_embedded_models_of_the_smoke_presets(capsys):
    """Item 13: `memory --config noisy --preset smoke` predicts its embedded model."""
    code, out, err = _memory(capsys, "--config", "noisy", "--preset", "smoke")
    assert code == 0, err
    assert out.startswith("embedded:nano: 8 GPU(s) × 48 GiB") and "verdict: fits" in out


@pytest.mark.slow
def test_the_emitted_yi34b_plan_rehearses_on_two_gloo_processes_from_another_directory(
    tmp_path,
):
    """Item 13 and the acceptance: the plan for Yi-34B on 8 × 48 GiB (its data the noisy
    paper preset's Alpaca), emitted and rehearsed with the printed commands from a directory
    that is not the repository's: FSDP over 2 gloo processes on a tiny Llama, LISA, 4 steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    emit = subprocess.run(
        [sys.executable, "-m", "scalebio_core", "memory", *NOISY_PAPER, *YI, "--search",
         "--emit", "yi34b"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert emit.returncode == 0, emit.stderr[-3000:]
    rehearse = shlex.split(_printed(emit.stdout, "rehearse on this CPU first"))
    assert rehearse[0] == sys.executable and rehearse[-1] == str(tmp_path / "yi34b")
    run = subprocess.run(
        rehearse, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    assert "01-ai/Yi-34B -> a tiny random llama" in run.stdout
    assert "processes: 8 -> 2 (gloo on the CPU)" in run.stdout
    out = Path(re.search(r"run folder (\S+)", run.stdout).group(1))
    assert {r["world_size"] for r in read_jsonl(out / "timing.jsonl")} == {2}
    rows = read_jsonl(out / "trajectory.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # 4 steps
    assert all(len(r["lisa_w"]) == 2 for r in rows)  # LISA, 2 of the 4 blocks
    shards = sorted(p.name for p in (out / "checkpoints" / "shards").iterdir())
    assert shards == [f"step{4:07d}-rank{r}.pt" for r in (0, 1)]  # FSDP: one shard per rank


def test_the_search_keeps_host_memory_and_headroom(capsys):
    """Item 14: Llama-3-8B with LISA on 8 × 80 GiB. Without a host limit and headroom the
    search picks DDP (92% of the GPU, 239 GiB of host memory while every rank builds its
    copies); with 200 GiB of host memory per node the host limit alone rules DDP out (FSDP
    builds one copy per node: 15 GiB); with the default headroom both limits keep 10% free,
    and the result prints both limits and the host peak."""
    llama = ["--model", "meta-llama/Meta-Llama-3-8B", "--gpus", "8", "--gpu-mem", "80"]
    search = [*llama, "--lisa-active", "2", "--search"]
    code, out, err = _memory(capsys, *search, "--headroom", "0")
    assert code == 0, err
    assert ", ddp, " in out.splitlines()[1] and "239.3 GiB while the copies" in out
    code, out, err = _memory(capsys, *search, "--headroom", "0", "--host-mem", "200")
    assert code == 0, err
    assert ", fsdp, " in out.splitlines()[1], out
    assert "host 200.0 GiB per node (200 GiB less 0% headroom)" in out
    assert "host peak 15.0 GiB per node" in out
    code, out, err = _memory(capsys, *search, "--host-mem", "200")
    assert code == 0, err
    assert ", fsdp, " in out.splitlines()[1], out
    assert "and 200 GiB of host memory per node, keeping 10% free" in out
    assert "limits: GPU 72.0 GiB (80 GiB less 10% headroom); host 180.0 GiB per node" in out
    from scalebio_core.plan.memory import GIB
    from scalebio_core.plan.scaleout import plan_run

    found = plan_run(
        "meta-llama/Meta-Llama-3-8B", 8, 80, fields={"lisa_active": 2}, search=True, host_gib=200
    ).plan
    assert found.host_peak <= 0.9 * 200 * GIB and found.peak <= 0.9 * 80 * GIB
    assert f"host peak {found.host_peak / GIB:.1f} GiB per node" in out
    ddp = ["--lisa-active", "2", "--precision", "bf16-weights", "--host-mem", "200"]
    code, out, err = _memory(capsys, *llama, *ddp)  # the plan the search picked without them
    assert code == 0 and "verdict: does NOT fit" in out, err
    assert "over: GPU 73.7 > 72.0 GiB, host 239.3 > 180.0 GiB" in out
    for bad, message in ((["--host-mem", "0"], "--host-mem must be > 0"),
                         (["--headroom", "1"], "--headroom must lie in [0, 1)")):  # fmt: skip
        code, out, err = _memory(capsys, *llama, *bad)
        assert code == 2 and message in err, err


def test_the_planner_widget_and_the_memory_command_give_one_answer(tmp_path, capsys, monkeypatch):
    """Item 15: at its defaults the widget of notebook 06 answers what `memory` answers for
    the same model and GPUs (the command it shows), for Yi-34B on 8 × 48 GiB; under DDP its
    offload box is off and locked; it writes its launch files into an absolute folder."""
    from scalebio_core.lab.widgets import scaling_planner

    monkeypatch.setenv("SCALEBIO_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    box = scaling_planner()
    shown = box.children[-1].value
    code, out, err = _memory(capsys, *NOISY_PAPER, *YI, "--search")
    assert code == 0, err
    assert _total(html.unescape(shown)) == _total(out) == 39.0
    assert box.planned.text() in out  # the same text, verdict included
    code, again, err = _memory(capsys, *box.argv)  # the command the widget shows
    assert code == 0 and again == out, err
    assert "--search" in box.argv and "--preset" in box.argv

    c = box.controls
    c["search"].value = False
    c["shard"].value = "fsdp"
    c["offload"].value = True
    c["shard"].value = "ddp"
    assert c["offload"].value is False and c["offload"].disabled
    c["shard"].value = "fsdp"
    c["batch"].value, c["max_length"].value = 32, 256
    assert box.planned.plan.setup.batch * 4 * 8 == 32 and box.planned.plan.setup.seq == 256
    code, out, err = _memory(capsys, *box.argv)
    assert code == 0 and box.planned.text() in out, err

    c["search"].value = True
    c["batch"].value, c["max_length"].value = 64, 512
    box.children[-2].children[0].click()  # "write launch files"
    folder = tmp_path / "runs" / "launch" / "01-ai__Yi-34B"
    launch = (folder / "launch.sh").read_text().splitlines()[-1]
    assert launch == plan_command(box.planned.plan, folder) and str(folder) in launch
