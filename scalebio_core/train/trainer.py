"""The recipes of a run on a language model: ScaleBiO, DoReMi, the fixed mixtures, and the swarm
of proxy runs (`proxies.SwarmRun`).

Each recipe is a `loop.Method` over a `build.Setup`: it owns its steps and what it checkpoints;
the loop owns the rest. The maths is elsewhere: `bilevel.scalebio_step` (docs/algorithm.md) and the
baselines' `plain_step` / `doremi_step`. `train(cfg)` runs `cfg.method` into the run directory of
docs/run-folder.md, and `train(cfg, resume=True)` continues it on the identical trajectory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.baselines import doremi_step, fixed_weights, plain_step
from ..core.bilevel import MicroBatches, scalebio_step
from ..errors import ConfigError
from ..parallel.engines import processes
from ..sources.data import load_sources
from . import checkpoint, evaluation, loop, nullband, runs
from .build import Setup, count_tokens, data_specs, setup, step_batches, train_batch
from .config import TrainConfig
from .losses import LMFns
from .proxies import SwarmRun, swarm_rows

FIXED = ("uniform", "natural", "validation")


def lm_fns(s: Setup) -> LMFns:
    """The step functions of a run: each rank's validation mean is its share of the global one."""
    return LMFns(
        s.cfg.val_dropout,
        val_scale=1.0 / s.dist.world,
        sharded=s.dist.sharded,
        chunked_head=s.cfg.gradient_checkpointing,
    )


def lisa_step(s: Setup, step: int) -> tuple | None:
    """LISA's trainable blocks of (w, u) at `step` (None without LISA)."""
    if not s.lisa:
        return None
    return tuple(lisa.apply(step, opt) for lisa, opt in zip(s.lisa, (s.state.opt_w, s.state.opt_u)))


def run_step(
    s: Setup, step: int, fns: LMFns, step_data: tuple[MicroBatches, MicroBatches] | None = None
) -> tuple[dict, tuple | None, MicroBatches, MicroBatches]:
    """LISA draw, this rank's batches (or `step_data`), one ScaleBiO step: (metrics, active
    blocks of w and u, batch, validation batch)."""
    active = lisa_step(s, step)
    batch, val_batch = step_data or step_batches(s, step)
    with s.dist.autocast():
        m = scalebio_step(s.state, batch, val_batch, fns, s.dist, s.divisor)
    return m, active, batch, val_batch


def scalebio_row(s: Setup, t: int, m: dict, active: tuple | None, tokens: int) -> dict:
    """A ScaleBiO step's row of trajectory.jsonl (docs/run-folder.md) from its metrics."""
    return {
        "step": t,
        "p": dict(zip(s.names, m["p"])),
        "L1": m["L1"],
        "L2_w": m["L2_w"],
        "L2_u": m["L2_u"],
        "gap": m["gap"],
        "alpha": m["alpha"],
        "lr_w": m["lr_w"],
        "lr_u": m["lr_u"],
        "lr_lam": m["lr_lam"],
        "lisa_w": active and list(active[0]),
        "lisa_u": active and list(active[1]),
        "tokens": tokens,
        "loss_w": dict(zip(s.names, m["loss_w"])),
        "loss_u": dict(zip(s.names, m["loss_u"])),
    }


def _top_weights(p: dict[str, float], n: int = 3) -> str:
    return " ".join(
        f"{k}={v:.2f}" for v, k in sorted(((v, k) for k, v in p.items()), reverse=True)[:n]
    )


class _Checkpointed:
    """A recipe over a Setup whose checkpoint is `checkpoint.save` / `checkpoint.load`."""

    checkpoints = True
    recorded_config = None
    setup: Setup

    def save(self, run_dir: Path, weights: dict[str, float]) -> None:
        checkpoint.save(self.setup, run_dir, weights)

    def load(self, run_dir: Path, accept_data_change: bool = False) -> tuple[int, dict]:
        return checkpoint.load(self.setup, run_dir, accept_data_change)


class ScaleBiORun(_Checkpointed):
    """ScaleBiO: u, w and lam by `scalebio_step`; the product is p = softmax(lam)."""

    desc = "ScaleBiO"
    advice = "lr_w/lr_u/alpha"
    learns_weights = True

    def __init__(self, cfg: TrainConfig, accelerator: Any):
        self.setup = setup(cfg, accelerator)
        self.dist = self.setup.dist
        self.total = cfg.steps
        self.fns = lm_fns(self.setup)

    def step(self, t: int) -> tuple[dict, int]:
        s = self.setup
        m, active, batch, val_batch = run_step(s, t, self.fns)
        tokens = count_tokens(s, batch, val_batch)
        return scalebio_row(s, t, m, active, tokens), tokens

    def weights(self) -> dict[str, float]:
        """p by source; with the null band's halves (`nullband`), each source's halves summed."""
        p = self.setup.state.weights()
        return nullband.combine(p) if self.setup.halves else p

    def sight(self) -> dict | None:
        """What the run can tell about its model on your data (`pipeline.model_sight`)."""
        return evaluation.model_sight(self.setup)

    def half_weights(self) -> dict[str, float] | None:
        """p by half of a source, for the null band (None without halves)."""
        return self.setup.state.weights() if self.setup.halves else None

    def postfix(self, row: dict) -> str:
        p = nullband.combine(row["p"]) if self.setup.halves else row["p"]
        return f"L1={row['L1']:.3f} " + _top_weights(p)


class DoReMiRun(_Checkpointed):
    """DoReMi: the reference (u) on the uniform mixture, then the proxy (w) with Group DRO
    weights; the product is the weights averaged over the proxy's steps."""

    desc = "DoReMi"
    advice = "lr_w"
    learns_weights = True

    def __init__(self, cfg: TrainConfig, accelerator: Any):
        self.setup = s = setup(cfg, accelerator)
        self.dist = s.dist
        self.n_ref = cfg.doremi.ref_steps or cfg.steps
        self.total = self.n_ref + cfg.steps
        self.fns = lm_fns(s)
        self.ref_cfg = dataclasses.replace(s.state.config, total_steps=self.n_ref)
        self.uniform = torch.full((len(s.names),), 1.0 / len(s.names), device=s.device)
        self.proxy_ps: list[list[float]] = []

    def load(self, run_dir: Path, accept_data_change: bool = False) -> tuple[int, dict]:
        start, changes = super().load(run_dir, accept_data_change)
        rows = runs.covered_rows(run_dir / runs.TRAJECTORY, start)
        names = self.setup.names
        self.proxy_ps = [[r["p"][n] for n in names] for r in rows if r["phase"] == "proxy"]
        return start, changes

    def step(self, t: int) -> tuple[dict, int]:
        s, ref = self.setup, t < self.n_ref
        batch = train_batch(s, t)
        model, opt = (s.state.u, s.state.opt_u) if ref else (s.state.w, s.state.opt_w)
        if s.lisa:
            s.lisa[1 if ref else 0].apply(t, opt)
        with s.dist.autocast():
            if ref:
                m = plain_step(
                    model, opt, batch, self.fns, self.uniform, self.ref_cfg, t, s.divisor, s.dist
                )
            else:
                s.state.u.eval()  # the reference is fixed: no dropout in its losses
                p = torch.softmax(s.state.lam.detach(), 0).to(s.device)
                p_new, m = doremi_step(
                    model,
                    s.state.u,
                    opt,
                    p,
                    batch,
                    self.fns,
                    s.state.config,
                    s.cfg.doremi,
                    t - self.n_ref,
                    s.divisor,
                    s.dist,
                )
                with torch.no_grad():
                    s.state.lam.copy_(torch.log(p_new).to(s.state.lam))
                self.proxy_ps.append(m["p"])
        s.state.step = t + 1
        tokens = count_tokens(s, batch)
        row = {
            "step": t,
            "phase": "reference" if ref else "proxy",
            "p": dict(zip(s.names, m["p"])),
            "loss": m["loss"],
            "loss_w": dict(zip(s.names, m["loss_w"])),
            "excess": dict(zip(s.names, m.get("excess", [0.0] * len(s.names)))),
            "lr_w": m["lr_w"],
            "tokens": tokens,
        }
        return row, tokens

    def weights(self) -> dict[str, float]:
        names = self.setup.names
        if not self.proxy_ps:
            return dict.fromkeys(names, 1.0 / len(names))
        return dict(zip(names, np.mean(self.proxy_ps, axis=0).tolist()))

    def postfix(self, row: dict) -> str:
        return f"{row['phase']} loss={row['loss']:.3f}"


class FixedRun:
    """uniform, natural, validation-only: weights that need no training (one row, no models)."""

    desc = "fixed weights"
    advice = "nothing (no step can fail)"
    learns_weights = False
    checkpoints = False
    recorded_config = None
    setup = None
    total = 1

    def __init__(self, cfg: TrainConfig, accelerator: Any):
        self.dist = processes(accelerator)
        self.method = cfg.method
        specs, _ = data_specs(cfg)
        self.sizes = {n: len(r) for n, r in load_sources(specs).items()}
        self.fixed = fixed_weights(cfg.method, self.sizes)

    def step(self, t: int) -> tuple[dict, int]:
        return {"step": t, "method": self.method, "p": self.fixed, "sizes": self.sizes}, 0

    def weights(self) -> dict[str, float]:
        return self.fixed

    def postfix(self, row: dict) -> str:
        return self.method

    def save(self, run_dir: Path, weights: dict[str, float]) -> None:
        """Nothing to checkpoint: the run is its one row."""

    def load(self, run_dir: Path, accept_data_change: bool = False) -> tuple[int, dict]:
        return 0, {}


RECIPES = {
    "scalebio": ScaleBiORun,
    "doremi": DoReMiRun,
    "swarm": SwarmRun,
    **dict.fromkeys(FIXED, FixedRun),
}


def expected_rows(cfg: TrainConfig) -> int:
    """Rows of a finished run's trajectory.jsonl."""
    if cfg.method in FIXED:
        return 1
    if cfg.method == "doremi":
        return (cfg.doremi.ref_steps or cfg.steps) + cfg.steps
    if cfg.method == "swarm":
        return swarm_rows(cfg)
    return cfg.steps


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    callback: loop.Callback | None = None,
    accept_data_change: bool = False,
) -> dict[str, float]:
    """Run (or resume) ScaleBiO or a baseline (`cfg.method`); returns the final weights.
    `accept_data_change`: resume although data files changed since the checkpoint (recorded in
    changes.jsonl); without it such a resume is refused, naming the files."""
    if cfg.method == "sft":
        raise ConfigError(
            "method: sft is plain fine-tuning on a resampled file: run it with python -m "
            "scalebio_core sft --data FILE --out DIR (pipeline.sft in Python)."
        )
    return loop.run(cfg, RECIPES[cfg.method], resume, progress, callback, accept_data_change)
