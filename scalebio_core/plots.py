"""Figures: one style, titles that say what is shown, labelled axes, one helper that saves.

Functions draw on a given matplotlib Axes and return it; `save_figure` writes `figures/NAME.png`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

if os.environ.get("MPLBACKEND") is None and not os.environ.get("DISPLAY"):
    try:  # in a notebook the inline backend is already chosen; elsewhere draw off-screen
        import IPython  # lazy: optional, and only to choose the backend before pyplot loads

        if IPython.get_ipython() is None:
            matplotlib.use("Agg")
    except ImportError:  # pragma: no cover
        matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 120,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
}
plt.rcParams.update(STYLE)


def figures_dir() -> Path:
    """`$SCALEBIO_FIGURES` if set, else `figures/` at the repository root (found upwards)."""
    env = os.environ.get("SCALEBIO_FIGURES")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").exists() and (d / "scalebio_core").is_dir():
            return d / "figures"
    return here / "figures"


def save_figure(fig: plt.Figure, name: str) -> Path:
    """Save `fig` as `<figures_dir>/<name>.png` (tight layout) and return the path."""
    out = figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    return path


def colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_weights(
    ax: plt.Axes,
    p: np.ndarray,
    names: Sequence[str],
    p_star: np.ndarray | None = None,
    steps: np.ndarray | None = None,
    title: str = "Source weights p during training",
) -> plt.Axes:
    """Weight of each source against steps; dashed lines at the exact optimum when given."""
    p = np.asarray(p)
    x = np.arange(len(p)) if steps is None else np.asarray(steps)
    for i, (name, c) in enumerate(zip(names, colors(len(names)))):
        ax.plot(x, p[:, i], color=c, label=name)
        if p_star is not None:
            ax.axhline(p_star[i], color=c, ls="--", lw=1)
    ax.set(xlabel="step", ylabel="weight p_s", title=title, ylim=(0, None))
    ax.legend(loc="best")
    return ax


def plot_loglog(
    ax: plt.Axes,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    xlabel: str,
    ylabel: str,
    title: str,
    slopes: Mapping[str, float] | None = None,
) -> plt.Axes:
    """Several positive curves on log-log axes; a label may carry a fitted slope."""
    for (label, (x, y)), c in zip(curves.items(), colors(len(curves))):
        x, y = np.asarray(x, float), np.asarray(y, float)
        keep = (x > 0) & (y > 0)
        extra = f" (slope {slopes[label]:.2f})" if slopes and label in slopes else ""
        ax.loglog(
            x[keep], y[keep], "-o" if keep.sum() < 20 else "-", ms=4, color=c, label=label + extra
        )
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(loc="best")
    return ax


def plot_weight_bars(
    ax: plt.Axes,
    weights: Mapping[str, float],
    reference: Mapping[str, float] | None = None,
    title: str = "Learned source weights",
    ref_label: str = "exact",
) -> plt.Axes:
    """Bar chart of weights by source, with optional reference markers."""
    names = list(weights)
    x = np.arange(len(names))
    ax.bar(x, [weights[n] for n in names], color=colors(len(names)), label="learned")
    if reference is not None:
        ax.scatter(
            x,
            [reference[n] for n in names],
            color="k",
            marker="_",
            s=400,
            zorder=3,
            label=ref_label,
        )
        ax.legend(loc="best")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="weight p_s", title=title, ylim=(0, 1))
    return ax


def fig_to_png(fig: plt.Figure) -> bytes:
    """Render a figure to PNG bytes and close it (for ipywidgets.Image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_run_step(traj: Mapping, step_index: int, title: str = "") -> plt.Figure:
    """Weights at one step (bars) beside the loss curves up to that step (a run's trajectory)."""
    names, p = traj["names"], np.asarray(traj["p"])
    steps = np.asarray(traj["step"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    plot_weight_bars(
        ax1,
        dict(zip(names, p[step_index])),
        title=f"{title}weights p at step {int(steps[step_index])}",
    )
    ax1.axhline(1 / len(names), color="gray", ls=":", lw=1, label="uniform")
    ax1.set_ylim(0, max(0.5, float(p.max()) * 1.1))
    for key, label in (("L1", "L1 (validation, w)"), ("L2_w", "L2(w)"), ("L2_u", "L2(u)")):
        ax2.plot(steps, traj[key], lw=1, alpha=0.35, color="gray" if key != "L1" else "C0")
        ax2.plot(steps[: step_index + 1], np.asarray(traj[key])[: step_index + 1], label=label)
    ax2.axvline(steps[step_index], color="k", lw=0.8)
    ax2.set(xlabel="step", ylabel="loss (nats / response token)", title="losses")
    ax2.legend(loc="upper right")
    return fig


def plot_weight_trajectories(
    ax: plt.Axes, runs: Mapping[str, Mapping], title: str = "Weight trajectories of several runs"
) -> plt.Axes:
    """Overlay p against steps for several runs: one colour per source, one line style per run."""
    styles = ["-", "--", ":", "-."]
    all_names = sorted({n for t in runs.values() for n in t["names"]})
    col = dict(zip(all_names, colors(len(all_names))))
    for (label, t), ls in zip(runs.items(), styles * 10):
        for i, n in enumerate(t["names"]):
            ax.plot(t["step"], np.asarray(t["p"])[:, i], ls, color=col[n], label=f"{n} ({label})")
    ax.set(xlabel="step", ylabel="weight p_s", title=title)
    ax.legend(loc="best", ncol=2)
    return ax


def noise_rate(name: str) -> float:
    """The corruption rate in a source name such as 'noise_0.4'."""
    return float(name.rsplit("_", 1)[-1])


def plot_noise_weights(
    ax: plt.Axes, weights: Mapping[str, float], title: str = "Learned weight against noise rate"
) -> plt.Axes:
    """Final weight of each noisy source against its corruption rate (log scale)."""
    names = sorted(weights, key=noise_rate)
    x = [noise_rate(n) for n in names]
    y = [weights[n] for n in names]
    ax.semilogy(x, y, "o-", color="C3", label="learned weight")
    ax.axhline(1 / len(names), color="gray", ls=":", label="uniform")
    ax.set(
        xlabel="fraction of corrupted outputs in the source", ylabel="weight p_s (log)", title=title
    )
    ax.legend(loc="best")
    return ax


def plot_lisa_raster(
    ax: plt.Axes,
    rows: Sequence[Mapping],
    n_blocks: int,
    title: str = "Which decoder blocks train when",
) -> plt.Axes:
    """Raster of the active LISA blocks of w (blue) and u (orange) at each step of a trajectory."""
    steps = [r["step"] for r in rows]
    grid = np.zeros((n_blocks, len(rows), 3)) + 1.0
    for j, r in enumerate(rows):
        for b in r.get("lisa_w") or []:
            grid[b, j] = (0.12, 0.47, 0.71)
        for b in r.get("lisa_u") or []:
            grid[b, j] = (1.0, 0.5, 0.05) if b not in (r.get("lisa_w") or []) else (0.3, 0.3, 0.3)
    ax.imshow(
        grid,
        aspect="auto",
        interpolation="nearest",
        origin="lower",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, n_blocks - 0.5),
    )
    ax.set(xlabel="step", ylabel="decoder block", title=title)
    ax.legend(
        handles=[
            Patch(color=(0.12, 0.47, 0.71), label="w only"),
            Patch(color=(1.0, 0.5, 0.05), label="u only"),
            Patch(color=(0.3, 0.3, 0.3), label="both"),
        ],
        loc="upper right",
    )
    return ax


def plot_memory_vs_size(
    ax: plt.Axes,
    sizes: Mapping[str, float],
    per_mode: Mapping[str, Sequence[float]],
    gpu_lines=(48, 80),
    title: str = "Predicted memory per GPU",
) -> plt.Axes:
    """Per-GPU GiB against model size (parameters) for several training modes."""
    x = np.array(list(sizes.values()))
    for (mode, ys), c in zip(per_mode.items(), colors(len(per_mode))):
        ax.loglog(x, ys, "o-", color=c, label=mode)
    for g in gpu_lines:
        ax.axhline(g, color="gray", ls=":", lw=1)
        ax.text(x[0], g * 1.05, f"{g} GiB per GPU", color="gray", fontsize=8)
    for name, v in sizes.items():
        ax.annotate(
            name.split("/")[-1],
            (v, ax.get_ylim()[0]),
            fontsize=7,
            rotation=90,
            xytext=(2, 4),
            textcoords="offset points",
        )
    ax.set(xlabel="parameters", ylabel="GiB per GPU", title=title)
    ax.legend(loc="center left")  # clear of the curves (right) and the model names (bottom)
    return ax


def plot_method_weights(
    ax: plt.Axes, weights: Mapping[str, Mapping[str, float]], title: str = ""
) -> plt.Axes:
    """Grouped bars: for each source, the weight each method gives it (the validation-only
    method's mass on the validation set is drawn as its own group)."""
    methods = list(weights)
    sources = list(dict.fromkeys(s for w in weights.values() for s in w))
    x = np.arange(len(sources))
    width = 0.8 / max(1, len(methods))
    for i, (m, c) in enumerate(zip(methods, colors(len(methods)))):
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width,
            [weights[m].get(s, 0.0) for s in sources],
            width,
            color=c,
            label=m,
        )
    ax.set_xticks(x, sources, rotation=30, ha="right")
    ax.set(ylabel="weight p_s", title=title, ylim=(0, 1))
    ax.legend(loc="best", fontsize=8)
    return ax


def plot_method_losses(
    ax: plt.Axes, summary: Sequence[Mapping], title: str = "", key: str = "loss"
) -> plt.Axes:
    """Mean ± standard deviation over seeds of `key` ("loss" or "acc") for each method."""
    methods = [r["method"] for r in summary]
    mean = [r[f"{key}_mean"] for r in summary]
    std = [r[f"{key}_std"] for r in summary]
    x = np.arange(len(methods))
    ax.bar(x, mean, yerr=std, capsize=4, color=colors(len(methods)))
    lo, hi = min(m - s for m, s in zip(mean, std)), max(m + s for m, s in zip(mean, std))
    pad = 0.15 * (hi - lo) + 1e-3
    ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_xticks(x, methods, rotation=30, ha="right")
    label = "target loss (held out)" if key == "loss" else "exact-match accuracy"
    ax.set(ylabel=label, title=title)
    return ax


METHOD_COLORS = {"scalebio": "tab:blue", "doremi": "tab:orange", "uniform": "tab:gray"}


def plot_planted_distance(
    ax: plt.Axes, rows: Sequence[Mapping], x: str = "steps", tolerance: float | None = None,
    title: str = "",
) -> plt.Axes:  # fmt: skip
    """‖p − p_planted‖ of each method against `x` ("steps" or "seconds"): one faint line per
    seed, the mean over seeds in full (against seconds, at each step's mean time); uniform is a
    dashed level from zero cost; a dotted line at `tolerance`."""
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        c = METHOD_COLORS.get(method, "tab:purple")
        if method == "uniform":
            ax.axhline(sel[0]["distance"][0], color=c, ls="--", lw=1.5, label="uniform")
            continue
        for r in sel:
            ax.plot(r[x], r["distance"], color=c, alpha=0.25, lw=0.8)
        n = min(len(r["distance"]) for r in sel)
        mean_x = np.mean([r[x][:n] for r in sel], axis=0)
        ax.plot(mean_x, np.mean([r["distance"][:n] for r in sel], axis=0), color=c, lw=2,
                label=f"{method} (mean of {len(sel)})")  # fmt: skip
    if tolerance is not None:
        ax.axhline(tolerance, color="black", ls=":", lw=1, label=f"within {tolerance:g}")
    xlabel = "step" if x == "steps" else "seconds of training (2 CPU cores)"
    ax.set(xlabel=xlabel, ylabel="‖p − p_planted‖", title=title, ylim=(0, None))
    ax.legend(loc="center right")  # clear of the curves: near 0 (right) and up at uniform
    return ax


def plot_planted_weights(ax: plt.Axes, rows: Sequence[Mapping], title: str = "") -> plt.Axes:
    """Final weight of each source by method (dots: mean over seeds, bars: min to max), with the
    planted weights as black bars."""
    names = list(rows[0]["final"])
    planted = rows[0]["planted"]
    x = np.arange(len(names))
    ax.bar(x, [planted[n] for n in names], width=0.7, color="none", edgecolor="black",
           label="planted")  # fmt: skip
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        w = np.array([[r["final"][n] for n in names] for r in rows if r["method"] == method])
        dx = (i - (len(methods) - 1) / 2) * 0.2
        mean = w.mean(axis=0)
        err = np.vstack([mean - w.min(axis=0), w.max(axis=0) - mean])
        ax.errorbar(x + dx, mean, yerr=err, fmt="o", ms=6, capsize=3, label=method,
                    color=METHOD_COLORS.get(method, "tab:purple"))  # fmt: skip
    ax.set_xticks(x, names)
    ax.set(ylabel="final weight p_s", title=title, ylim=(0, 1))
    ax.legend(loc="upper right")
    return ax
