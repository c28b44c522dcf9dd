"""ipywidgets dashboards reused by the notebooks (no training logic of their own)."""

from __future__ import annotations

import html
import json
import os
import shlex
import sys
from pathlib import Path

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import yaml

from ..core.toy import least_squares
from ..core.toy_runs import run_toy
from ..errors import ConfigError
from ..plan.memory import HEADROOM, PAPER_MODELS, model_shape
from ..plan.scaleout import GPU_GIB, GPUS, emit, memory_argv, plan_command, plan_config, plan_run
from ..train import nullband
from ..train.config import LORA_BASES, PRECISIONS, load_preset
from ..train.convergence import VERDICT
from ..train.runs import TRAJECTORY, load_trajectory, read_jsonl
from .experiments import run_preset, runs_root
from .plots import (
    fig_to_png,
    plot_lisa_raster,
    plot_loglog,
    plot_noise_weights,
    plot_run_step,
    plot_weight_trajectories,
    plot_weights,
)


def toy_explorer(
    steps: int = 1000, noise: float = 1.0, alpha: float = 100.0, lr_lam: float = 2.0
) -> W.VBox:
    """Sliders for alpha, tau, lr_lam and the noise of the last least-squares source.

    Each change reruns ScaleBiO on toy (a) and redraws p against the exact optimum p* and the
    log-log error ‖p_t − p*‖_∞ against steps.
    """
    s_alpha = W.FloatLogSlider(value=alpha, base=10, min=0, max=3, step=0.25, description="α")
    s_tau = W.FloatSlider(
        value=1.0, min=1.0, max=1.01, step=0.001, readout_format=".3f", description="τ"
    )
    s_lr = W.FloatLogSlider(value=lr_lam, base=10, min=-2, max=0.5, step=0.1, description="lr_λ")
    s_noise = W.FloatSlider(value=noise, min=0.0, max=5.0, step=0.25, description="noise")
    out = W.Output()
    status = W.HTML()

    def redraw(*_):
        problem = least_squares(noise=(0.1, 0.1, 0.1, s_noise.value))
        run = run_toy(problem, s_alpha.value, steps, s_lr.value, tau=s_tau.value)
        err = run.p_err
        status.value = (
            f"final ‖p − p*‖∞ = {err[-1]:.2e}; relative F gap = "
            f"{run.f_err()[-1]:.2e}; final α = {run.result.trajectory['alpha'][-1]:g}"
        )
        with out:
            out.clear_output(wait=True)
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
            plot_weights(
                axes[0],
                run.p,
                problem.names,
                run.p_star,
                title="p against steps (dashed: exact p*)",
            )
            x = np.arange(1, len(err))
            plot_loglog(
                axes[1],
                {"‖p_t − p*‖∞": (x, err[1:])},
                "step",
                "error",
                "Distance to the exact optimum",
            )
            plt.show()

    for s in (s_alpha, s_tau, s_lr, s_noise):
        s.continuous_update = False
        s.observe(redraw, names="value")
    box = W.VBox([W.HBox([s_alpha, s_tau]), W.HBox([s_lr, s_noise]), status, out])
    redraw()
    return box


def weight_viewer(run_dir, title: str = "") -> W.VBox:
    """A step slider and a play button that redraw the weights and losses of a run directory.

    Works on a finished run as on one in progress (the 'reload' button rereads the trajectory).
    """
    traj = {"t": load_trajectory(run_dir)}
    n = len(traj["t"]["step"])
    slider = W.IntSlider(
        value=n - 1,
        min=0,
        max=n - 1,
        description="step index",
        continuous_update=False,
        layout=W.Layout(width="420px"),
    )
    play = W.Play(value=n - 1, min=0, max=n - 1, interval=300, description="play")
    W.jslink((play, "value"), (slider, "value"))
    reload = W.Button(description="reload", tooltip="reread trajectory.jsonl")
    label = W.HTML()
    image = W.Image(format="png")
    image.add_class("scalebio-weight-chart")
    label.add_class("scalebio-step-label")

    def redraw(*_):
        t, i = traj["t"], slider.value
        p = dict(zip(t["names"], np.asarray(t["p"])[i]))
        top = max(p, key=p.get)
        verdict = Path(run_dir) / VERDICT
        said = json.loads(verdict.read_text())["text"] if verdict.exists() else "run not finished"
        label.value = (
            f"<b>step {int(t['step'][i])}</b> of {int(t['step'][-1])}: "
            f"L1 = {t['L1'][i]:.4f}, top source {top} ({p[top]:.3f})<br><i>{said}</i>"
        )
        image.value = fig_to_png(plot_run_step(t, i, title))

    def on_reload(_):
        traj["t"] = load_trajectory(run_dir)
        m = len(traj["t"]["step"]) - 1
        slider.max = play.max = m
        slider.value = m
        redraw()

    slider.observe(redraw, names="value")
    reload.on_click(on_reload)
    redraw()
    return W.VBox([W.HBox([play, slider, reload]), label, image])


def run_comparer(run_dirs) -> W.VBox:
    """Pick several run directories and overlay their weight trajectories."""
    options = [str(Path(d)) for d in run_dirs]
    pick = W.SelectMultiple(
        options=options,
        value=tuple(options[:2]),
        description="runs",
        rows=min(6, len(options)),
        layout=W.Layout(width="60%"),
    )
    image = W.Image(format="png")

    def redraw(*_):
        fig, ax = plt.subplots(figsize=(9, 4))
        plot_weight_trajectories(ax, {Path(d).name: load_trajectory(d) for d in pick.value})
        image.value = fig_to_png(fig)

    pick.observe(redraw, names="value")
    redraw()
    return W.VBox([pick, image])


def lisa_viewer(
    runs: dict, n_blocks: int, block_params: int | None = None, total_params: int | None = None
) -> W.VBox:
    """Pick a LISA run and a step: which blocks of w and u train then, and what share of w.

    `runs` maps labels to run directories; `block_params` (one decoder block) and `total_params`
    (the whole model) turn the active blocks into the share of parameters that gets gradients:
    the active blocks plus everything outside the blocks (embeddings, head, final norm).
    """
    rows = {label: read_jsonl(Path(d) / TRAJECTORY) for label, d in runs.items()}
    pick = W.Dropdown(options=list(rows), description="run", layout=W.Layout(width="320px"))
    first = rows[pick.value]
    slider = W.IntSlider(
        value=first[0]["step"],
        min=first[0]["step"],
        max=first[-1]["step"],
        description="step",
        continuous_update=False,
        layout=W.Layout(width="420px"),
    )
    label, image = W.HTML(), W.Image(format="png")

    def share(active) -> str:
        if block_params is None or total_params is None:
            return ""
        n = len(active) if active is not None else n_blocks
        trained = total_params - (n_blocks - n) * block_params
        return f" ({trained:,} of {total_params:,} parameters, {trained / total_params:.0%})"

    def redraw(*_):
        rs = rows[pick.value]
        slider.min, slider.max = rs[0]["step"], rs[-1]["step"]
        row = min(rs, key=lambda r: abs(r["step"] - slider.value))
        w, u = row.get("lisa_w"), row.get("lisa_u")
        label.value = (
            f"<b>step {row['step']}</b>: w trains "
            + (f"blocks {sorted(w)}" if w is not None else f"all {n_blocks} blocks")
            + share(w)
            + "; u trains "
            + (f"blocks {sorted(u)}" if u is not None else f"all {n_blocks} blocks")
            + ". Embeddings, head and final norm always train."
        )
        fig, ax = plt.subplots(figsize=(9, 3.4))
        if w is None and u is None:
            ax.text(
                0.5,
                0.5,
                "LISA off: every block trains at every step",
                ha="center",
                transform=ax.transAxes,
            )
            ax.set_axis_off()
        else:
            plot_lisa_raster(
                ax, rs, n_blocks, title=f"{pick.value}: blocks training", cursor=row["step"]
            )
        image.value = fig_to_png(fig)

    pick.observe(redraw, names="value")
    slider.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([pick, slider]), label, image])


class LivePlot:
    """A training callback that redraws the weights every `every` steps (d2l style).

    `display(live.widget)` in the cell, then `train(cfg, callback=live)`.
    """

    def __init__(self, every: int = 10, title: str = "ScaleBiO: weights while training"):
        self.every, self.title = every, title
        self.rows: list[dict] = []
        self.widget = W.Image(format="png")

    def __call__(self, row: dict, setup=None) -> None:
        if nullband.is_split(row["p"]):  # the null band's halves: draw the sources
            row = nullband.combine_row(row)
        self.rows.append(row)
        if len(self.rows) % self.every:
            return
        names = list(self.rows[0]["p"])
        p = np.array([[r["p"][n] for n in names] for r in self.rows])
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.2))
        plot_weights(a1, p, names, steps=np.array([r["step"] for r in self.rows]), title=self.title)
        a2.plot([r["step"] for r in self.rows], [r["L1"] for r in self.rows], label="L1")
        a2.set(xlabel="step", ylabel="validation loss L1", title="L1 of w")
        self.widget.value = fig_to_png(fig)


NOISE_SETTINGS = {
    "0, 0.2, …, 1.0": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
    "0, 0.5, 1.0": [0.0, 0.5, 1.0],
    "0, 0.1, 0.2, 0.3": [0.0, 0.1, 0.2, 0.3],
    "0.5, 0.6, 0.7": [0.5, 0.6, 0.7],
}


def noise_explorer(run_dir=None, preset: str = "smoke") -> W.VBox:
    """Pick a noise setting, rerun the noisy-data experiment at `preset` size, see the weights.

    Shows `run_dir` (e.g. the notebook's quick run) first, when given.
    """
    pick = W.Dropdown(options=list(NOISE_SETTINGS), description="noise rates")
    button = W.Button(description=f"run at {preset} size", button_style="primary")
    status = W.HTML()
    image = W.Image(format="png")

    def show(path, label):
        t = load_trajectory(path)
        fig, ax = plt.subplots(figsize=(6, 3.4))
        plot_noise_weights(ax, t["weights"], title=f"Learned weight against noise rate ({label})")
        image.value = fig_to_png(fig)

    def run(_):
        rates = NOISE_SETTINGS[pick.value]
        tag = "-".join(f"{r:g}" for r in rates)
        status.value = f"training at {preset} size on noise rates {rates} …"
        button.disabled = True
        try:
            path = run_preset(
                "noisy",
                preset,
                progress=False,
                corpus_args={"noise_rates": rates},  # merged over the preset's corpus_args
                out_dir=str(runs_root() / "noise_explorer" / f"{preset}_{tag}"),
            )
            show(path, f"{preset}, rates {tag}")
            status.value = f"done: {path}"
        finally:
            button.disabled = False

    button.on_click(run)
    if run_dir is not None:
        show(run_dir, "this notebook's run")
    return W.VBox([W.HBox([pick, button]), status, image])


def scaling_planner(
    models=None,
    config: str | None = "noisy",
    preset: str | None = "paper",
    folder: str | Path | None = None,
) -> W.VBox:
    """Pick a model, a node and the run's options: the planner's answer (`scaleout.plan_run`,
    the one function behind `python -m scalebio_core memory` too, with its defaults: 8 × 48
    GiB, `memory.HEADROOM` kept free, host memory not limited unless given), the equivalent
    command, and the command that launches the plan. With "search" ticked it asks for the
    cheapest configuration that fits (sharding, offload, precision and checkpointing are
    searched); unticked it predicts the options chosen. The base run config is `config` /
    `preset` (their batch and length, shown and changeable); the button writes the launch
    files (`scaleout.emit`) into `folder`/<model>, an absolute folder (default: runs/launch).

    The returned box holds the current answer as `.planned`, the equivalent `memory` arguments
    as `.argv` and the controls as `.controls`."""
    return _Planner(models, config, preset, folder).box


class _Planner:
    """The state and callbacks of `scaling_planner`."""

    def __init__(self, models, config: str | None, preset: str | None, folder) -> None:
        models = list(models or PAPER_MODELS)
        self.config, self.preset = config, preset
        self.base = load_preset(config, preset) if config else None
        self.root = Path(os.path.abspath(folder if folder is not None else runs_root() / "launch"))
        self.start = plan_config(self.base, {"model": models[-1]}, GPUS)  # batch and length
        self.base_batch = (self.base or {}).get("batch_size")
        self.shapes: dict = {}
        self.c = self._controls(models)
        self.out = W.HTML()
        self.write = W.Button(description="write launch files")
        self.box = W.VBox()
        self.box.controls = self.c
        for name, w in self.c.items():
            if name != "overwrite":
                w.observe(self.redraw, names="value")
        self.write.on_click(self.on_write)
        c = self.c
        self.box.children = [
            W.HBox([c["model"], c["gpus"], c["gpu_mem"]]),
            W.HBox([c["host_mem"], c["headroom"]]),
            c["mode"],
            c["lora_base"],
            W.HBox([c["batch"], c["max_length"]]),
            c["search"],
            c["shard"],
            W.HBox([c["precision"], c["offload"], c["gradient_checkpointing"]]),
            W.HBox([self.write, c["overwrite"]]),
            self.out,
        ]
        self.redraw()

    def _controls(self, models: list[str]) -> dict[str, W.Widget]:
        length = self.start.max_length if isinstance(self.start.max_length, int) else 1024
        shards = ["fsdp", "zero3", "zero2", "zero1", "ddp"]
        return {
            "model": W.Dropdown(options=models, value=models[-1], description="model"),
            "gpus": W.IntSlider(value=GPUS, min=1, max=16, description="GPUs"),
            "gpu_mem": W.Dropdown(
                options=[(f"{g:g}", float(g)) for g in (24, 40, 48, 80, 141)],
                value=float(GPU_GIB),
                description="GiB / GPU",
            ),
            "host_mem": W.BoundedFloatText(
                value=0, min=0, max=1e5, description="host GiB", tooltip="per node; 0: no limit"
            ),
            "headroom": W.BoundedFloatText(
                value=HEADROOM, min=0, max=0.9, step=0.05, description="headroom"
            ),
            "mode": W.ToggleButtons(
                options=["full", "lisa", "lora"], value="lisa", description="train"
            ),
            "lora_base": W.ToggleButtons(options=list(LORA_BASES), description="LoRA base"),
            "batch": W.BoundedIntText(
                value=self.base_batch or 0,
                min=0,
                max=1 << 20,
                description="batch",
                tooltip="global batch (training and validation); 0: one sample per GPU",
            ),
            "max_length": W.BoundedIntText(
                value=length, min=2, max=1 << 20, description="max length"
            ),
            "search": W.Checkbox(value=True, description="search the cheapest that fits"),
            "shard": W.ToggleButtons(options=shards, description="shard"),
            "precision": W.Dropdown(
                options=list(PRECISIONS), value="bf16-weights", description="precision"
            ),
            "offload": W.Checkbox(value=False, description="CPU offload"),
            "gradient_checkpointing": W.Checkbox(value=False, description="checkpointing"),
            "overwrite": W.Checkbox(value=False, description="overwrite"),
        }

    def fields(self) -> dict:
        """The run-config fields the controls set over the base."""
        c, start = self.c, self.start
        f: dict = {}
        if c["mode"].value == "lisa" or start.lisa_active:
            f["lisa_active"] = 2 if c["mode"].value == "lisa" else 0
        if c["mode"].value == "lora" or start.lora_rank:
            f["lora_rank"] = 128 if c["mode"].value == "lora" else 0
        if c["mode"].value == "lora":
            f["lora_base"] = c["lora_base"].value
        if c["batch"].value and c["batch"].value != self.base_batch:
            f["batch_size"] = f["val_batch_size"] = c["batch"].value
        if c["max_length"].value != start.max_length:
            f["max_length"] = c["max_length"].value
        if not c["search"].value:
            s, offload = c["shard"].value, c["offload"].value
            f.update(
                precision=c["precision"].value,
                gradient_checkpointing=c["gradient_checkpointing"].value,
                fsdp=s == "fsdp",
                fsdp_offload=s == "fsdp" and offload,
                zero_stage=int(s[-1]) if s.startswith("zero") else 0,
                zero_offload=s.startswith("zero") and offload,
            )
        return f

    def target(self) -> Path:
        return self.root / self.c["model"].value.replace("/", "__")

    def redraw(self, *_) -> None:
        c, box = self.c, self.box
        for name in ("shard", "precision", "gradient_checkpointing"):
            c[name].disabled = c["search"].value
        ddp = c["shard"].value == "ddp"  # the trainer offloads shards only
        c["offload"].disabled = c["search"].value or ddp
        if ddp:
            c["offload"].value = False
        c["lora_base"].disabled = c["mode"].value != "lora"
        model = c["model"].value
        ask = {
            "model": model,
            "gpus": c["gpus"].value,
            "gpu_gib": c["gpu_mem"].value,
            "fields": self.fields(),
            "search": c["search"].value,
            "host_gib": c["host_mem"].value or None,
            "headroom": c["headroom"].value,
        }
        box.argv = memory_argv(config=self.config, preset=self.preset, **ask)
        same = shlex.join([sys.executable, "-m", "scalebio_core", "memory", *box.argv])
        same = f"<p>the same as <code>{html.escape(same)}</code></p>"
        box.planned = None
        try:
            if model not in self.shapes:
                self.shapes[model] = model_shape(model)
            box.planned = plan_run(base=self.base, shape=self.shapes[model], **ask)
        except ConfigError as e:
            refused = f"<b>refused by the trainer</b>: {html.escape(str(e))}"
            self.out.value = f"<p style='color:crimson'>{refused}</p>{same}"
            return
        shape, p = self.shapes[model], box.planned.plan
        fits = p is not None and p.fits
        launch = "" if p is None else html.escape(plan_command(p, self.target()))
        self.out.value = (
            f"<b>{model}</b>: {shape.params / 1e9:.2f}B parameters, "
            f"{len(shape.block_params)} blocks<pre>{html.escape(box.planned.text())}</pre>"
            f"<p style='color:{'green' if fits else 'crimson'}'>"
            f"<b>{'fits' if fits else 'does not fit'}</b></p>{same}"
            + (f"<p>launch (after <b>write</b>): <code>{launch}</code></p>" if launch else "")
            + f"<p>launch files go to <code>{html.escape(str(self.target()))}</code></p>"
        )

    def on_write(self, _=None) -> None:
        planned = self.box.planned
        if planned is None or planned.plan is None:
            self.out.value += "<p style='color:crimson'>nothing to write: no plan fits</p>"
            return
        try:
            files = emit(
                planned.plan,
                self.target(),
                demo_data=self.config is not None,
                overwrite=self.c["overwrite"].value,
            )
        except ConfigError as e:
            self.out.value += f"<p style='color:crimson'>{html.escape(str(e))}</p>"
            return
        rehearse = shlex.join(
            [sys.executable, "-m", "scalebio_core", "memory", "--rehearse", str(self.target())]
        )
        run = yaml.safe_load(files["config"].read_text())["out_dir"]
        self.out.value += (
            "<p>wrote "
            + ", ".join(html.escape(str(f)) for f in files.values())
            + f" (the run writes to {html.escape(run)}); rehearse it on this CPU: "
            f"<code>{html.escape(rehearse)}</code></p>"
        )
