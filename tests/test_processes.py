"""Processes end cleanly: a launched rank destroys its process group before the interpreter ends
(gloo's worker threads could otherwise abort it at exit: "terminate called without an active
exception", SIGABRT, seen as a test failing at random), and nothing a command starts outlives it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import BASE, launch_probe

from scalebio_core.core.distributed import run_group, run_launch

AT_EXIT_PROBE = """
import atexit, json, sys
from pathlib import Path

import torch


def last_words():  # registered first, so it runs last of the exit handlers
    row = {"rank": RANK, "group_alive": torch.distributed.is_initialized()}
    (Path(sys.argv[2]) / f"rank{RANK}.json").write_text(json.dumps(row))


RANK = None
atexit.register(last_words)

from scalebio_core.train.config import TrainConfig
from scalebio_core.parallel.engines import make_accelerator

accelerator = make_accelerator(TrainConfig(**json.loads(sys.argv[1])))
RANK = accelerator.process_index
accelerator.wait_for_everyone()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


@pytest.mark.slow
def test_every_rank_ends_its_process_group_before_the_interpreter_does(tmp_path):
    rows = launch_probe(tmp_path, AT_EXIT_PROBE, {**BASE, "out_dir": str(tmp_path / "r")})
    assert not any(r["group_alive"] for r in rows.values()), rows


def test_a_command_that_times_out_leaves_nothing_running(tmp_path):
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! > {pids}; sleep 300"  # a child of its own, like a rank
    with pytest.raises(subprocess.TimeoutExpired):
        run_group(["sh", "-c", script], timeout=2)
    child = int(pids.read_text())
    deadline = time.time() + 30
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_finished_command_leaves_no_straggler(tmp_path):
    pids = tmp_path / "pids"
    out = run_group(
        ["sh", "-c", f"sleep 300 >/dev/null 2>&1 & echo $! > {pids}; echo done"], timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "done"
    child = int(pids.read_text())
    deadline = time.time() + 30
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_launch_whose_port_was_taken_runs_again_on_another(tmp_path):
    marker, ports = tmp_path / "tried", []

    def command(port: int) -> list[str]:  # the first launch finds its port taken, as torch says
        ports.append(port)
        return ["sh", "-c", f"[ -f {marker} ] && echo ran || {{ touch {marker}; "
                "echo 'EADDRINUSE: address already in use' >&2; exit 1; }"]  # fmt: skip

    out = run_launch(command, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ran" and len(ports) == 2
    failing = run_launch(lambda port: ["sh", "-c", "echo other >&2; exit 3"], timeout=60)
    assert failing.returncode == 3  # any other failure is returned at once


LEAVE = """
import atexit, sys, torch
from scalebio_core.core.distributed import ended_at_exit, leave
if sys.argv[1] == "group":  # a launched rank: a process group of its own
    torch.distributed.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=0,
                                         world_size=1)
    ended_at_exit()
atexit.register(lambda: print("exit functions ran", flush=True))
print("work done", end="")  # unflushed
leave(3)
"""


@pytest.mark.parametrize("kind", ["plain", "group"])
def test_leave_runs_the_exit_functions_and_keeps_the_status(tmp_path, kind):
    out = run_group([sys.executable, "-c", LEAVE, kind, str(tmp_path / "store")], timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout == "work doneexit functions ran\n", out.stdout
    assert "terminate called" not in out.stderr
