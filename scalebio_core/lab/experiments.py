"""Run a preset of `configs/<name>.yaml` into the runs folder, idempotently (the notebooks' entry).

A run's folder is named by the preset and a key of everything that produced it
(`<runs>/<name>_<preset>_<key>`: the resolved config and the SHA-256 of every data file it
names, `run_key`), never by the preset's name alone: another config, or a data folder whose files
changed under the same path, gets a folder of its own. A finished run is reused (said in one
line, with its training time), an unfinished one is resumed; a folder given by `out_dir` that
holds a run of another config or of other data files is refused (nothing is overwritten).
`$SCALEBIO_RUNS` moves the runs folder (tests and `make reproduce` point it elsewhere).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import files
from ..errors import ConfigError
from ..train import runs
from ..train.build import data_specs, heldout_spec
from ..train.config import CONFIG_DIR, TrainConfig, load_preset, read_run_config
from ..train.identity import RESUME_IGNORED, data_fingerprint, file_sha
from ..train.pipeline import EVAL, resample_run, sft
from ..train.probe import measure
from ..train.trainer import expected_rows, train
from .progress import TABLE, RunProgress, in_notebook


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


KEY_CHARS = 10
"""Hex digits of `run_key` in a folder's name."""
DATA_FILES = "data_files.json"
"""The SHA-256 of every data file a run's config names (`data_files`), written by `run_preset`
beside the run: a reuse of the folder with other files is refused."""


def data_files(cfg: TrainConfig) -> dict[str, str]:
    """The SHA-256 of every data file the config names, by absolute path
    (`identity.data_fingerprint`): the sources, the validation and the test set of `data_dir` or
    `sources`, a `test` file, a data folder's manifest.json. An embedded corpus or a hub dataset
    has no file: the config names it. A path that does not exist is left out (the run says so)."""
    specs = []
    if cfg.data_dir or cfg.sources:
        with warnings.catch_warnings():  # the run says what it reads (here only hashed)
            warnings.simplefilter("ignore")
            train_specs, val_spec = data_specs(cfg)
        specs += [*train_specs, val_spec]
    test = heldout_spec(cfg)
    specs += [test] if test is not None else []
    on_disk = [s for s in specs if s.path is not None and Path(s.path).exists()]
    out = data_fingerprint(on_disk, {})
    manifest = Path(cfg.data_dir or "") / "manifest.json"
    if cfg.data_dir and manifest.is_file():
        out[str(manifest.resolve())] = file_sha(manifest)
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]


def _what(cfg: TrainConfig) -> dict[str, Any]:
    """The config less where and how the run is written or held (`identity.RESUME_IGNORED`)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RESUME_IGNORED}


def run_key(cfg: TrainConfig) -> str:
    """A short hash of everything that makes the run: the resolved config (less where and how it
    is written or held) and its data files' SHA-256 (`data_files`)."""
    return _digest({"config": _what(cfg), "data": data_files(cfg)})


def preset_config(name: str, preset: str, **overrides: Any) -> TrainConfig:
    """The TrainConfig of a preset of configs/<name>.yaml (`config.load_preset`: defaults, the
    preset's section, then the overrides), written to <runs folder>/<name>_<preset>_<key>
    (`run_key`; `_<method>` after the preset for a method other than ScaleBiO), or to the
    overrides' `out_dir`."""
    if "out_dir" in overrides:
        return TrainConfig.from_dict(load_preset(name, preset, overrides))
    stem = runs_root() / f"{name}_{preset}"
    cfg = TrainConfig.from_dict(load_preset(name, preset, {**overrides, "out_dir": str(stem)}))
    if cfg.method != "scalebio":
        stem = stem.with_name(f"{stem.name}_{cfg.method}")
    return cfg.replace(out_dir=f"{stem}_{run_key(cfg)}")


def is_finished(run_dir: Path, rows: int) -> bool:
    """A trajectory of `rows` rows and the weights are written (see `trainer.expected_rows`)."""
    traj = run_dir / runs.TRAJECTORY
    if not (traj.exists() and (run_dir / runs.WEIGHTS).exists()):
        return False
    return len(runs.read_jsonl(traj)) == rows


def training_seconds(folder: Path) -> float:
    """The seconds a run's (or a fine-tuning's) steps took, from its timing.jsonl (0 without)."""
    timing = Path(folder) / runs.TIMING
    return sum(r["seconds"] for r in runs.read_jsonl(timing)) if timing.exists() else 0.0


def seconds_text(seconds: float) -> str:
    """Seconds as a run's time is said: one decimal under 10 s ("3.5 s"), else whole ("70 s")."""
    return f"{seconds:.{0 if seconds >= 10 else 1}f} s"


def reuse_line(folder: Path, done: Path, what: str = "run") -> str:
    """The line a reused `folder` says: where it is, how long it trained and when (`done`'s
    time, the file its end writes), and how to redo it."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(done.stat().st_mtime))
    return (
        f"reusing the finished {what} in {folder} (trained in "
        f"{seconds_text(training_seconds(folder))} on {when}): delete it to retrain"
    )


def _check_folder(run_dir: Path, cfg: TrainConfig, now: Mapping[str, str]) -> None:
    """Refuse a run folder that holds a run of another config or of other data files."""
    old = read_run_config(run_dir)
    # keys added since the run take their defaults; a moved run folder is the same run
    diff = runs.config_diff(old.to_dict(), cfg.to_dict(), ignore=("out_dir", "tracker"))
    if (run_dir / DATA_FILES).exists():
        then = json.loads((run_dir / DATA_FILES).read_text())
        for f in sorted(set(then) | set(now)):
            if f not in now:
                diff.append(f"{f}: read by the run, now missing")
            elif f not in then:
                diff.append(f"{f}: new (the run did not read it)")
            elif then[f] != now[f]:
                diff.append(f"{f}: changed since the run")
    if diff:
        raise ConfigError(
            f"{run_dir} holds a run of another config or other data:\n  "
            + "\n  ".join(diff)
            + f"\nMove or delete {run_dir} to rerun (it is regenerable), or leave out_dir "
            "unset (each config and data gets a folder of its own)."
        )


def run_preset(
    name: str,
    preset: str,
    callback: Callable | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Train the preset unless the same run already finished; return its run directory.

    A finished run is reused, in one line (`reuse_line`), with its start table when `progress`.
    In a notebook, `progress` is a widget bar with the time to go (`progress.RunProgress`), not
    the trainer's plain lines; on a terminal, the trainer's bar."""
    cfg = preset_config(name, preset, **overrides)
    run_dir = Path(cfg.out_dir)
    now = data_files(cfg)
    resume = False
    if (run_dir / runs.CONFIG).exists():
        _check_folder(run_dir, cfg, now)
        if is_finished(run_dir, expected_rows(cfg)):
            print(reuse_line(run_dir, run_dir / runs.WEIGHTS), flush=True)
            if progress and (run_dir / TABLE).exists():
                print((run_dir / TABLE).read_text().rstrip(), flush=True)
            return run_dir
        resume = (run_dir / runs.CHECKPOINT).exists()
    widget = progress and in_notebook()
    shown = RunProgress(run_dir, expected_rows(cfg), f"{name} ({preset})", widget, callback)
    try:
        train(cfg, resume=resume, progress=progress and not widget, callback=shown)
    finally:
        shown.close()
    files.write_json(run_dir / DATA_FILES, now)
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
    if method != "scalebio":  # its folder: <name>_<preset>_<method>_<key> (`preset_config`)
        overrides["method"] = method
    return run_preset(name, preset, progress=progress, **overrides)


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
    folder (a finished fine-tuning is read back, never redone, when its key.json, everything
    that made it: the run, the weights, the sizes, the config and its data files, matches); `tag`
    keeps the fine-tunings of another protocol (e.g. another budget) apart. `overrides` are
    run-config fields over every run's and fine-tuning's preset (a notebook's OVERRIDES).
    """
    spec = spec or comparison_spec(preset)
    methods = methods or list(spec["methods"])
    seeds = seeds if seeds is not None else list(spec["seeds"])
    rows, reused = [], 0
    jobs = [(m, seed) for m in methods for seed in seeds]
    folder = runs_root() / (f"sft_{name}_{preset}" + (f"_{tag}" if tag else ""))
    for method, seed in tqdm(jobs, desc=f"{name}: methods × seeds", disable=not progress):
        run_dir = method_run(name, preset, method, overrides=overrides)
        weights = json.loads((run_dir / runs.WEIGHTS).read_text())
        add_val = bool(spec.get("add_validation", False))
        cfg = preset_config(name, preset, **{**(overrides or {}), **spec["sft"], "seed": seed})
        key = {
            "run": run_dir.name,  # keyed by its config and data (`run_key`)
            "weights": weights,
            "n": spec["n"],
            "token_budget": spec["token_budget"],
            "sft": spec["sft"],
            "seed": seed,
            "add_validation": add_val,
            "overrides": overrides or {},
            "config": _what(cfg),
            "data": data_files(cfg),
        }
        out = folder / f"{method}_seed{seed}"
        key_file = out / "key.json"  # read back only with the same key: never another's result
        done = (out / EVAL).exists() and key_file.exists()
        if done and json.loads(key_file.read_text()) == key:
            result = json.loads((out / EVAL).read_text())
            reused += 1
        else:
            if out.exists():
                shutil.rmtree(out)  # an unfinished or outdated fine-tuning: regenerable
            data = resample_run(
                run_dir, spec["n"], out / "data" / "train.jsonl", seed=seed, add_validation=add_val
            )
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
    if reused:
        print(
            f"reusing {reused} finished fine-tunings of {len(jobs)} in {folder} (each read back "
            "only when its key.json matches what makes it now): delete them to redo",
            flush=True,
        )
    return rows


def finetune(
    run_dir: Path,
    cfg: TrainConfig,
    label: str,
    weights: Mapping[str, float],
    n: int,
    seed: int = 0,
) -> dict:
    """Fine-tune a fresh model (`cfg`: its model, steps and held-out test set) on `n` records
    resampled from `run_dir`'s sources at `weights`, and score it (`pipeline.sft`: eval.json).
    Kept in <runs>/<run folder>_sft_<label>_<key>, keyed by everything that made it (the run,
    the weights, n, the seed, the config and its data files): a finished one is read back, and
    says so in one line."""
    run_dir = Path(run_dir)
    key = {
        "run": run_dir.name,
        "weights": dict(weights),
        "n": n,
        "seed": seed,
        "config": _what(cfg),
        "data": data_files(cfg),
    }
    out = runs_root() / f"{run_dir.name}_sft_{label}_{_digest(key)}"
    if (out / EVAL).exists():
        print(reuse_line(out, out / EVAL, "fine-tuning"), flush=True)
        return json.loads((out / EVAL).read_text())
    # overwrite=True: a fine-tuning stopped before its eval.json is redone
    data = resample_run(
        run_dir, n, out / "data" / "train.jsonl", seed=seed, weights=dict(weights), overwrite=True
    )
    return sft(cfg.replace(out_dir=str(out)), data, out, progress=False, overwrite=True)


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
