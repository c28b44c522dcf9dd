"""Figures: one style, titles that say what is shown, labelled axes, one helper that saves.

Functions draw on a given matplotlib Axes and return it; `save_figure` writes `NAME.png` in
`figures_dir()` (`build/figures/`; `make reproduce`: the committed `figures/`).
The figures of the notebooks (`plot_tour`, `plot_toy_runs`, …, at the end) make their own Figure
from what a notebook computed and return it, so that a notebook's figure cell is one call.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

from ..sources.corpora import noise_rate  # noqa: E402
from .paths import project_dir  # noqa: E402

if TYPE_CHECKING:  # annotations only: the figures of notebook 01 take its runs
    from ..core.toy_runs import BiasSweep, ToyRun

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
    """`$SCALEBIO_FIGURES` if set, else `build/figures/` at the repository root: a notebook run
    from JupyterLab leaves the committed `figures/` alone; only `make reproduce` writes there
    (it sets `$SCALEBIO_FIGURES`)."""
    return project_dir("SCALEBIO_FIGURES", "build", "figures")


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
    legend_loc: str = "best",
) -> plt.Axes:
    """Weight of each source against steps; dashed lines at the exact optimum when given."""
    p = np.asarray(p)
    x = np.arange(len(p)) if steps is None else np.asarray(steps)
    for i, (name, c) in enumerate(zip(names, colors(len(names)))):
        ax.plot(x, p[:, i], color=c, label=name)
        if p_star is not None:
            ax.axhline(p_star[i], color=c, ls="--", lw=1)
    ax.set(xlabel="step", ylabel="weight $p_s$", title=title, ylim=(0, None))
    ax.legend(loc=legend_loc)
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


def simplex_xy(p: np.ndarray) -> np.ndarray:
    """Points of the 3-simplex (rows p1, p2, p3) in the plane: an equilateral triangle with the
    three sources at its corners (1, 0, 0) → (0, 0), (0, 1, 0) → (1, 0), (0, 0, 1) → (½, √3/2)."""
    p = np.atleast_2d(np.asarray(p, float))
    return np.stack([p[:, 1] + 0.5 * p[:, 2], p[:, 2] * np.sqrt(3) / 2], axis=1)


def simplex_grid(n: int) -> np.ndarray:
    """All points (i, j, n − i − j)/n of the 3-simplex, boundary included (rows)."""
    return np.array([(i, j, n - i - j) for i in range(n + 1) for j in range(n + 1 - i)]) / n


def plot_simplex(
    ax: plt.Axes,
    grid: np.ndarray,
    values: np.ndarray,
    names: Sequence[str],
    title: str,
    levels: int = 14,
) -> plt.Axes:
    """Filled contours of a function on the 3-simplex (values at `simplex_grid` points; log
    spaced above its minimum, so the basin shows), its outline and the corner labels."""
    xy = simplex_xy(grid)
    v = np.asarray(values, float)
    span = v - v.min()
    lv = np.log10(span + 1e-3 * span.max() + 1e-12)
    ax.tricontourf(xy[:, 0], xy[:, 1], lv, levels=levels, cmap="viridis_r", alpha=0.85)
    ax.tricontour(xy[:, 0], xy[:, 1], lv, levels=levels, colors="w", linewidths=0.4, alpha=0.6)
    corners = simplex_xy(np.eye(3))
    ax.plot(*np.vstack([corners, corners[:1]]).T, color="k", lw=1)
    for (x, y), name, (dx, dy, ha) in zip(
        corners, names, ((0, -0.05, "center"), (0, -0.05, "center"), (0.04, 0, "left"))
    ):
        ax.text(x + dx, y + dy, name, ha=ha, va="center", fontsize=9)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(title)
    return ax


def plot_weight_bars(
    ax: plt.Axes,
    weights: Mapping[str, float],
    reference: Mapping[str, float] | None = None,
    title: str = "Learned source weights",
    ref_label: str = "exact",
    label: str = "learned",
) -> plt.Axes:
    """Bar chart of weights by source (one colour, named `label` in the legend), with optional
    reference markers drawn over the bars; the legend sits above the data, over weight 1."""
    names = list(weights)
    x = np.arange(len(names))
    ax.bar(x, [weights[n] for n in names], color="C0", label=label)
    if reference is not None:
        ax.scatter(
            x,
            [reference[n] for n in names],
            color="k",
            marker="_",
            s=500,
            linewidths=2.5,
            zorder=3,
            label=ref_label,
        )
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="weight $p_s$", title=title, ylim=(0, 1.15))
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.legend(loc="upper center", ncol=2)
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
    cursor: int | None = None,
) -> plt.Axes:
    """Raster of the active LISA blocks of w (blue) and u (orange) at each step of a trajectory.

    The legend sits under the axes, off the raster; `cursor` marks one step with a line.
    """
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
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=3,
    )
    if cursor is not None:
        ax.axvline(cursor, color="k", lw=1.5)
    return ax


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over `window` points (fewer at the ends), same length as y: it
    does not lag the raw curve, as a trailing average would."""
    y = np.asarray(y, float)
    c = np.cumsum(np.insert(y, 0, 0.0))
    i = np.arange(len(y))
    lo, hi = np.maximum(i - window // 2, 0), np.minimum(i + (window - 1) // 2 + 1, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


def plot_smoothed(
    ax: plt.Axes,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    window: int,
    xlabel: str,
    ylabel: str,
    title: str,
) -> plt.Axes:
    """Per label, the mean over seeds (rows of Y) raw and faint, and its moving average solid.

    `curves` maps a label to (x, Y) with Y of shape seeds × len(x); labels keep their order.
    """
    for (label, (x, ys)), color in zip(curves.items(), colors(len(curves))):
        mean = np.asarray(ys, float).reshape(-1, len(x)).mean(axis=0)
        ax.plot(x, mean, color=color, lw=0.8, alpha=0.3)
        n = np.asarray(ys).reshape(-1, len(x)).shape[0]
        ax.plot(
            x,
            smooth(mean, window),
            color=color,
            lw=2,
            label=f"{label} ({n} seed{'s' if n > 1 else ''})",
        )
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
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
    for i, (name, v) in enumerate(sizes.items()):  # above the highest marker of each model
        top = max(ys[i] for ys in per_mode.values())
        ax.annotate(
            name.split("/")[-1],
            (v, top),
            fontsize=8,
            ha="center",
            xytext=(0, 11),
            textcoords="offset points",
        )
    ax.set_xlim(x.min() / 1.6, x.max() * 1.6)
    ax.set(xlabel="parameters", ylabel="GiB per GPU", title=title)
    ax.legend(loc="lower right")  # under the curves, clear of the names above them
    return ax


def plot_memory_check(
    ax: plt.Axes,
    params: Sequence[float],
    measured: Mapping[str, Sequence[float]],
    predicted: Mapping[str, Sequence[float]],
    title: str = "The memory model against measured peaks",
) -> plt.Axes:
    """MiB against parameters: the prediction of each mode as a line, its measured peaks as
    open markers on it, in the mode's colour (the same order as `plot_memory_vs_size`)."""
    x = np.asarray(params, float)
    for (mode, ys), c in zip(predicted.items(), colors(len(predicted))):
        ax.loglog(x, ys, "-", color=c, lw=1.5, label=f"{mode}: predicted")
        ax.loglog(
            x, measured[mode], "s", color=c, mfc="white", mew=1.5, ms=7, label=f"{mode}: measured"
        )
    ax.set_xlim(x.min() / 1.6, x.max() * 1.6)
    ax.set(xlabel="parameters per model copy", ylabel="MiB (one process)", title=title)
    ax.legend(loc="upper left")
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
    ax: plt.Axes,
    summary: Sequence[Mapping],
    title: str = "",
    key: str = "loss",
    label: str | None = None,
    offset: float = 0.0,
    marker: str = "o",
) -> plt.Axes:
    """Mean ± standard deviation over seeds of `key` ("loss" or "acc") for each method, as dots
    with error bars in the methods' colours: no bars, so an axis that does not start at zero
    cuts nothing off. Call again with another `offset`, `marker` and `label` to draw a second
    protocol beside the first; `label` names the protocol in the legend."""
    methods = [r["method"] for r in summary]
    for i, (r, c) in enumerate(zip(summary, colors(len(methods)))):
        mean, std = r[f"{key}_mean"], r[f"{key}_std"]
        # an accuracy lies in [0, 1]: its bar stops there instead of promising the impossible
        low, high = (min(std, mean), min(std, 1 - mean)) if key == "acc" else (std, std)
        ax.errorbar(
            i + offset,
            mean,
            yerr=[[low], [high]],
            fmt=marker,
            ms=8,
            capsize=5,
            color=c,
            mec="k",
            mew=0.6,
            clip_on=False,  # a dot on an axis that starts at zero (an accuracy of 0) stays whole
        )
    if label is not None:
        ax.plot([], [], marker, color="0.6", mec="k", ms=8, label=label)
        ax.legend(loc="best")
    ax.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right")
    ax.set_xlim(-0.5, len(methods) - 0.5)
    ax.margins(y=0.2)
    ylabel = "target loss (held out)" if key == "loss" else "accuracy on held-out answers"
    ax.set(ylabel=ylabel, title=title)
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
    # in the band the curves leave empty: ScaleBiO's end near 0 below, the faint seeds of the
    # methods that stay near uniform above
    ax.legend(loc="center right", bbox_to_anchor=(1.0, 0.33))
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


# The figures of the notebooks, one function each: the notebook computes, these draw.


def plot_simplex_runs(
    grid: np.ndarray,
    f_grid: np.ndarray,
    phi_grid: np.ndarray,
    paths: Mapping[float, Sequence[np.ndarray]],
    p_star: np.ndarray,
    p_alpha: Mapping[float, np.ndarray],
    path_alphas: Sequence[float],
) -> plt.Figure:
    """Notebook 01: the true objective F (left) and the surrogate Φ_1 (right) on the 3-simplex,
    the ScaleBiO runs of `paths` at α = 100 (left) and α = 1 (right) from their start points,
    the exact p*, and on the right the surrogate's minimisers p_α for `path_alphas`."""
    fig, ax = plt.subplots(1, 2, figsize=(11, 5))
    names = [f"source {i + 1}" for i in range(3)]
    plot_simplex(ax[0], grid, f_grid, names, r"True objective $F(p)$, runs at $\alpha=100$")
    plot_simplex(ax[1], grid, phi_grid, names, r"Surrogate $\Phi_1(p)$, runs at $\alpha=1$")
    for a, axis in ((100.0, ax[0]), (1.0, ax[1])):
        for q in paths[a]:
            axis.plot(*simplex_xy(q).T, color="w", lw=1.5)
            axis.plot(*simplex_xy(q[:1]).T, "o", color="w", ms=5)
    star = simplex_xy(p_star)[0]
    for axis in ax:
        axis.plot(*star, "*", color="red", ms=14, mec="k", label=r"$p^*$ (exact)")
    route = simplex_xy(np.array([p_alpha[a] for a in path_alphas]))
    ax[1].plot(*route.T, ":", color="k", lw=1.5)
    ax[1].plot(
        *route.T,
        "o",
        color="orange",
        ms=4,
        mec="k",
        mew=0.5,
        label=r"$p_\alpha$, $\alpha$ = " + ", ".join(f"{a:g}" for a in path_alphas),
    )
    ax[1].plot(*simplex_xy(p_alpha[1.0])[0], "D", color="orange", ms=8, mec="k", label=r"$p_1$")
    for axis in ax:
        axis.legend(loc="upper left", bbox_to_anchor=(0.0, 1.02), fontsize=8)
    return fig


def plot_toy_runs(
    run_a: ToyRun,
    run_b: ToyRun,
    run_c: ToyRun,
    sweep_a: BiasSweep,
    sweep_c: BiasSweep,
    alpha_a: float,
    alpha_b: float,
) -> plt.Figure:
    """Notebook 01: p against steps on toys (a) and (b) with their exact p*, the errors to p* and
    to p_α against steps on (a), (b) and (c) (log-log), and the bias ‖p_α − p*‖ against α of
    ScaleBiO's end points (fitted slopes) over the exact surrogate minimisers (dotted)."""
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    plot_weights(
        ax[0, 0],
        run_a.p,
        run_a.problem.names,
        run_a.p_star,
        legend_loc="center right",
        title=rf"(a) least squares: $p$ against steps (dashed: exact $p^*$), $\alpha$={alpha_a}",
    )
    plot_weights(
        ax[0, 1],
        run_b.p,
        run_b.problem.names,
        run_b.p_star,
        legend_loc="center right",
        title=rf"(b) weighted mean: two weights go to exactly 0, $\alpha$={alpha_b}",
    )
    curves = {
        r"(a) $\|p-p^*\|_\infty$": (np.arange(1, len(run_a.p)), run_a.p_err[1:]),
        r"(a) $\|p-p_\alpha\|_\infty$": (np.arange(1, len(run_a.p)), run_a.p_err_alpha[1:]),
        r"(b) $\|p-p^*\|_\infty$": (np.arange(1, len(run_b.p)), run_b.p_err[1:]),
        r"(c) $\|p-p_\alpha\|_\infty$": (np.arange(1, len(run_c.p)), run_c.p_err_alpha[1:]),
    }
    plot_loglog(
        ax[1, 0],
        curves,
        "step",
        "largest weight error",
        r"Convergence: to $p_\alpha$ fast, to $p^*$ up to the $O(1/\alpha)$ bias",
    )
    ax[1, 0].set_ylim(1e-12, 1)
    ax[1, 0].legend(loc="lower left", fontsize=9)
    plot_loglog(
        ax[1, 1],
        {
            "(a) ScaleBiO": (sweep_a.alphas, sweep_a.bias_scalebio),
            "(c) ScaleBiO": (sweep_c.alphas, sweep_c.bias_scalebio),
        },
        r"$\alpha$ (penalty weight)",
        r"$\|p_\alpha-p^*\|_\infty$",
        "Bias of the penalty surrogate against α",
        slopes={"(a) ScaleBiO": sweep_a.slope_scalebio, "(c) ScaleBiO": sweep_c.slope_scalebio},
    )
    for s in (sweep_a, sweep_c):
        ax[1, 1].loglog(s.alphas, s.bias_exact, "k:", lw=1)
    ax[1, 1].plot([], [], "k:", label=r"exact minimiser $p_\alpha$ of the surrogate")
    ax[1, 1].legend(loc="upper right", fontsize=9)
    return fig


def plot_toy_cost(
    tradeoff: Mapping[str, Sequence[float]],
    cond: Mapping[str, np.ndarray],
    scaling: Sequence[Mapping],
    tol: float,
    run_a: ToyRun,
    sgd_runs: Mapping[str, np.ndarray],
) -> plt.Figure:
    """Notebook 01, cost and rates: what a larger α buys and costs on toy (a) (`tradeoff`), the
    models' stable step against α, λ updates against κ on (c) (`cond`), ScaleBiO against implicit
    differentiation (`scaling`: time, then final error against `tol`), and the error against
    steps of the deterministic run `run_a` beside the stochastic runs `sgd_runs`."""
    fig, ax = plt.subplots(2, 3, figsize=(17, 9.5))
    plot_alpha_tradeoff(ax[0, 0], ax[0, 1], tradeoff)
    plot_loglog(
        ax[0, 2],
        {"toy (c)": (cond["kappa"], cond["steps"])},
        r"condition number $\kappa$ of the sources",
        r"λ updates until $\|p-p_\alpha\|_\infty<10^{-3}$",
        "Conditioning: updates needed against κ",
    )
    ax[0, 2].legend(loc="upper left")
    plot_against_implicit(ax[1, 0], ax[1, 1], scaling, tol)
    plot_error_by_step(ax[1, 2], run_a, sgd_runs)
    return fig


def plot_alpha_tradeoff(
    ax_error: plt.Axes, ax_step: plt.Axes, tradeoff: Mapping[str, Sequence[float]]
) -> tuple[plt.Axes, plt.Axes]:
    """Against α (`toy_runs.alpha_tradeoff`): the bias and the float64 and float32 errors to
    p* on `ax_error`, the largest stable model step beside the 1/L step taken on `ax_step`."""
    t = {k: np.asarray(v, float) for k, v in tradeoff.items() if k != "steps"}
    plot_loglog(
        ax_error,
        {
            r"bias $\|p_\alpha-p^*\|_\infty$ (exact)": (t["alpha"], t["bias"]),
            "float64 run: error to $p^*$": (t["alpha"], t["err64"]),
            "float32 run: error to $p^*$": (t["alpha"], t["err32"]),
        },
        r"$\alpha$ (penalty weight)",
        r"$\|p-p^*\|_\infty$",
        r"What a larger $\alpha$ buys and costs, toy (a)",
    )
    ax_error.lines[0].set(lw=5, alpha=0.45)  # the bias, under the float64 run that equals it
    ax_error.legend(loc="lower left", fontsize=8)
    plot_loglog(
        ax_step,
        {
            "largest stable step (measured)": (t["alpha"], t["stable"]),
            "the 1/L step the runs take": (t["alpha"], t["lr_w"]),
        },
        r"$\alpha$ (penalty weight)",
        "step size of w",
        r"The models' step falls like $1/\alpha$",
    )
    ax_step.legend(loc="lower left", fontsize=8)
    return ax_error, ax_step


def plot_against_implicit(
    ax_time: plt.Axes, ax_error: plt.Axes, scaling: Sequence[Mapping], tol: float
) -> tuple[plt.Axes, plt.Axes]:
    """ScaleBiO against implicit differentiation (`benchmarks/toy_scaling.py` rows) by size d:
    seconds until the tolerance and of the whole run on `ax_time`, the final error on
    `ax_error` with the tolerance `tol` dotted."""
    for method, colour in (("ScaleBiO", "C0"), ("implicit", "C3")):
        rows = [r for r in scaling if r["method"] == method]
        d = [r["d"] for r in rows]
        ax_time.loglog(
            d,
            [r["hit_seconds"] or np.nan for r in rows],
            "-o",
            color=colour,
            label=f"{method}: seconds until the tolerance",
        )
        ax_time.loglog(
            d,
            [r["seconds"] for r in rows],
            ":s",
            color=colour,
            label=f"{method}: seconds of the run",
        )
        ax_error.loglog(d, [r["error"] for r in rows], "-o", color=colour, label=method)
    ax_time.set(
        xlabel="parameters d",
        ylabel="seconds (one torch thread)",
        title="Time: ScaleBiO against implicit differentiation",
    )
    # room for the legend above the runs
    ax_time.set_ylim(top=4 * max(r["seconds"] for r in scaling))
    ax_time.legend(loc="upper left", fontsize=8)
    ax_error.axhline(tol, color="k", ls=":", lw=1, label=f"tolerance {tol:g}")
    ax_error.set(
        xlabel="parameters d",
        ylabel=r"final $\|p-p^*\|_\infty$",
        title="Error at the end of each run",
    )
    ax_error.legend(loc="best", fontsize=8)
    return ax_time, ax_error


def plot_error_by_step(ax: plt.Axes, run_a: ToyRun, sgd_runs: Mapping[str, np.ndarray]) -> plt.Axes:
    """‖p − p*‖_∞ against steps: the deterministic run `run_a` (its end dotted) beside the mean
    over seeds of each kind of stochastic run in `sgd_runs` (seeds × steps)."""
    steps_a = np.arange(1, len(run_a.p))
    ax.semilogy(
        steps_a, run_a.p_err[1:], color="C0", label=r"(a) deterministic: $\|p-p^*\|_\infty$"
    )
    for (kind, e), colour in zip(sgd_runs.items(), ("C1", "C2")):
        ax.semilogy(
            np.arange(1, e.shape[1] + 1),
            e.mean(axis=0),
            color=colour,
            label=f"(a) stochastic, λ step {kind} (mean of {len(e)} seeds)",
        )
    ax.axhline(run_a.p_err[-1], color="C0", ls=":", lw=1)
    ax.set(xlabel="step", ylabel=r"$\|p-p^*\|_\infty$", title="Error against steps (measured)")
    ax.legend(loc="upper right", fontsize=8)
    return ax


def plot_tour(
    points: Mapping[str, Any],
    target: Any,
    path_w: np.ndarray,
    path_u: np.ndarray,
    p: np.ndarray,
    names: Sequence[str],
    p_star: Mapping[str, float],
    adamw: Mapping[float, Any],
) -> plt.Figure:
    """Notebook 00: where w and u go among the source points `points` (tensors) and the target
    (the hull, with a zoom near the end), the weights p against steps with plain gradient steps
    on u and w beside the exact `p_star`, and the weights of the AdamW runs `adamw` (by lr)."""
    fig, ax = plt.subplots(1, 3, figsize=(16, 5.2))
    pts = np.array([v.tolist() for v in points.values()])
    ax[0].fill(*pts.T, color="0.9", label="reachable: the hull of the sources")
    for (name, v), colour, shift in zip(
        points.items(), ("C0", "C1", "C2"), ((6, -12), (-58, -4), (6, -12))
    ):
        ax[0].plot(*v.tolist(), "o", color=colour, ms=9)
        ax[0].annotate(name, v.tolist(), xytext=shift, textcoords="offset points", fontsize=9)
    ax[0].plot(*target.tolist(), "*", color="red", ms=15, mec="k", label="target t")
    ax[0].plot(0.5, 0.5, "D", color="k", ms=6, label=r"$w^*(p^*)$: the hull's point nearest t")
    zoom = ax[0].inset_axes([0.08, 0.3, 0.36, 0.36])
    for axis in (ax[0], zoom):
        axis.plot(*path_u.T, "-", color="C4", lw=4, alpha=0.6, label="u (fits the mixture)")
        axis.plot(*path_w.T, "--", color="C3", lw=1.5, label="w (pulled towards t)")
    zoom.plot(0.5, 0.5, "D", color="k", ms=5)
    zoom.set(
        xlim=(0.42, 0.56),
        ylim=(0.42, 0.56),
        xticks=[],
        yticks=[],
        title="near the end",
        aspect="equal",
    )
    zoom.title.set_fontsize(8)
    ax[0].indicate_inset_zoom(zoom, edgecolor="0.4")
    ax[0].set(xlabel="$w_1$", ylabel="$w_2$", title="Where the models go", aspect="equal")
    ax[0].legend(loc="lower right", fontsize=8)
    for i, (name, style, colour) in enumerate(zip(names, ("-", "--", "-"), ("C0", "C1", "C2"))):
        ax[1].plot(p[:, i], style, color=colour, lw=3 if style == "-" else 1.5, label=name)
        ax[1].axhline(p_star[name], color=colour, ls=":", lw=1)
    ax[1].plot([], [], "k:", lw=1, label=r"$p^*$ (exact): ½, ½, 0")
    ax[1].set(
        xlabel="step",
        ylabel="weight $p_s$",
        ylim=(0, 1),
        title="Plain gradient steps on u and w (α = 10)",
    )
    ax[1].legend(loc="center right", fontsize=8)
    for (lr, r), style in zip(adamw.items(), ("-", "--")):
        tr = r.trajectory["p"]
        for i, (name, colour) in enumerate(zip(names, ("C0", "C1", "C2"))):
            ax[2].plot(tr[:, i], style, color=colour, lw=1.5, label=f"{name}, lr {lr:g}")
    ax[2].set(
        xlabel="step",
        ylabel="weight $p_s$",
        ylim=(0, 1),
        title="AdamW on u and w: the near weights split",
    )
    ax[2].legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, ncol=3)
    return fig


def plot_lisa_costs(
    rows: Sequence[Mapping],
    n_blocks: int,
    shared_active: int,
    steps: np.ndarray,
    losses: Mapping[str, np.ndarray],
    cost: Mapping[str, Mapping[str, np.ndarray]],
    mem: Mapping[str, Mapping[str, float]],
) -> plt.Figure:
    """Notebook 02: which blocks train when (the trajectory `rows` of a run with LISA
    `shared_active`), the validation loss against `steps` of each configuration (`losses`:
    seeds × steps, moving average), time per step and final loss (`cost`: mean ± std over
    seeds), and the memory measured for each configuration (`mem`)."""
    fig, ax = plt.subplots(2, 3, figsize=(16, 8.5))
    plot_lisa_raster(
        ax[0, 0],
        rows,
        n_blocks,
        title=f"Which blocks train when (LISA {shared_active}, independent draws)",
    )
    window = max(3, len(steps) // 12)
    plot_smoothed(
        ax[0, 1],
        {label: (steps, ys) for label, ys in losses.items()},
        window,
        "step",
        "validation loss L1 of w",
        f"Loss against steps (moving average of {window})",
    )
    names = list(cost)
    x = np.arange(len(names))
    ax[0, 2].errorbar(
        x,
        [cost[k]["sps"].mean() for k in names],
        [cost[k]["sps"].std() for k in names],
        fmt="o",
        ms=8,
        capsize=5,
        color="C3",
    )
    ax[0, 2].set_xticks(x, names)
    ax[0, 2].set_xlim(-0.5, len(names) - 0.5)
    ax[0, 2].set_ylim(0, None)
    ax[0, 2].set(
        ylabel="seconds per step (u, w and λ)", title="Time per step (mean ± std over seeds)"
    )
    ax2 = ax[1, 2]
    ax2.errorbar(
        x,
        [cost[k]["l1"].mean() for k in names],
        [cost[k]["l1"].std() for k in names],
        fmt="o",
        ms=8,
        capsize=5,
        color="C0",
    )
    ax2.set_xticks(x, names)
    ax2.set_xlim(-0.5, len(names) - 0.5)
    ax2.set(
        ylabel="final L1 (mean of the last 5 values)", title="Final loss (mean ± std over seeds)"
    )
    labels = list(mem)
    xm = np.arange(len(labels))
    ax[1, 0].bar(
        xm - 0.2,
        [mem[k]["optimizer_state_mib"] for k in labels],
        0.4,
        label="optimizer state (u + w)",
    )
    ax[1, 0].bar(xm + 0.2, [mem[k]["grads_mib"] for k in labels], 0.4, label="gradients (u + w)")
    ax[1, 0].set_xticks(xm, labels, rotation=20, ha="right")
    ax[1, 0].set(ylabel="MiB", title="Measured state and gradient memory")
    ax[1, 0].legend()
    ax[1, 1].bar(xm, [mem[k]["peak_rss_increase_mib"] for k in labels], color="C2")
    ax[1, 1].set_xticks(xm, labels, rotation=20, ha="right")
    ax[1, 1].set(ylabel="MiB", title="Peak resident memory increase over the steps")
    return fig


def plot_math_pipeline(
    weights: Mapping[str, float],
    quoted: Mapping[str, float],
    preset: str,
    summary: Sequence[Mapping],
    summary_tokens: Sequence[Mapping] | None,
    n_seeds: int,
) -> plt.Figure:
    """Notebook 08: the learned weights against uniform beside the release's `quoted` weights,
    then the held-out target loss and accuracy of each method (`summary`: equal examples;
    `summary_tokens`, when given: equal tokens, beside it), over `n_seeds` seeds."""
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    plot_weight_bars(
        ax[0, 0],
        weights,
        reference={n: 1 / len(weights) for n in weights},
        ref_label="uniform",
        title=f"Learned weights ({preset}, embedded analogue)",
    )
    plot_weight_bars(
        ax[0, 1],
        quoted,
        label="quoted, not measured here",
        title="Quoted: the 2025 release's weights (Llama-3-8B)",
    )
    ax[0, 1].set_ylim(0, 0.4)
    protocols = [("equal examples", summary, "o", -0.12)]
    if summary_tokens:
        protocols.append(("equal tokens", summary_tokens, "s", 0.12))
    for key, a, what in [("loss", ax[1, 0], "target loss"), ("acc", ax[1, 1], "accuracy")]:
        for label, summ, marker, dx in protocols:
            if all(f"{key}_mean" in r for r in summ):
                plot_method_losses(
                    a,
                    summ,
                    key=key,
                    label=label,
                    marker=marker,
                    offset=dx,
                    title=f"Held-out problems: {what} ({n_seeds} seeds)",
                )
    if not all("acc_mean" in r for r in summary):
        ax[1, 1].text(
            0.5,
            0.5,
            "no accuracy: the test answers are not checkable",
            ha="center",
            transform=ax[1, 1].transAxes,
        )
    ax[1, 1].set_ylim(0, None)
    fig.tight_layout()
    return fig


def plot_distance_runs(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = ""
) -> plt.Figure:
    """Notebook 10: ‖p − p_planted‖ against steps of a few runs (`curves`: label → (steps,
    distance)), in blue, then red."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for (label, (steps, dist)), c in zip(curves.items(), ["tab:blue", "tab:red"]):
        ax.plot(steps, dist, color=c, label=label)
    ax.set(xlabel="step", ylabel="‖p − p_planted‖", ylim=(0, None), title=title)
    ax.legend(loc="upper right")
    return fig
