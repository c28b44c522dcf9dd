"""Quality per compute (`benchmarks/quality.py --compute`, notebook 11): which method gives the
better mixture for the compute it spends? ScaleBiO, a swarm of proxy runs (`method: swarm`) at
several N, DoReMi and uniform, at several seeds, on

- the planted mixture(s) (`corpora.planted_mixture`, notebook 10): the distance ‖p − q‖
  (Euclidean) of each method's weights to the known answer q;
- embedded corpora (notebooks 04–05, 07): the held-out target loss of a fresh model fine-tuned on
  `n` examples resampled by each method's weights, for a token budget (the protocol of
  `experiments.compare_methods`: `pipeline.resample_run`, then `pipeline.sft`).

Settings: configs/quality_compute.yaml. Every run and fine-tuning is cached in the runs folder
(`experiments.run_preset`'s keyed folders; the fine-tunings under compute_sft_<corpus>_<preset>,
each read back only when its key.json matches), so a rerun reads them back.

**Compute**, from each run's own files (tokens are real, unpadded tokens, as `count_tokens`
counts them; the fine-tuning on the mixture is the same for every method and is not counted):

    ScaleBiO   a step runs three forward–backward passes: u and w on the training batch, w on the
               validation batch (2·train + val tokens). The trajectory records train + val per
               step; the batches are drawn again from the run's own samplers (`build.setup`,
               `step_batches`) to split the two, and checked against it.
    DoReMi     a reference step: one pass on the training batch; a proxy step: one pass on the
               batch and two forward-only passes (the proxy's and the reference's losses).
    swarm (N)  each proxy step: one pass on the batch; each proxy's score: one forward-only pass
               over the validation set. The swarm at N is the first N proxies of one run with the
               largest N, fitted on their results alone (`core.swarm.swarm_weights`, the run's
               own regressor and seed): they are the proxies a run with swarm_runs = N trains (the
               same mixtures, drawn in order by `draw_mixtures`, the same seeds and batches), and
               the largest N's fit is checked to equal the run's weights.json.
    uniform    nothing.

`compute` = forward–backward tokens + forward-only tokens / 3 (a forward pass is about a third
of a forward–backward one). Seconds are the steps' own (timing.jsonl; the swarm's per-proxy
seconds in swarm.jsonl, which include its scoring, plus the fit), on the machine that ran them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import files
from ..core.swarm import swarm_weights
from ..sources.corpora import planted_weights
from ..train import runs
from ..train.build import count_tokens, setup, step_batches
from ..train.config import load_preset, read_run_config
from ..train.identity import RESUME_IGNORED
from ..train.pipeline import EVAL, resample_run, sft
from ..train.proxies import PROXIES, SUMMARY
from . import planted
from .experiments import data_files, preset_config, run_preset, runs_root

SETTINGS = "quality_compute"
"""configs/quality_compute.yaml."""
FORWARD_SHARE = 1 / 3
"""A forward-only token's share of a forward–backward token in `compute`."""
METHODS = ("scalebio", "swarm", "doremi", "uniform")


def settings(preset: str) -> dict[str, Any]:
    """The `preset` section of configs/quality_compute.yaml."""
    return load_preset(SETTINGS, preset)


def problems(spec: dict) -> list[dict[str, Any]]:
    """The problems of `spec`: each planted mixture, then each corpus. A problem: `name`,
    `config` (configs/<config>.yaml), `kind` ('planted' or 'corpus'), `run` (run-config fields
    for every method's run), `swarm_steps`, and the planted `mixture`."""
    out = []
    part = spec.get("planted") or {}
    for mix in part.get("mixtures", []):
        run = dict(part.get("run") or {})
        run["corpus_args"] = {**run.get("corpus_args", {}), "mixture": list(mix)}
        out.append(
            {
                "name": f"planted {planted.mixture_tag(mix).replace('-', '/')}",
                "config": "planted",
                "kind": "planted",
                "run": run,
                "swarm_steps": part.get("swarm_steps", spec["swarm_steps"]),
                "mixture": list(mix),
            }
        )
    for corpus, part in (spec.get("corpora") or {}).items():
        part = part or {}
        out.append(
            {
                "name": corpus,
                "config": corpus,
                "kind": "corpus",
                "run": dict(part.get("run") or {}),
                "swarm_steps": part.get("swarm_steps", spec["swarm_steps"]),
            }
        )
    return out


# ---------------------------------------------------------------- the runs


def method_run(problem: dict, method: str, seed: int, preset: str, spec: dict) -> Path:
    """The run of ScaleBiO, DoReMi or the swarm (its largest N) on a problem at a seed, reused
    when finished. DoReMi never reads the validation set, so on the planted corpus its run holds
    the first planted mixture whatever the problem's (one run per seed serves every mixture)."""
    fields = {**problem["run"], "seed": seed}
    if method == "doremi" and problem["kind"] == "planted":
        first = problems(spec)[0]["mixture"]
        fields["corpus_args"] = {**fields["corpus_args"], "mixture": first}
    if method == "swarm":
        fields.update(
            method="swarm",
            swarm_runs=max(spec["swarm_runs"]),
            swarm_steps=problem["swarm_steps"],
            **{f"swarm_{k}": v for k, v in (spec.get("swarm") or {}).items()},
        )
    elif method != "scalebio":
        fields["method"] = method
    return run_preset(problem["config"], preset, progress=False, **fields)


def _cost(fb: Sequence[float], fo: Sequence[float], seconds: Sequence[float]) -> dict:
    """Cumulative costs after each step (arrays) from the steps' own."""
    fb, fo = np.cumsum(fb, dtype=np.float64), np.cumsum(fo, dtype=np.float64)
    return {
        "fb_tokens": fb,
        "fo_tokens": fo,
        "compute": fb + FORWARD_SHARE * fo,
        "seconds": np.cumsum(seconds, dtype=np.float64),
    }


def scalebio_cost(run_dir: Path) -> dict:
    """A ScaleBiO run's cumulative cost after each step: 2·train + val tokens of forward–backward
    passes per step (the batches drawn again from its samplers, checked against the
    trajectory's train + val), no forward-only pass, the steps' seconds."""
    rows = runs.read_jsonl(run_dir / runs.TRAJECTORY)
    timing = runs.read_jsonl(run_dir / runs.TIMING)
    s = setup(read_run_config(run_dir))
    fb = []
    for t, row in enumerate(rows):
        train, val = step_batches(s, t)
        n_train, n_val = count_tokens(s, train), count_tokens(s, val)
        if n_train + n_val != row["tokens"]:
            raise ValueError(
                f"{run_dir}: step {t}'s batches hold {n_train} + {n_val} tokens, the trajectory "
                f"{row['tokens']}: the batches drawn again are not the run's"
            )
        fb.append(2 * n_train + n_val)
    return _cost(fb, np.zeros(len(fb)), [r["seconds"] for r in timing])


def doremi_cost(run_dir: Path) -> dict:
    """A DoReMi run's cumulative cost after each step: the batch's tokens through one
    forward–backward pass per step, twice through a forward-only pass in the proxy phase."""
    rows = runs.read_jsonl(run_dir / runs.TRAJECTORY)
    timing = runs.read_jsonl(run_dir / runs.TIMING)
    fb = [r["tokens"] for r in rows]
    fo = [2 * r["tokens"] if r["phase"] == "proxy" else 0 for r in rows]
    return _cost(fb, fo, [r["seconds"] for r in timing])


def swarm_at(run_dir: Path, n: int) -> tuple[dict[str, float], dict]:
    """The swarm of the first `n` proxies of a swarm run: its weights (the run's regressor fitted
    on their results alone) and its cost (their tokens and seconds, and the fit's seconds)."""
    records = runs.read_jsonl(run_dir / PROXIES)
    if len(records) < n:
        raise ValueError(f"{run_dir}: {len(records)} proxies, fewer than the {n} asked for")
    records = records[:n]
    cfg = read_run_config(run_dir)
    natural = json.loads((run_dir / SUMMARY).read_text())["natural"]
    names = list(natural)
    p = np.array([[r["p"][k] for k in names] for r in records])
    loss = np.array([r["target_loss"] for r in records])
    t0 = time.perf_counter()
    w, _ = swarm_weights(p, loss, [natural[k] for k in names], cfg.swarm, cfg.seed)
    fit = time.perf_counter() - t0
    weights = {k: round(float(v), 10) for k, v in zip(names, w)}
    if n == cfg.swarm.runs:  # the fit of every proxy is the run's own
        own = json.loads((run_dir / runs.WEIGHTS).read_text())
        if max(abs(own[k] - weights[k]) for k in names) > 1e-6:
            raise ValueError(f"{run_dir}: the refit of its {n} proxies is not its weights.json")
    cost = _cost(
        [r["tokens"] for r in records],
        [r["eval_tokens"] for r in records],
        [r["seconds"] for r in records],
    )
    cost["seconds"][-1] += fit
    return weights, cost


def budget_text(run_dir: Path, n: int | None = None) -> str:
    """The steps a method's run took: 'T' (ScaleBiO), 'R + T' (DoReMi's reference and proxy),
    'N × S' (a swarm of N proxies of S steps)."""
    cfg = read_run_config(run_dir)
    if cfg.method == "swarm":
        return f"{n} × {cfg.swarm.steps or cfg.steps}"
    if cfg.method == "doremi":
        return f"{cfg.doremi.ref_steps or cfg.steps} + {cfg.steps}"
    return str(cfg.steps)


def hyperparameters(run_dir: Path) -> str:
    """What a method's run got, from its config.yaml (the swarm's proxies and DoReMi's models
    take lr_w, the batch and the schedule; ScaleBiO also u's and λ's settings and α)."""
    cfg = read_run_config(run_dir)
    b = cfg.bilevel
    common = f"{cfg.model}, batch {cfg.batch_size}, lr_w {b.lr_w:g}, {b.schedule} schedule"
    if cfg.method == "swarm":
        sc = cfg.swarm
        pairs = sc.regressor == "log-linear" and sc.pairs
        fit = sc.regressor + (" with pair terms" if pairs else "")
        return (
            f"swarm: proxies of {sc.steps or cfg.steps} steps each, {common}; {fit}, "
            f"Dirichlet concentration {sc.concentration:g}, "
            + ("no KL bound" if sc.kl_max is None else f"KL to natural ≤ {sc.kl_max:g}")
        )
    if cfg.method == "doremi":
        d = cfg.doremi
        return (
            f"DoReMi: {d.ref_steps or cfg.steps} reference + {cfg.steps} proxy steps, {common}; "
            f"eta {d.eta:g}, smoothing {d.smoothing:g}"
        )
    return (
        f"ScaleBiO: {cfg.steps} steps, {common}, validation batch {cfg.val_batch_size}; "
        f"lr_u {b.lr_u:g}, lr_lam {b.lr_lam:g} ({b.lam_optimizer}), alpha {b.alpha:g}"
    )


def budgets(rows: list[dict]) -> list[str]:
    """What each method got on each problem (`hyperparameters` of its first seed's run), as
    markdown bullet lines."""
    out = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        seen = {}
        for r in rows:
            if r["problem"] == problem and r["method"] != "uniform":
                seen.setdefault(r["method"], r["run_dir"])
        parts = [hyperparameters(d) for d in seen.values()]
        out.append(f"- {problem}: " + "; ".join(parts) + "; uniform: nothing.")
    return out


# ---------------------------------------------------------------- quality


def finetune(
    problem: dict, run_dir: Path, weights: dict, seed: int, label: str, preset: str, spec: dict
) -> dict:
    """Fine-tune a fresh model on `spec["finetune"]["n"]` examples of the corpus resampled by
    `weights` (the sources of `run_dir`, a run on it), for the token budget; eval.json's result.
    Kept in <runs>/compute_sft_<corpus>_<preset>/<label>_seed<seed>, read back only when its
    key.json (everything that made it) matches."""
    ft = spec["finetune"]
    corpus = {k: v for k, v in problem["run"].items() if k == "corpus_args"}  # the sources only
    cfg = preset_config(problem["config"], preset, **{**corpus, **ft["sft"], "seed": seed})
    key = {
        "sources": read_run_config(run_dir).corpus_args,
        "weights": weights,
        "n": ft["n"],
        "token_budget": ft["token_budget"],
        "seed": seed,
        "config": {k: v for k, v in cfg.to_dict().items() if k not in RESUME_IGNORED},
        "data": data_files(cfg),
    }
    out = runs_root() / f"compute_sft_{problem['config']}_{preset}" / f"{label}_seed{seed}"
    key_file = out / "key.json"
    if (out / EVAL).exists() and key_file.exists() and json.loads(key_file.read_text()) == key:
        return json.loads((out / EVAL).read_text())
    if out.exists():
        shutil.rmtree(out)  # an unfinished or outdated fine-tuning: regenerable
    data = resample_run(run_dir, ft["n"], out / "data" / "train.jsonl", seed=seed, weights=weights)
    result = sft(cfg, data, out, token_budget=ft["token_budget"], progress=False)
    files.write_json(key_file, key)
    return result


def quality(
    problem: dict, run_dir: Path, weights: dict, seed: int, label: str, preset: str, spec: dict
) -> float:
    """Lower is better: ‖p − q‖ on a planted mixture, the held-out target loss after
    fine-tuning on a corpus."""
    if problem["kind"] == "planted":
        q = planted_weights(problem["mixture"])
        names = list(weights)
        return float(planted.distance(np.array([weights[k] for k in names]), q, names)[0])
    return float(finetune(problem, run_dir, weights, seed, label, preset, spec)["target_loss"])


def measure_name(problem: dict) -> str:
    """What `quality` measures on the problem."""
    return "‖p − q‖" if problem["kind"] == "planted" else "held-out target loss"


# ---------------------------------------------------------------- every method, seed, problem


def products(problem: dict, seed: int, preset: str, spec: dict) -> list[dict]:
    """Each method's product on a problem at a seed: (method, N, the run it comes from, its
    weights, its cumulative cost, the product along the run where there is one)."""
    out = []
    for method in spec["methods"]:
        if method == "uniform":
            continue
        run_dir = method_run(problem, method, seed, preset, spec)
        if method == "swarm":
            for n in sorted(spec["swarm_runs"]):
                w, cost = swarm_at(run_dir, n)
                out.append({"method": "swarm", "n": n, "run_dir": run_dir, "weights": w, **cost,
                            "steps": budget_text(run_dir, n)})  # fmt: skip
            continue
        cost = scalebio_cost(run_dir) if method == "scalebio" else doremi_cost(run_dir)
        w = json.loads((run_dir / runs.WEIGHTS).read_text())
        row = {"method": method, "n": None, "run_dir": run_dir, "weights": w, **cost,
               "steps": budget_text(run_dir)}  # fmt: skip
        if problem["kind"] == "planted":  # the product after each step, against its cost
            row["curve"] = planted.product_curve(run_dir)
        out.append(row)
    if "uniform" in spec["methods"]:
        names = list(out[0]["weights"]) if out else []
        zero = _cost([0.0], [0.0], [0.0])
        w = dict.fromkeys(names, 1.0 / len(names))
        out.append({"method": "uniform", "n": None, "run_dir": out[0]["run_dir"], "weights": w,
                    **zero, "steps": "–"})  # fmt: skip
    return out


def run_all(preset: str, spec: dict | None = None, progress: bool = True) -> list[dict]:
    """Every method at every problem and seed of `spec` (default: the preset's): one row per
    (problem, method, N, seed) with its weights, compute (forward–backward and forward-only
    tokens, their sum `compute`, seconds) and quality; ScaleBiO's and DoReMi's rows on a planted
    mixture also hold the distance of their product after each step against cumulative
    compute (`along`)."""
    spec = spec or settings(preset)
    jobs = [(p, seed) for p in problems(spec) for seed in spec["seeds"]]
    rows = []
    for problem, seed in tqdm(jobs, desc="quality per compute", disable=not progress):
        for prod in products(problem, seed, preset, spec):
            label = prod["method"] + (str(prod["n"]) if prod["n"] else "")
            q = quality(problem, prod["run_dir"], prod["weights"], seed, label, preset, spec)
            row = {
                "problem": problem["name"],
                "kind": problem["kind"],
                "measure": measure_name(problem),
                "method": prod["method"],
                "n": prod["n"],
                "seed": seed,
                "run_dir": prod["run_dir"],
                "weights": prod["weights"],
                "steps": prod["steps"],
                **{k: float(prod[k][-1]) for k in ("fb_tokens", "fo_tokens", "compute", "seconds")},
                "quality": q,
            }
            if "curve" in prod:
                c = prod["curve"]
                q_planted = planted_weights(problem["mixture"])
                row["along"] = {
                    "compute": prod["compute"],
                    "quality": planted.distance(c["weights"], q_planted, c["names"]),
                }
            rows.append(row)
    return rows


# ---------------------------------------------------------------- summary, table, reading


def label(method: str, n: int | None) -> str:
    """'ScaleBiO', 'swarm N=16', 'DoReMi', 'uniform'."""
    names = {"scalebio": "ScaleBiO", "doremi": "DoReMi"}
    return f"swarm N={n}" if method == "swarm" else names.get(method, method)


def summarize(rows: list[dict]) -> list[dict[str, Any]]:
    """Per (problem, method, N): the mean over seeds of the compute and seconds, and the mean and
    standard deviation (ddof 1) of the quality."""
    out = []
    for problem, method, n in dict.fromkeys((r["problem"], r["method"], r["n"]) for r in rows):
        sel = [r for r in rows if (r["problem"], r["method"], r["n"]) == (problem, method, n)]
        q = np.array([r["quality"] for r in sel])
        mean = {k: float(np.mean([r[k] for r in sel])) for k in ("fb_tokens", "fo_tokens")}
        out.append(
            {
                "problem": problem,
                "measure": sel[0]["measure"],
                "method": method,
                "n": n,
                "steps": sel[0]["steps"],
                "seeds": len(sel),
                **mean,
                "compute": float(np.mean([r["compute"] for r in sel])),
                "seconds": float(np.mean([r["seconds"] for r in sel])),
                "quality_mean": float(q.mean()),
                "quality_std": float(q.std(ddof=1)) if len(sel) > 1 else 0.0,
            }
        )
    return out


def tokens_text(x: float) -> str:
    """1234567 → '1.23M', 45600 → '45.6k', 0 → '0'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.0f}"


def format_table(summary: list[dict]) -> str:
    """The summary as a markdown table: compute means over seeds, quality mean ± std."""
    lines = [
        "| problem (quality, lower is better) | method | steps | fwd–bwd tokens | fwd-only tokens "
        "| compute | seconds | quality (mean ± std) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['problem']} ({s['measure']}) | {label(s['method'], s['n'])} | {s['steps']} | "
            f"{tokens_text(s['fb_tokens'])} | {tokens_text(s['fo_tokens'])} | "
            f"{tokens_text(s['compute'])} | {s['seconds']:.1f} | "
            f"{s['quality_mean']:.4f} ± {s['quality_std']:.4f} |"
        )
    return "\n".join(lines)


def reading(summary: list[dict], rows: list[dict] | None = None) -> list[str]:
    """One line per problem, from the numbers: each method's quality at its compute, where the
    swarm first reaches ScaleBiO's and uniform's mean quality (or that it does not), the lowest;
    with `rows`, on a planted mixture, the compute at which ScaleBiO's p along its run (mean
    over seeds) first comes as close as the best swarm ends."""
    out = []
    for problem in dict.fromkeys(s["problem"] for s in summary):
        by = {label(s["method"], s["n"]): s for s in summary if s["problem"] == problem}
        swarm = [s for s in by.values() if s["method"] == "swarm"]
        parts = []
        for name, s in by.items():
            cost = f"{tokens_text(s['compute'])} tokens" if s["compute"] else "no compute"
            parts.append(f"{name} {s['quality_mean']:.3f} ± {s['quality_std']:.3f} ({cost})")
        text = f"{problem} ({by[next(iter(by))]['measure']}): " + ", ".join(parts)
        for other in ("ScaleBiO", "uniform"):
            if other in by and swarm:
                text += "; " + _swarm_reaches(swarm, by[other], other, by.get("ScaleBiO"))
        if swarm and rows and "ScaleBiO" in by:
            text += _along_text(rows, problem, min(s["quality_mean"] for s in swarm))
        best = min(by, key=lambda k: by[k]["quality_mean"])
        out.append(text + f"; lowest: {best}")
    return out


def _swarm_reaches(swarm: list[dict], other: dict, name: str, sb: dict | None) -> str:
    """Where the swarm's curve first reaches `other`'s mean quality (compute relative to
    ScaleBiO's where there is one)."""

    def ratio(s: dict) -> str:
        return f" ({s['compute'] / sb['compute']:.2g}× ScaleBiO's compute)" if sb else ""

    first = next((s for s in swarm if s["quality_mean"] <= other["quality_mean"]), None)
    if first is None:
        return f"no swarm up to N={swarm[-1]['n']}{ratio(swarm[-1])} reaches {name}'s mean"
    return f"the swarm reaches {name}'s mean from N={first['n']}{ratio(first)}"


def _along_text(rows: list[dict], problem: str, target: float) -> str:
    """'; ScaleBiO's p along its run is as close as the best swarm from X tokens (r of its
    run)' on a planted mixture, or ''."""
    along = [
        r["along"]
        for r in rows
        if r["problem"] == problem and r["method"] == "scalebio" and "along" in r
    ]
    if not along:
        return ""
    k = min(len(a["compute"]) for a in along)
    x = np.mean([a["compute"][:k] for a in along], axis=0)
    y = np.mean([a["quality"][:k] for a in along], axis=0)
    hit = np.flatnonzero(y <= target)
    if not len(hit):
        return ""
    at = x[hit[0]]
    return (
        f"; ScaleBiO's p along its run is as close as the best swarm from "
        f"{tokens_text(at)} tokens ({at / x[-1]:.0%} of its run)"
    )


# ---------------------------------------------------------------- the figure

COLORS = {"scalebio": "tab:blue", "swarm": "tab:green", "doremi": "tab:orange"}


def plot(summary: list[dict], rows: list[dict]) -> Any:
    """Quality against compute (log scale), one panel per problem: the swarm as a curve over N,
    ScaleBiO and DoReMi as points, error bars ± std over seeds; uniform (no compute) as a
    dashed level; on a planted mixture, ScaleBiO's and DoReMi's product along their runs
    (mean over seeds) as thin lines."""
    import matplotlib.pyplot as plt  # the figure only: the benchmark prints a table
    from matplotlib import ticker  # likewise

    names = list(dict.fromkeys(s["problem"] for s in summary))
    fig, axes = plt.subplots(1, len(names), figsize=(5.6 * len(names), 4.4), squeeze=False)
    for ax, problem in zip(axes[0], names):
        sel = [s for s in summary if s["problem"] == problem]
        for method in ("scalebio", "doremi"):
            along = [r["along"] for r in rows if r["problem"] == problem
                     and r["method"] == method and "along" in r]  # fmt: skip
            if along:
                k = min(len(a["compute"]) for a in along)
                x = np.mean([a["compute"][:k] for a in along], axis=0)
                y = np.mean([a["quality"][:k] for a in along], axis=0)
                ax.plot(x, y, color=COLORS[method], lw=1, alpha=0.45,
                        label=f"{label(method, None)}'s p along its run")  # fmt: skip
        swarm = [s for s in sel if s["method"] == "swarm"]
        if swarm:
            ax.errorbar([s["compute"] for s in swarm], [s["quality_mean"] for s in swarm],
                        yerr=[s["quality_std"] for s in swarm], color=COLORS["swarm"], marker="s",
                        ms=6, lw=1.8, capsize=3, label="swarm (over N)")  # fmt: skip
            for s in swarm:
                at = (s["compute"], s["quality_mean"])
                ax.annotate(f"N={s['n']}", at, xytext=(4, 6), textcoords="offset points",
                            fontsize=8, color=COLORS["swarm"])  # fmt: skip
        for s in sel:
            if s["method"] in ("scalebio", "doremi"):
                ax.errorbar([s["compute"]], [s["quality_mean"]], yerr=[s["quality_std"]],
                            color=COLORS[s["method"]], marker="o", ms=9, capsize=4, lw=0,
                            elinewidth=1.8, label=label(s["method"], None))  # fmt: skip
            elif s["method"] == "uniform":
                ax.axhline(s["quality_mean"], color="tab:gray", ls="--", lw=1.5,
                           label="uniform (no compute)")  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: tokens_text(x)))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set(xlabel="compute: forward–backward tokens (+ ⅓ forward-only)",
               ylabel=sel[0]["measure"] + " (lower is better)", title=problem)  # fmt: skip
        ax.legend(loc="best")
    fig.tight_layout()
    return fig


def result_sentence(summary: list[dict]) -> str:
    """The reading in a short sentence (means over seeds; the best swarm over N; `reading`
    has every N, the spreads and where the curves cross)."""
    parts = []
    for problem in dict.fromkeys(s["problem"] for s in summary):
        sel = [s for s in summary if s["problem"] == problem]
        swarm = [s for s in sel if s["method"] == "swarm"]
        shown = [s for s in sel if s["method"] != "swarm"]
        if swarm:
            shown.insert(1, min(swarm, key=lambda s: s["quality_mean"]))
        ends = ", ".join(
            f"{label(s['method'], s['n'])} {s['quality_mean']:.3f}"
            + (f" ({tokens_text(s['compute'])})" if s["compute"] else "")
            for s in shown
        )
        parts.append(f"{problem}, {sel[0]['measure']}: {ends}")
    return "Mean over seeds, lower is better (compute in tokens): " + "; ".join(parts)
