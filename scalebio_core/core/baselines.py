"""The methods ScaleBiO is compared with: fixed mixtures, plain training, and DoReMi.

Every method ends in weights p over the training sources (a `weights.json`):

    uniform      p_s = 1/K
    natural      p_s = n_s / Σ n        (the sources' sizes: what concatenating them gives)
    validation   all weight on the validation set itself (no training source); the model is then
                 fine-tuned on the (small) target sample alone
    doremi       Xie et al. 2023: train a reference model on the uniform mixture; then train a
                 proxy with Group DRO, whose weights follow an exponentiated-gradient step on the
                 per-source *excess* loss max(l(proxy) − l(reference), 0), smoothed towards
                 uniform; the weights averaged over the proxy's steps are the result.
    swarm        RegMix / Data Mixing Laws / Olmix: N proxies, each plain training on a mixture
                 drawn around the natural shares, a regression of their target losses on the
                 mixture, and its minimiser (`swarm.py`; the proxies run `plain_step`).

`plain_step` is one step of ordinary fine-tuning on a fixed mixture p (L = Σ_s p_s · l̂_s with
the same per-source estimator as ScaleBiO's lower level): the reference model of DoReMi, the
fine-tuning of the downstream pipeline and the "plain fine-tuning" of the step-cost benchmark.
Like `scalebio_step`, these are plain functions over explicit state: the toys and the language
models run the same code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, check_all, check_types
from .bilevel import (
    BilevelConfig,
    StepFns,
    TrainBatch,
    check_finite,
    lower_backward,
    lr_multiplier,
    make_optimizer,
    micro_batches,
    model_device,
    set_lr,
)
from .distributed import LOCAL, Distribution
from .problem import ParamVector, ProblemFns

METHODS = ("scalebio", "uniform", "natural", "validation", "doremi", "swarm", "sft")
"""The run config's methods: ScaleBiO, the fixed mixtures, DoReMi, regression over proxy runs
(`swarm.py`), and plain fine-tuning on a resampled file (`pipeline.sft`, not `train`)."""
VALIDATION = "validation"  # the key of the validation set in a validation-only weights.json


def fixed_weights(method: str, sizes: Mapping[str, int]) -> dict[str, float]:
    """Weights of the methods that learn nothing: uniform, natural, validation-only."""
    names = list(sizes)
    if not names:
        raise ConfigError("no sources: give at least one training source.")
    if method == "uniform":
        return {n: 1.0 / len(names) for n in names}
    if method == "natural":
        total = sum(sizes.values())
        if total <= 0:
            raise ConfigError("natural proportions need sources with samples; all are empty.")
        return {n: sizes[n] / total for n in names}
    if method == "validation":
        if VALIDATION in sizes:
            raise ConfigError(
                f"a training source is named {VALIDATION!r}, which validation-only weights use "
                "for the validation set: rename the source."
            )
        return {**{n: 0.0 for n in names}, VALIDATION: 1.0}
    raise ConfigError(f"unknown fixed mixture {method!r}; choose uniform, natural or validation.")


# ---------------------------------------------------------------- plain training on a mixture


def plain_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Any,
    fns: StepFns,
    p: torch.Tensor,
    cfg: BilevelConfig,
    step: int,
    divisor: torch.Tensor | None = None,
    dist: Distribution = LOCAL,
) -> dict[str, Any]:
    """One fine-tuning step on L = Σ_s p_s · l̂_s (fixed p); lr_w and its schedule, clip at 1.

    ScaleBiO clips alpha·L2 at alpha (`clip_norm=None`), i.e. L2's own gradient at norm 1: the
    same clipping here. The loss is checked before the model moves (`NonFiniteLossError`).
    """
    p = p.detach().to(model_device(model))
    train = TrainBatch.of(batch, fns, p, dist, divisor)
    opt.zero_grad(set_to_none=True)
    lbar = lower_backward(model, train, fns, p, 1.0, "loss", step, dist)
    lr = set_lr(opt, cfg.lr_w, lr_multiplier(cfg.schedule, step, cfg))
    max_norm = 1.0 if cfg.clip_norm is None else cfg.clip_norm / cfg.alpha
    gnorm = dist.clip_and_step(model, opt, max_norm)
    return {
        "step": step,
        "p": p.tolist(),
        "loss": float((p * lbar).sum()),
        "loss_w": lbar.tolist(),
        "counts": train.counts.tolist(),
        "lr_w": lr,
        "grad_norm_w": gnorm,
    }


# ---------------------------------------------------------------- DoReMi


FLAT_PREFIX = "doremi_"  # a run config sets DoReMiConfig's fields as doremi_<field>


@dataclass(frozen=True)
class DoReMiConfig:
    """Group DRO weights of DoReMi (Xie et al. 2023; their defaults)."""

    eta: float = 1.0
    """Step size of the exponentiated-gradient update of the weights."""
    smoothing: float = 1e-3
    """Mixing with uniform after each update: p ← (1 − c)·p + c/K."""
    ref_steps: int = 0
    """Steps of the reference model on the uniform mixture (0: as many as the proxy's)."""

    def __post_init__(self) -> None:
        check_types(self, prefix=FLAT_PREFIX)  # messages name the keys of a run config
        check_all(
            "DoReMiConfig",
            [
                (
                    self.eta > 0 and math.isfinite(self.eta),
                    "doremi_eta must be a finite number > 0",
                ),
                (0 <= self.smoothing < 1, "doremi_smoothing must lie in [0, 1)"),
                (self.ref_steps >= 0, "doremi_ref_steps must be >= 0"),
            ],
        )


def doremi_update(p: torch.Tensor, excess: torch.Tensor, cfg: DoReMiConfig) -> torch.Tensor:
    """p' ∝ p · exp(eta · excess) (on log scale), then smoothed towards uniform."""
    logits = torch.log(p) + cfg.eta * excess.to(p.dtype)
    q = torch.softmax(logits, dim=0)
    return (1 - cfg.smoothing) * q + cfg.smoothing / p.shape[0]


def excess_sums(
    losses: torch.Tensor, ref_losses: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-source sums of max(l_i(proxy) − l_i(reference), 0) and the sample counts (K each)."""
    ex = (losses.detach() - ref_losses.detach()).clamp_min(0).to(torch.float64)
    ids = ids.to(ex.device)
    sums = torch.zeros(k, dtype=ex.dtype, device=ex.device).index_add(0, ids, ex)
    return sums, torch.bincount(ids, minlength=k).to(ex.dtype)


def doremi_step(
    proxy: nn.Module,
    reference: nn.Module,
    opt: torch.optim.Optimizer,
    p: torch.Tensor,
    batch: Any,
    fns: StepFns,
    cfg: BilevelConfig,
    dcfg: DoReMiConfig,
    step: int,
    divisor: torch.Tensor | None = None,
    dist: Distribution = LOCAL,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One DoReMi proxy step: new weights from the batch's excess losses, then a plain step of
    the proxy on the mixture they give. Returns (the new weights, the step's metrics)."""
    k = p.shape[0]
    sums = torch.zeros(k, dtype=torch.float64, device=p.device)
    n = torch.zeros(k, dtype=torch.float64, device=p.device)
    with torch.no_grad():
        for mb in micro_batches(batch):
            losses, ids = fns.source_losses(proxy, mb)
            ref, _ = fns.source_losses(reference, mb)
            values = {"loss(proxy)": losses.sum(), "loss(reference)": ref.sum()}
            check_finite(values, step, dist)
            s_mb, n_mb = excess_sums(losses, ref, ids, k)
            sums += s_mb.to(p.device)
            n += n_mb.to(p.device)
    # the mean excess of each source over the whole batch (all ranks); an absent source gets 0
    excess = dist.reduce(sums) / dist.reduce(n).clamp_min(1)
    p_new = doremi_update(p.double(), excess, dcfg).to(p.dtype)
    m = plain_step(proxy, opt, batch, fns, p_new, cfg, step, divisor, dist)
    m["excess"] = excess.tolist()
    return p_new, m


# ---------------------------------------------------------------- on a custom problem (toys)


@dataclass
class BaselineResult:
    """Weights of a method on a custom problem, its trajectory of p, and the trained theta."""

    weights: dict[str, float]
    trajectory: np.ndarray  # (steps + 1, K) weights per step
    theta: torch.Tensor


def _problem_parts(problem) -> tuple[ParamVector, ProblemFns]:
    return ParamVector(problem.init), ProblemFns(problem)


def train_on_mixture(
    problem, p: Sequence[float], config: BilevelConfig, steps: int | None = None
) -> torch.Tensor:
    """Plain training of a custom problem's model on the fixed mixture p; returns theta."""
    model, fns = _problem_parts(problem)
    pt = torch.as_tensor(list(p), dtype=problem.init.dtype)
    if pt.shape != (len(problem.names),) or not torch.isclose(pt.sum(), pt.new_tensor(1.0)):
        raise ConfigError(f"p must hold {len(problem.names)} weights summing to 1; got {p}.")
    opt = make_optimizer(model.parameters(), config.optimizer, config.lr_w, 0.0, config)
    for step in range(config.total_steps if steps is None else steps):
        plain_step(model, opt, None, fns, pt, config, step)
    return model.theta.detach()


def doremi_problem(
    problem,
    config: BilevelConfig,
    dcfg: DoReMiConfig | None = None,
    steps: int | None = None,
    ref_steps: int | None = None,
) -> BaselineResult:
    """DoReMi on a custom problem: a reference trained on uniform weights, then the proxy."""
    dcfg = dcfg or DoReMiConfig()
    steps = config.total_steps if steps is None else steps
    k = len(problem.names)
    ref = _problem_parts(problem)[0]
    ref.theta.data = train_on_mixture(problem, [1.0 / k] * k, config, ref_steps).clone()
    proxy, fns = _problem_parts(problem)
    opt = make_optimizer(proxy.parameters(), config.optimizer, config.lr_w, 0.0, config)
    p = torch.full((k,), 1.0 / k, dtype=problem.init.dtype)
    rows = [p.tolist()]
    for step in range(steps):
        p, _ = doremi_step(proxy, ref, opt, p, None, fns, config, dcfg, step)
        rows.append(p.tolist())
    traj = np.asarray(rows)
    avg = traj[1:].mean(0)
    return BaselineResult(dict(zip(problem.names, avg.tolist())), traj, proxy.theta.detach())
