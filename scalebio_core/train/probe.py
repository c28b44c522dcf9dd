"""Memory of a few training steps, measured in a fresh process (the CPU's resident set).

`measure(cfg, steps)` runs the steps of run config `cfg` in a child Python and returns what
it measured; `experiments.memory_probe` asks it for a preset, and `benchmarks/memory.py` for
its own configurations, beside the memory model's prediction (`memory.predict`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..core.lisa import optimizer_state_bytes
from .build import setup
from .config import TrainConfig
from .lora import unique_parameters
from .malloc import release_freed_memory
from .trainer import lm_fns, run_step


def measure(
    cfg: TrainConfig, steps: int = 5, mmap_threshold: int | None = None
) -> dict[str, float]:
    """Run `steps` training steps of `cfg` in a fresh process and measure memory (MiB).

    Exact tensor bytes of parameters, gradients and optimizer state after the last step, and two
    resident-set measures (Linux /proc/self/status): `peak_rss_increase_mib`, the peak over the
    steps above the RSS just before them (VmHWM reset through /proc/self/clear_refs, so imports
    and set-up are not counted), and `peak_total_mib`, the same peak above the RSS before the
    models were built (after the imports), i.e. weights + gradients + optimizer state +
    activations, comparable with `memory.predict(...)["total"]`. Transients of the set-up itself
    (loading a checkpoint) are excluded: the peak is reset after it, once freed memory has been
    handed back to the OS (`malloc_trim`). `threads` is torch's thread count in the child.

    glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in its heap, so
    by default the peak includes that slack; `mmap_threshold` (bytes) fixes the threshold in the
    child (MALLOC_MMAP_THRESHOLD_), so every larger block is returned to the OS when freed and
    the resident set tracks the live tensor bytes (what a GPU's max_memory_allocated reports).
    Give `cpu_malloc="system"` in `cfg` to leave glibc's settings to the environment.
    """
    malloc = {} if mmap_threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}
    with tempfile.TemporaryDirectory() as tmp:
        run = {**cfg.to_dict(), "out_dir": str(Path(tmp) / "run")}
        args = {"config": run, "steps": steps}
        code = f"from scalebio_core.train.probe import child; child({json.dumps(args)!r})"
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "SCALEBIO_RUNS": tmp, **malloc},
        )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args_json: str) -> None:  # pragma: no cover - runs in the child of measure
    """The child of `measure`: every module is imported already, so `before` holds no model
    bytes; prints the measurements as one JSON line."""
    args: dict[str, Any] = json.loads(args_json)
    cfg = TrainConfig.from_dict(args["config"])
    release_freed_memory()
    before = _status_mib("VmRSS")  # after the imports, before the models are built
    s = setup(cfg)
    fns = lm_fns(s)
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base = _status_mib("VmRSS")
    for step in range(args["steps"]):
        _, active, batch, val_batch = run_step(s, step, fns)
    peak = _status_mib("VmHWM")
    micro = [*batch, *val_batch]
    mib = 2**20
    params = unique_parameters(s.state.w, s.state.u)  # a shared LoRA base counted once
    out = {
        "params_mib": sum(p.numel() * p.element_size() for p in params) / mib,
        "trainable_mib": sum(p.numel() * p.element_size() for p in params if p.requires_grad) / mib,
        "grads_mib": sum(
            p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None
        )
        / mib,
        "optimizer_state_mib": (
            optimizer_state_bytes(s.state.opt_w) + optimizer_state_bytes(s.state.opt_u)
        )
        / mib,
        "peak_rss_increase_mib": peak - base,
        "peak_total_mib": peak - before,
        "setup_rss_mib": base - before,
        "threads": torch.get_num_threads(),
        # the last step's micro-batches: longest sequence, most labelled (LM-head) positions
        "seq": max(mb["input_ids"].shape[1] for mb in micro),
        "label_tokens": max(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro),
        "lisa_w": list(active[0]) if active else None,
        "lisa_u": list(active[1]) if active else None,
    }
    print(json.dumps(out))
