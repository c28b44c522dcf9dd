"""How far the weights move by chance: the null band of a run (`null_band: halves`).

Each training source is split at random into two halves of equal size, and the run treats the
halves as sources of their own. The two halves of one source hold the same kind of data, so
any difference between their weights is chance: the noise of the sampled batches acting on λ
over the whole run. A source's weight is the sum of its halves' weights (weights.json holds
those sums, one per source), and the run measures the noise on its own data at no extra cost
(the batch must hold every half: batch_size >= 2 K with the balanced sampler).

The band. If the sources had nothing to tell apart, each half's weight would end at
1/(2K) plus noise e, and a source's weight at 1/K + e₁ + e₂. The halves' difference
d_s = e₁ − e₂ has the same spread as e₁ + e₂ (the simplex's constraint makes it slightly
wider, so the band errs wide). With s = sqrt(mean_s d_s²) over the K sources, the band is
1/K ± t·s, t the two-sided 95 % quantile of Student's t with K degrees of freedom (few sources
give a wide band). A source above the band holds more weight than chance gives; below, less;
inside, it cannot be told from the others by this run.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError
from ..sources.data import TokenizedData

HALVES = ("#1", "#2")
NULL_BANDS = ("auto", "halves", "off")
NULL_BAND = "null_band.json"


def t95(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t as student_t  # here: scipy.stats takes most of a second to import

    return float(student_t.ppf(0.975, df))


def wanted(cfg: Any) -> bool:
    """Whether a run splits its sources into halves: `null_band: halves`, or `auto` for a
    ScaleBiO run on the user's data (data_dir or sources), where nobody knows the answer."""
    if cfg.method != "scalebio" or cfg.null_band == "off":
        return False
    return cfg.null_band == "halves" or bool(cfg.data_dir or cfg.sources)


def infeasible(cfg: Any, counts: dict[str, int]) -> str | None:
    """Why the halves cannot run (None: they can): a source under 4 samples, a balanced batch
    that cannot hold every half."""
    k = len(counts)
    small = [n for n, c in counts.items() if c < 4]
    if k < 2:
        return "one source has no band to measure (its weight is 1)"
    if small:
        return f"the halves need 2 samples each and {', '.join(small)} hold fewer than 4"
    if cfg.sampler == "balanced" and cfg.batch_size < 2 * k:
        return (
            f"balanced batches hold every half: batch_size {cfg.batch_size} < 2 × {k} sources; "
            f"set batch_size={2 * k} or more"
        )
    return None


def split(data: TokenizedData, seed: int) -> TokenizedData:
    """`data` with each source split at random into halves `<name>#1` and `<name>#2` (sizes
    differing by at most one); the samples and their order are unchanged."""
    names = [f"{n}{h}" for n in data.names for h in HALVES]
    clash = sorted(set(names) & set(data.names))
    if clash:
        raise ConfigError(
            f"sources named {clash} clash with the halves of the null band: rename those files, "
            "or set null_band=off."
        )
    ids = data.source_ids.clone()
    g = torch.Generator().manual_seed(seed + 104729)
    for s in range(len(data.names)):
        idx = (data.source_ids == s).nonzero().flatten()
        order = idx[torch.randperm(len(idx), generator=g)]
        ids[order[: len(idx) // 2]] = 2 * s
        ids[order[len(idx) // 2 :]] = 2 * s + 1
    return TokenizedData(tuple(names), data.input_ids, data.labels, ids, data.dropped)


def source_of(name: str) -> str:
    return name[: -len(HALVES[0])]


def combine(values: dict[str, float], how: str = "sum") -> dict[str, float]:
    """Per source from per half: the sum (weights) or the mean (mean losses)."""
    out: dict[str, float] = {}
    for name, v in values.items():
        out[source_of(name)] = out.get(source_of(name), 0.0) + v
    return out if how == "sum" else {k: v / len(HALVES) for k, v in out.items()}


def combine_row(row: dict) -> dict:
    """A trajectory row of the halves as a row of the sources: p summed, losses averaged."""
    out = dict(row)
    out["p"] = combine(row["p"])
    for key in ("loss_w", "loss_u"):
        if isinstance(row.get(key), dict):
            out[key] = combine(row[key], "mean")
    return out


def is_split(names: Any) -> bool:
    names = list(names)
    return (
        bool(names)
        and len(names) % 2 == 0
        and all(
            a == f"{source_of(a)}{HALVES[0]}" and b == f"{source_of(a)}{HALVES[1]}"
            for a, b in zip(names[::2], names[1::2])
        )
    )


def band(halves: dict[str, float]) -> dict[str, Any]:
    """The null band of final half weights (module docstring): per source its weight, its
    halves, the band and where the weight lies; `summary` says it in words."""
    weights = combine(halves)
    k = len(weights)
    diffs = {n: halves[f"{n}{HALVES[0]}"] - halves[f"{n}{HALVES[1]}"] for n in weights}
    spread = math.sqrt(sum(d * d for d in diffs.values()) / k)
    t = t95(k)
    centre = 1.0 / k
    low, high = max(0.0, centre - t * spread), min(1.0, centre + t * spread)
    sources = {}
    for n, w in weights.items():
        where = "above" if w > high else "below" if w < low else "inside"
        sources[n] = {
            "weight": w,
            "halves": [halves[f"{n}{h}"] for h in HALVES],
            "where": where,
        }
    groups = {g: [n for n, v in sources.items() if v["where"] == g] for g in ("above", "below")}
    head = (
        f"null band {centre:.3f} ± {t * spread:.3f} (1/K ± t·s, s from the two random halves "
        f"of each of the {k} sources)"
    )
    if not groups["above"] and not groups["below"]:
        summary = f"{head}: no source differs from the others beyond chance (all inside)"
    else:
        parts = [f"{g}: {', '.join(ns)}" for g, ns in groups.items() if ns]
        inside = [n for n, v in sources.items() if v["where"] == "inside"]
        if inside:
            parts.append(f"inside: {', '.join(inside)}")
        summary = f"{head}; " + "; ".join(parts)
    return {
        "centre": centre,
        "low": low,
        "high": high,
        "spread": spread,
        "t": t,
        "sources": sources,
        "summary": summary,
    }
