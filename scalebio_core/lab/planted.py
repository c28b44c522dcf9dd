"""The planted-mixture experiment (notebook 10, `benchmarks/quality.py`): does a method find the
right weights when they are known and interior?

The corpus is `corpora.planted_mixture`: four sources answer the same tasks in four styles, and
the validation set is drawn from a known mixture of the styles (the planted weights). For each
planted mixture and seed this runs ScaleBiO and DoReMi (configs/planted.yaml at a preset) into
the runs folder, reusing finished runs, and reads back each method's *product* after every step:

    scalebio   p after the step (what weights.json would hold if the run stopped there)
    doremi     uniform during the reference phase (no weights yet: the user pays for it), then
               the mean of the proxy's weights so far (DoReMi's product)
    uniform    1/K from the start, at no cost

with the cumulative wall-clock seconds of the steps (`timing.jsonl`), so the distance to the
planted mixture can be drawn against steps and against seconds. DoReMi never reads the
validation set, so its run does not depend on the planted mixture: one DoReMi run per seed serves
every mixture (`doremi_run`; tests/test_planted.py checks that its weights are the same).
Settings: configs/planted_comparison.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..sources.corpora import PLANTED_STYLES, planted_weights
from ..train import runs
from ..train.config import load_preset, read_run_config
from .experiments import run_preset, runs_root


def comparison(preset: str) -> dict[str, Any]:
    """The `preset` section of configs/planted_comparison.yaml (mixtures, seeds, methods,
    tolerance)."""
    return load_preset("planted_comparison", preset)


def mixture_tag(mixture: list[float]) -> str:
    """A folder-safe name of a mixture: [0.5, 0.3, 0.2, 0] → "50-30-20-0"."""
    return "-".join(f"{round(100 * q):d}" for q in mixture)


def _corpus_args(preset: str, mixture: list[float], overrides: dict) -> dict:
    base = load_preset("planted", preset).get("corpus_args", {})
    return {**base, **overrides.get("corpus_args", {}), "mixture": list(mixture)}


def method_run(
    preset: str,
    method: str,
    mixture: list[float],
    seed: int,
    overrides: dict | None = None,
    progress: bool = False,
    tag: str = "",
) -> Path:
    """The run of ScaleBiO or DoReMi at one planted mixture and seed (reused when finished).
    DoReMi's run is the seed's one run (`doremi_run`), whatever the mixture. `tag` keeps runs
    with other `overrides` apart (a folder of their own)."""
    overrides = dict(overrides or {})
    if method == "doremi":
        return doremi_run(preset, seed, mixture, overrides, progress)
    if method != "scalebio":
        raise ValueError(f"method {method!r} has no run; runs exist for scalebio and doremi")
    name = f"planted_{preset}_{mixture_tag(mixture)}_scalebio_seed{seed}" + (
        f"_{tag}" if tag else ""
    )
    out = runs_root() / name
    return _run(preset, out, mixture, seed, overrides, progress)


def _run(preset, out, mixture, seed, overrides, progress, **fields) -> Path:
    """configs/planted.yaml at `preset` with the planted `mixture` and `seed`, into `out`."""
    return run_preset(
        "planted",
        preset,
        progress=progress,
        **{
            **overrides,
            "corpus_args": _corpus_args(preset, mixture, overrides),
            "seed": seed,
            **fields,
            "out_dir": str(out),
        },
    )


def doremi_run(
    preset: str,
    seed: int,
    mixture: list[float],
    overrides: dict | None = None,
    progress: bool = False,
) -> Path:
    """DoReMi at `seed`: trained once, with the first mixture it is asked for written in its
    config (the validation set it never reads), and reused for the others."""
    overrides = dict(overrides or {})
    out = runs_root() / f"planted_{preset}_doremi_seed{seed}"
    if (out / runs.CONFIG).exists():  # the seed's run: its own mixture, so that it is reused
        mixture = read_run_config(out).corpus_args["mixture"]
    return _run(preset, out, mixture, seed, overrides, progress, method="doremi")


def product_curve(run_dir: Path) -> dict[str, Any]:
    """A run's product after each step: `steps` (1, 2, …), `seconds` (cumulative, the steps'
    own time), `weights` (steps × sources, the order of `names`)."""
    rows = runs.read_jsonl(run_dir / runs.TRAJECTORY)
    timing = runs.read_jsonl(run_dir / runs.TIMING)
    if not rows or len(rows) != len(timing):
        raise ValueError(f"{run_dir}: the trajectory and timing.jsonl do not match (unfinished?)")
    names = list(rows[0]["p"])
    k = len(names)
    if "phase" not in rows[0]:  # ScaleBiO: p after the step
        weights = np.array([[r["p"][n] for n in names] for r in rows])
    else:  # DoReMi: uniform until the proxy starts, then the mean of the proxy's weights so far
        weights, total, count = [], np.zeros(k), 0
        for r in rows:
            if r["phase"] == "proxy":
                total, count = total + [r["p"][n] for n in names], count + 1
            weights.append(total / count if count else np.full(k, 1.0 / k))
        weights = np.array(weights)
    seconds = np.cumsum([t["seconds"] for t in timing])
    return {
        "names": names,
        "steps": np.arange(1, len(rows) + 1),
        "seconds": seconds,
        "weights": weights,
    }


def distance(weights: np.ndarray, planted: dict[str, float], names: list[str]) -> np.ndarray:
    """‖p − p_planted‖ (Euclidean) of each row of `weights` (sources in the order of `names`)."""
    target = np.array([planted[n] for n in names])
    return np.linalg.norm(np.atleast_2d(weights) - target, axis=1)


def time_within(seconds: np.ndarray, dist: np.ndarray, tolerance: float) -> float | None:
    """The first time from which the distance stays within `tolerance` to the end (None if the
    last one is outside)."""
    outside = np.flatnonzero(dist > tolerance)
    if len(outside) == 0:
        return 0.0
    if outside[-1] == len(dist) - 1:
        return None
    return float(seconds[outside[-1] + 1])


def run_all(
    preset: str,
    spec: dict | None = None,
    overrides: dict | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every method at every planted mixture and seed of `spec` (default: the preset's):
    one row per (method, mixture, seed) with its curve, distance to the planted weights after
    each step, final weights and distance, and the time to come within `spec["tolerance"]`."""
    spec = spec or comparison(preset)
    styles = _corpus_args(preset, spec["mixtures"][0], overrides or {}).get("styles", "labels")
    tol = float(spec["tolerance"])
    jobs = [
        (m, list(mix), seed)
        for mix in spec["mixtures"]
        for m in spec["methods"]
        for seed in spec["seeds"]
    ]
    out = []
    for method, mix, seed in tqdm(jobs, desc="planted: runs", disable=not progress):
        planted = planted_weights(mix, styles)
        if method == "uniform":
            names = list(PLANTED_STYLES[styles])
            curve = {
                "names": names,
                "steps": np.array([0]),
                "seconds": np.array([0.0]),
                "weights": np.full((1, len(names)), 1.0 / len(names)),
            }
            run_dir = None
        else:
            run_dir = method_run(preset, method, mix, seed, overrides, progress=False)
            curve = product_curve(run_dir)
        dist = distance(curve["weights"], planted, curve["names"])
        out.append(
            {
                "method": method,
                "mixture": mix,
                "seed": seed,
                "run_dir": run_dir,
                "planted": planted,
                **curve,
                "distance": dist,
                "final": dict(zip(curve["names"], curve["weights"][-1].tolist())),
                "final_distance": float(dist[-1]),
                "time_within": time_within(curve["seconds"], dist, tol),
            }
        )
    return out


def summarize(rows: list[dict], tolerance: float) -> list[dict[str, Any]]:
    """Per (mixture, method): the final distance (mean, std over seeds), the seconds of a run,
    and the time to come within `tolerance` (median over the seeds that did, and how many)."""
    out = []
    for mix in dict.fromkeys(tuple(r["mixture"]) for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if tuple(r["mixture"]) == mix and r["method"] == method]
            if not sel:
                continue
            d = np.array([r["final_distance"] for r in sel])
            reached = [r["time_within"] for r in sel if r["time_within"] is not None]
            out.append(
                {
                    "mixture": list(mix),
                    "method": method,
                    "seeds": len(sel),
                    "final_mean": float(d.mean()),
                    "final_std": float(d.std(ddof=1)) if len(sel) > 1 else 0.0,
                    "seconds": float(np.mean([r["seconds"][-1] for r in sel])),
                    "reached": len(reached),
                    "time_within": float(np.median(reached)) if reached else None,
                    "tolerance": tolerance,
                }
            )
    return out


def format_table(summary: list[dict]) -> str:
    """The summary as a markdown table."""
    tol = summary[0]["tolerance"] if summary else 0.05
    lines = [
        f"| planted mixture | method | seeds | final ‖p − p_planted‖ | seconds of the run | "
        f"time to within {tol:g} (median; seeds that got there) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in summary:
        t = (
            f"{s['time_within']:.0f} s ({s['reached']}/{s['seeds']})"
            if s["time_within"] is not None
            else f"never (0/{s['seeds']})"
        )
        lines.append(
            f"| {mixture_tag(s['mixture']).replace('-', ' / ')} | {s['method']} | {s['seeds']} | "
            f"{s['final_mean']:.3f} ± {s['final_std']:.3f} | {s['seconds']:.0f} | {t} |"
        )
    return "\n".join(lines)


def result_sentence(summary: list[dict]) -> str:
    """One sentence per mixture, built from the numbers: where each method ended."""
    parts = []
    for mix in dict.fromkeys(tuple(s["mixture"]) for s in summary):
        sel = {s["method"]: s for s in summary if tuple(s["mixture"]) == mix}
        ends = ", ".join(
            f"{m} {s['final_mean']:.3f}" + (f" ± {s['final_std']:.3f}" if s["seeds"] > 1 else "")
            for m, s in sel.items()
        )
        parts.append(f"planted {mixture_tag(list(mix)).replace('-', '/')}: {ends}")
    return "Final distance to the planted mixture (mean ± std over seeds): " + "; ".join(parts)
