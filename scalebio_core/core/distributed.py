"""How a step reaches the processes: one narrow interface, and its one-process implementation.

The steps (`bilevel.scalebio_step`, `baselines.plain_step`, `baselines.doremi_step`) use four
things of a distribution and nothing else:

    world                          the number of processes
    reduce(t)                      the sum of t over the processes
    backward(model, loss)          accumulate the gradient of this rank's share of the global loss
    clip_and_step(model, opt, c)   reduce the gradient, clip its global norm at c, step the
                                   optimizer; returns the norm before clipping

Every rank's loss is its own samples' share of the global loss, and gradients are summed over the
ranks, so N processes follow the one-process trajectory. `Local` is one process (the toys, the
notebooks, a one-GPU run) and the default of every step; `engines.py` holds one implementation
per engine (DDP, FSDP2, DeepSpeed ZeRO) and the one place that chooses among them.

The same object carries what the loop and the recipes need around the step, the wider interface
`RunDistribution`: the accelerator, device, rank and main process, a barrier, agreement across
the ranks, autocast, building the model copies, and the per-rank parts of a checkpoint. Every
engine implements both; nothing above this module calls torch.distributed itself.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import Interrupted


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the gradients of `model` to a global norm of `max_norm`; the norm before clipping."""
    params = [q for q in model.parameters() if q.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor: FSDP


class Distribution(Protocol):
    """What a step needs of the processes (module docstring)."""

    @property
    def world(self) -> int:
        """The number of processes."""

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the processes."""

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        """Accumulate the gradient of this rank's share of the global loss."""

    def clip_and_step(self, model: nn.Module, opt: Any, max_norm: float) -> float:
        """Reduce the gradient, clip it at `max_norm`, step; the norm before clipping."""


class RunDistribution(Distribution, Protocol):
    """What the loop, the set-up and the recipes need of the processes, beyond the step's four
    members: each engine of `engines.py` and `Local` implement it, and `engines.choose` returns
    one."""

    accelerator: Any
    """The accelerate object of the run (None: a bare process, the toys)."""
    device: torch.device
    """Where this rank computes."""
    sharded: bool
    """Whether u and w are partitioned over the ranks."""
    engine: str
    """The engine a checkpoint records."""

    @property
    def rank(self) -> int:
        """This process's index."""

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, which writes the run folder."""

    def barrier(self) -> None:
        """Wait for every process."""

    def agree(self, ok: bool) -> bool:
        """Whether every process had `ok` (one that failed makes all refuse together)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's autocast (bf16 under precision bf16), or nothing."""

    def build_models(
        self,
        whole: Callable[[torch.device | None], nn.Module],
        empty: Callable[[], nn.Module],
        copies: int,
        finish: Callable[[nn.Module], None],
    ) -> list[nn.Module]:
        """The model copies, placed and in training mode (`Local.build_models`)."""

    def prepare_state(self, state: Any, micro_batch: int) -> None:
        """After the optimizers are built (an engine may take them over)."""

    def checkpoint_meta(self) -> dict[str, Any] | None:
        """What a checkpoint records of the per-rank parts (None: it holds everything)."""

    def save_models(self, state: Any, run_dir: Path) -> None:
        """Every rank: its part of u, w and their optimizers."""

    def drop_old(self, run_dir: Path, step: int) -> None:
        """Every rank: delete the parts of checkpoints older than `step`."""

    def load_models(self, state: Any, run_dir: Path, step: int, meta: dict | None) -> None:
        """Every rank: load its part of u, w and their optimizers for `step` (DeepSpeed; FSDP
        and replicated checkpoints load on any number of processes, `checkpoint.load`)."""


class Local:
    """One process: the default of every step, and what a one-process run uses
    (`RunDistribution`)."""

    sharded = False
    """Whether u and w are partitioned over the ranks (their parameters are gathered only inside
    forward, and each rank checkpoints its own part)."""
    engine = "replicated"
    """The engine a checkpoint records: a whole-state checkpoint resumes in any replicated run."""

    def __init__(self, accelerator: Any = None):
        self.accelerator = accelerator
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")

    @property
    def world(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- what the steps use
    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_step(self, model: nn.Module, opt: torch.optim.Optimizer, max_norm: float) -> float:
        norm = clip_gradients(model, max_norm)
        opt.step()
        return norm

    # -- what the recipes use
    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def agree(self, ok: bool) -> bool:
        return ok

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the accelerator was made with it (nothing on a bare Local)."""
        if self.accelerator is None:
            return contextlib.nullcontext()
        return self.accelerator.autocast()

    def build_models(
        self,
        whole: Callable[[torch.device | None], nn.Module],
        empty: Callable[[], nn.Module],
        copies: int,
        finish: Callable[[nn.Module], None],
    ) -> list[nn.Module]:
        """The model copies (w, then u when `copies` is 2), on the device in training mode,
        before their optimizers are built. `whole(device)` loads the model with its weights
        (random weights are made on `device`, loaded ones read and then placed), `empty()`
        builds it on the meta device; `finish(model)` runs on each copy before it is placed.
        Here w is loaded whole in this process and u is a deep copy of it (FSDP loads once per
        node instead, `engines.Fsdp`)."""
        w = whole(self.device)
        models = [w, copy.deepcopy(w)] if copies == 2 else [w]
        for model in models:
            finish(model)
            model.to(self.device).train()
        return models

    def prepare_state(self, state: Any, micro_batch: int) -> None:
        """After the optimizers are built (DeepSpeed wraps models and optimizers here)."""

    def checkpoint_meta(self) -> dict[str, Any] | None:
        """What checkpoints/last.pt records of the per-rank parts (None: it holds everything)."""
        return None

    def save_models(self, state: Any, run_dir: Path) -> None:
        """Every rank: its part of u, w and their optimizers (sharded engines)."""

    def drop_old(self, run_dir: Path, step: int) -> None:
        """Every rank, after last.pt names `step`: delete the parts of older steps."""

    def load_models(self, state: Any, run_dir: Path, step: int, meta: dict | None) -> None:
        """Every rank: load its part of u, w and their optimizers for `step`."""


LOCAL = Local()
"""The distribution of a single process without accelerate (the toys' default)."""


# ------------------------------------------------------------------ processes: start and end


def end_processes() -> None:
    """Destroy this process's process group, if it has one (idempotent).

    Every exit path must call it while the interpreter is still whole: gloo's worker threads may
    still hold tensors of finished operations, and if they free them during the interpreter's
    own teardown, taking the GIL there aborts the process ("terminate called without an active
    exception", SIGABRT) after its work is done. `ended_at_exit` runs it at a normal exit; the
    command line calls it in its `finally` and then leaves without the teardown (`leave`)."""
    global _had_group
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    _had_group = True
    # DeepSpeed keeps references to the groups (its backend, its group registry): its own
    # destroy releases them as well
    ds = sys.modules.get("deepspeed.comm")
    if ds is not None and getattr(ds, "cdb", None) is not None and ds.cdb.is_initialized():
        ds.destroy_process_group()
    else:
        dist.destroy_process_group()
    gc.collect()
    # a group still referenced elsewhere keeps its worker threads; this lets them take the GIL
    # and free what they hold now, while the interpreter is whole
    time.sleep(GLOO_SETTLE_S)


GLOO_SETTLE_S = 0.5
"""Seconds a process that ends its group waits with the GIL released (`end_processes`)."""

_had_group = False
"""Whether this process had a process group (a launched rank), for `leave`."""


@functools.cache
def ended_at_exit() -> None:
    """Register `end_processes` to run at interpreter exit (once per process: cached)."""
    atexit.register(end_processes)


def leave(code: int) -> None:
    """End the process with status `code`. A launched rank (it had a process group) skips the
    interpreter's teardown: the exit functions run, the output is flushed, and the process ends
    at once, so no thread of a library's process group (DeepSpeed holds them past
    `end_processes`) is left to free its tensors while the interpreter is being torn down. Any
    other process exits normally."""
    dist = torch.distributed
    if not (_had_group or (dist.is_available() and dist.is_initialized())):
        sys.exit(code)
    atexit._run_exitfuncs()  # end_processes among them; trackers and logging flush theirs
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def run_group(
    cmd: Sequence[str],
    timeout: float | None = None,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    capture: bool = True,
) -> subprocess.CompletedProcess:
    """Run `cmd` in a session of its own and wait for it (as `subprocess.run`, text output).

    Whatever happens (it ends, times out, this process is interrupted or fails), nothing it
    started outlives the call: a launcher's ranks are in its session, and the whole session is
    stopped (SIGTERM, then SIGKILL after 5 s) before this returns or raises. A timeout raises
    `subprocess.TimeoutExpired` as `subprocess.run` does."""
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=True, start_new_session=True
    )
    try:
        with terminate_raises():
            out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
    finally:
        _stop_group(proc)  # on every path; after a normal end: ranks a launcher left behind
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def free_port() -> int:
    """A TCP port that was free a moment ago (for a launch's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT_TAKEN = ("eaddrinuse", "address already in use")
"""How a launcher says that its rendezvous port was taken."""


def run_launch(
    command: Callable[[int], Sequence[str]], tries: int = 3, **kwargs: Any
) -> subprocess.CompletedProcess:
    """`run_group` of a multi-process launch, `command(port)` for a free rendezvous port. A port
    is chosen free and bound by the launcher a moment later; when another process took it in
    between (the launcher fails at once with EADDRINUSE), the launch runs again on another port,
    up to `tries` times. Output is captured (`kwargs` as `run_group`'s)."""
    for _ in range(tries):
        out = run_group(command(free_port()), **kwargs)
        if out.returncode == 0 or not any(t in (out.stderr or "").lower() for t in PORT_TAKEN):
            return out
    return out


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Where SIGTERM would end this process at once (its default action: a batch scheduler's
    stop, silent, status -15), it raises `Interrupted` inside the block instead, as Ctrl-C
    raises KeyboardInterrupt: every `finally` runs (a session is stopped, a message said). In
    the main thread only (signals are caught there); a handler already set is left alone."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name}", signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop the session of `proc` (its own process group): SIGTERM, then SIGKILL to whatever is
    left after `grace` seconds; `proc` is reaped."""
    if _signal_group(proc.pid, signal.SIGTERM):
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or the group never empties
            if not _signal_group(proc.pid, 0):
                break
            time.sleep(0.05)
        _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; whether any process of it was left to receive it."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
