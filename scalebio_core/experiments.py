"""Run a preset of `configs/<name>.yaml` into the runs folder, idempotently (the notebooks' entry).

A finished run with the same config is reused, an unfinished one is resumed, a run with another
config is refused (nothing is overwritten). `$SCALEBIO_RUNS` moves the runs folder (tests and
`make reproduce` point it elsewhere).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from . import runs
from .bilevel import ConfigError
from .presets import CONFIG_DIR


def runs_root() -> Path:
    env = os.environ.get("SCALEBIO_RUNS")
    return Path(env) if env else CONFIG_DIR.parent / "runs"


def preset_config(name: str, preset: str, **overrides: Any):
    """The TrainConfig of a preset (defaults, preset section, then overrides)."""
    from .cli import resolve_config
    from .trainer import TrainConfig

    path = CONFIG_DIR / f"{name}.yaml"
    d = resolve_config(str(path), preset, [])
    d = {**d, "out_dir": str(runs_root() / f"{name}_{preset}"), **overrides}
    return TrainConfig.from_dict(d)


def is_finished(run_dir: Path, steps: int) -> bool:
    traj = run_dir / runs.TRAJECTORY
    if not (traj.exists() and (run_dir / runs.WEIGHTS).exists()):
        return False
    return len(runs.read_jsonl(traj)) == steps


def run_preset(
    name: str,
    preset: str,
    callback: Callable | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Train the preset unless the same run already finished; return its run directory."""
    from .trainer import train

    cfg = preset_config(name, preset, **overrides)
    run_dir = Path(cfg.out_dir)
    if (run_dir / runs.CONFIG).exists():
        diff = runs.config_diff(yaml.safe_load((run_dir / runs.CONFIG).read_text()), cfg.to_dict())
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run with another config:\n  "
                + "\n  ".join(diff)
                + f"\nMove or delete {run_dir} to rerun (it is regenerable), or set "
                "$SCALEBIO_RUNS to another folder."
            )
        if is_finished(run_dir, cfg.steps):
            return run_dir
        train(
            cfg, resume=(run_dir / runs.CHECKPOINT).exists(), progress=progress, callback=callback
        )
        return run_dir
    train(cfg, progress=progress, callback=callback)
    return run_dir


def memory_probe(name: str, preset: str, steps: int = 5, **overrides: Any) -> dict[str, float]:
    """Run `steps` training steps of a preset in a fresh process and measure memory (MiB).

    Exact tensor bytes of parameters, gradients and optimizer state after the last step, and the
    peak resident-set increase over the steps (Linux VmHWM reset through /proc/self/clear_refs,
    so the imports and the set-up are not counted).
    """
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args = {
            "name": name,
            "preset": preset,
            "steps": steps,
            "overrides": {**overrides, "out_dir": str(Path(tmp) / "run")},
        }
        code = f"from scalebio_core.experiments import _probe; _probe({json.dumps(args)!r})"
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "SCALEBIO_RUNS": tmp},
        )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _probe(args_json: str) -> None:  # pragma: no cover - runs in the child process
    import torch

    from .lisa import optimizer_state_bytes
    from .trainer import LMFns, run_step, setup

    args = json.loads(args_json)
    cfg = preset_config(args["name"], args["preset"], **args["overrides"])
    s = setup(cfg)
    fns = LMFns(cfg.val_dropout)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base = _status_mib("VmRSS")
    for step in range(args["steps"]):
        run_step(s, step, fns)
    mib = 2**20
    models = (s.state.w, s.state.u)
    out = {
        "params_mib": sum(p.numel() * p.element_size() for m in models for p in m.parameters())
        / mib,
        "trainable_mib": sum(
            p.numel() * p.element_size() for m in models for p in m.parameters() if p.requires_grad
        )
        / mib,
        "grads_mib": sum(
            p.grad.numel() * p.grad.element_size()
            for m in models
            for p in m.parameters()
            if p.grad is not None
        )
        / mib,
        "optimizer_state_mib": (
            optimizer_state_bytes(s.state.opt_w) + optimizer_state_bytes(s.state.opt_u)
        )
        / mib,
        "peak_rss_increase_mib": _status_mib("VmHWM") - base,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out))
