"""Run a preset of `configs/<name>.yaml` into the runs folder, idempotently (the notebooks' entry).

A finished run with the same config is reused, an unfinished one is resumed, a run with another
config is refused (nothing is overwritten). `$SCALEBIO_RUNS` moves the runs folder (tests and
`make reproduce` point it elsewhere).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import files
from ..errors import ConfigError
from ..train import runs
from ..train.config import CONFIG_DIR, TrainConfig, load_preset, read_run_config
from ..train.pipeline import EVAL, resample_run, sft
from ..train.probe import measure
from ..train.trainer import expected_rows, train


def runs_root() -> Path:
    env = os.environ.get("SCALEBIO_RUNS")
    return Path(env) if env else CONFIG_DIR.parent / "runs"


def benchmark(name: str) -> ModuleType:
    """The script `benchmarks/<name>.py` of the repository as a module (the notebooks show what a
    benchmark measures by calling it, so the two cannot drift apart)."""
    path = CONFIG_DIR.parent / "benchmarks" / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the benchmarks ship with the repository, not with the installed "
            "package. Run the notebook from a clone of the repository (`pip install -e .` there)."
        )
    module_name = f"scalebio_benchmark_{name}"
    if module_name not in sys.modules:  # dataclasses look their module up while being defined
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]  # no half-loaded module for the next call
            raise
    return sys.modules[module_name]


def preset_config(name: str, preset: str, **overrides: Any) -> TrainConfig:
    """The TrainConfig of a preset of configs/<name>.yaml (`config.load_preset`: defaults, the
    preset's section, then the overrides), written to <runs folder>/<name>_<preset>."""
    out_dir = str(runs_root() / f"{name}_{preset}")
    return TrainConfig.from_dict(load_preset(name, preset, {"out_dir": out_dir, **overrides}))


def is_finished(run_dir: Path, rows: int) -> bool:
    """A trajectory of `rows` rows and the weights are written (see `trainer.expected_rows`)."""
    traj = run_dir / runs.TRAJECTORY
    if not (traj.exists() and (run_dir / runs.WEIGHTS).exists()):
        return False
    return len(runs.read_jsonl(traj)) == rows


def run_preset(
    name: str,
    preset: str,
    callback: Callable | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Train the preset unless the same run already finished; return its run directory."""
    cfg = preset_config(name, preset, **overrides)
    run_dir = Path(cfg.out_dir)
    if (run_dir / runs.CONFIG).exists():
        old = read_run_config(run_dir)
        # keys added since the run take their defaults; a moved run folder is the same run
        diff = runs.config_diff(old.to_dict(), cfg.to_dict(), ignore=("out_dir", "tracker"))
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run with another config:\n  "
                + "\n  ".join(diff)
                + f"\nMove or delete {run_dir} to rerun (it is regenerable), or set "
                "$SCALEBIO_RUNS to another folder."
            )
        if is_finished(run_dir, expected_rows(cfg)):
            return run_dir
        train(
            cfg, resume=(run_dir / runs.CHECKPOINT).exists(), progress=progress, callback=callback
        )
        return run_dir
    train(cfg, progress=progress, callback=callback)
    return run_dir


def memory_probe(
    name: str,
    preset: str,
    steps: int = 5,
    mmap_threshold: int | None = None,
    **overrides: Any,
) -> dict[str, float]:
    """Memory (MiB) of `steps` training steps of a preset of configs/<name>.yaml, measured in a
    fresh process (`probe.measure`, which says what each number is). The probe leaves glibc's
    settings to the environment (`cpu_malloc="system"`) unless `cpu_malloc="keep"` (the
    trainer's CPU default, see `malloc.py`) is passed."""
    overrides.setdefault("cpu_malloc", "system")
    return measure(preset_config(name, preset, **overrides), steps, mmap_threshold)


# ------------------------------------------------------------------ methods side by side


def comparison_spec(preset: str, name: str = "baselines") -> dict:
    """The `preset` section of configs/<name>.yaml (corpora, methods, seeds, n, budget, sft)."""
    return load_preset(name, preset)


def method_run(
    name: str,
    preset: str,
    method: str,
    progress: bool = False,
    overrides: dict | None = None,
) -> Path:
    """The run of `method` (ScaleBiO or a baseline) on a corpus preset: reused when finished;
    `overrides` are run-config fields over the preset's (a notebook's OVERRIDES)."""
    overrides = dict(overrides or {})
    if method == "scalebio":
        return run_preset(name, preset, progress=progress, **overrides)
    out = str(runs_root() / f"{name}_{preset}_{method}")
    return run_preset(
        name, preset, progress=progress, **{**overrides, "method": method, "out_dir": out}
    )


def compare_methods(
    name: str,
    preset: str,
    spec: dict | None = None,
    progress: bool = True,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    tag: str = "",
    overrides: dict | None = None,
) -> list[dict]:
    """Weights of each method on corpus `name`, then fine-tuning on each resampled mixture.

    One row per (method, seed): target loss and accuracy on the held-out target set, the steps
    and tokens of the fine-tuning, and the method's weights. Every step is cached in the runs
    folder (a finished fine-tuning with the same settings is read back, never redone); `tag`
    keeps the fine-tunings of another protocol (e.g. another budget) apart. `overrides` are
    run-config fields over every run's and fine-tuning's preset (a notebook's OVERRIDES).
    """
    spec = spec or comparison_spec(preset)
    methods = methods or list(spec["methods"])
    seeds = seeds if seeds is not None else list(spec["seeds"])
    rows = []
    jobs = [(m, seed) for m in methods for seed in seeds]
    for method, seed in tqdm(jobs, desc=f"{name}: methods × seeds", disable=not progress):
        run_dir = method_run(name, preset, method, overrides=overrides)
        weights = json.loads((run_dir / runs.WEIGHTS).read_text())
        folder = f"sft_{name}_{preset}" + (f"_{tag}" if tag else "")
        out = runs_root() / folder / f"{method}_seed{seed}"
        add_val = bool(spec.get("add_validation", False))
        key = {
            "weights": weights,
            "n": spec["n"],
            "token_budget": spec["token_budget"],
            "sft": spec["sft"],
            "seed": seed,
            "add_validation": add_val,
            "overrides": overrides or {},
        }
        key_file = out / "key.json"
        done = (out / EVAL).exists() and key_file.exists()
        if done and json.loads(key_file.read_text()) == key:
            result = json.loads((out / EVAL).read_text())
        else:
            if out.exists():
                shutil.rmtree(out)  # an unfinished or outdated fine-tuning: regenerable
            data = resample_run(
                run_dir, spec["n"], out / "data" / "train.jsonl", seed=seed, add_validation=add_val
            )
            cfg = preset_config(name, preset, **{**(overrides or {}), **spec["sft"], "seed": seed})
            result = sft(cfg, data, out, token_budget=spec["token_budget"], progress=False)
            files.write_json(key_file, key)
        rows.append(
            {
                "corpus": name,
                "method": method,
                "seed": seed,
                "weights": weights,
                **{k: v for k, v in result.items() if k != "examples"},
            }
        )
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of target loss (and accuracy) per corpus/method."""
    out = []
    keys = list(dict.fromkeys((r["corpus"], r["method"]) for r in rows))
    for corpus, method in keys:
        sel = [r for r in rows if r["corpus"] == corpus and r["method"] == method]
        loss = np.array([r["target_loss"] for r in sel])
        row = {
            "corpus": corpus,
            "method": method,
            "seeds": len(sel),
            "loss_mean": float(loss.mean()),
            "loss_std": float(loss.std(ddof=1)) if len(sel) > 1 else 0.0,
            "tokens": int(np.mean([r["tokens"] for r in sel])),
        }
        if all("accuracy" in r for r in sel):
            acc = np.array([r["accuracy"] for r in sel])
            row["acc_mean"] = float(acc.mean())
            row["acc_std"] = float(acc.std(ddof=1)) if len(sel) > 1 else 0.0
        out.append(row)
    return out


def format_table(summary: list[dict]) -> str:
    """The summary as a markdown table (mean ± std over seeds)."""
    acc = any("acc_mean" in r for r in summary)
    head = "| corpus | method | seeds | target loss | " + ("accuracy | " if acc else "")
    lines = [head + "tokens |", "|---|---|---:|---:|" + ("---:|" if acc else "") + "---:|"]
    for r in summary:
        a = (
            f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f} | "
            if "acc_mean" in r
            else ("– | " if acc else "")
        )
        lines.append(
            f"| {r['corpus']} | {r['method']} | {r['seeds']} | "
            f"{r['loss_mean']:.4f} ± {r['loss_std']:.4f} | {a}{r['tokens']:,} |"
        )
    return "\n".join(lines)
