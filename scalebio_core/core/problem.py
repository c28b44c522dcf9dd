"""State a bilevel data-reweighting problem with plain loss functions and solve it in one call.

    problem = BilevelProblem(sources={"a": f_a, "b": f_b}, val_loss=g, init=torch.zeros(3))
    result = solve(problem)   # step sizes from the problem's curvature (`AutoSteps`); or
    result = solve(problem, BilevelConfig(alpha=100, lr_w=0.05, lr_u=0.05, lr_lam=0.05,
                                          total_steps=2000))
    result.weights          # {"a": 0.73, "b": 0.27}
    result.trajectory["p"]  # (steps, K) array of weights per step

Each source function maps the parameters theta to the mean loss of that source, l̄_s(theta); the
validation function maps theta to L1(theta). The same `scalebio_step` that trains language models
runs here: the problem becomes a one-parameter-tensor module and a full batch of K "samples".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import messages
from ..errors import ConfigError
from .bilevel import BilevelConfig, BilevelState, check_source_names, init_state, scalebio_step

LossFn = Callable[[torch.Tensor], torch.Tensor]

TRAJECTORY_KEYS = ("L1", "L2_w", "L2_u", "gap", "alpha", "lr_lam", "loss_w", "loss_u")


class ParamVector(nn.Module):
    """A module holding one parameter tensor `theta` (the model of a custom problem)."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.detach().clone())


@dataclass
class BilevelProblem:
    """A custom problem: per-source mean losses l̄_s(theta), a validation loss L1(theta), a start."""

    sources: Mapping[str, LossFn] | Iterable[tuple[str, LossFn]]
    val_loss: LossFn
    init: torch.Tensor
    names: tuple[str, ...] = field(init=False)
    fns: tuple[LossFn, ...] = field(init=False)

    def __post_init__(self) -> None:
        items = list(self.sources.items() if isinstance(self.sources, Mapping) else self.sources)
        self.names = check_source_names(n for n, _ in items)
        self.fns = tuple(f for _, f in items)
        if not all(callable(f) for f in self.fns) or not callable(self.val_loss):
            raise ConfigError("every source loss and val_loss must be a callable of theta.")
        if not isinstance(self.init, torch.Tensor) or not self.init.is_floating_point():
            raise ConfigError("init must be a floating-point torch.Tensor (the starting theta).")

    # StepFns: a "batch" is ignored, every step sees every source in full
    def source_losses(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        values = []
        for name, f in zip(self.names, self.fns):
            v = torch.as_tensor(f(model.theta))
            if v.numel() != 1:
                raise ValueError(
                    f"source {name!r}: its loss function returned shape {tuple(v.shape)}; it "
                    "must return the scalar mean loss of the source."
                )
            values.append(v.reshape(()))
        return torch.stack(values), torch.arange(len(values))

    def val_loss_of(self, model: nn.Module, val_batch: Any) -> torch.Tensor:
        return self.val_loss(model.theta)


class ProblemFns:
    """The StepFns of a BilevelProblem: every step sees every source in full."""

    def __init__(self, problem: BilevelProblem):
        self.source_losses = problem.source_losses
        self.val_loss = problem.val_loss_of
        self.source_ids = lambda batch: torch.arange(len(problem.names))


@dataclass
class BilevelResult:
    """What `solve` returns: the trajectory (arrays over steps), final weights and the state."""

    trajectory: dict[str, np.ndarray]
    weights: dict[str, float]
    state: BilevelState
    warning: str | None = None
    """The collapse warning of the run (`collapse`), or None."""

    @property
    def theta(self) -> torch.Tensor:
        """The final upper-level parameters w."""
        return self.state.w.theta.detach()


AUTO_STEPS = 3000
"""Steps of `solve` without a config."""
AUTO_ALPHAS = (10.0, 100.0, 1000.0, 10000.0)
"""The penalty weights α of `solve` without a config, each for an equal share of the steps: the
surrogate's bias shrinks like 1/α, and a run that starts at a small α starts well conditioned."""
AUTO_ALPHA_MAX = {torch.float64: 1e4, torch.float32: 1e2}
"""The largest α of AUTO_ALPHAS a problem's precision carries: α·(l̄(w) − l̄(u)) loses log10(α)
of its digits (about 16 in float64, 7 in float32; lower precisions: 100)."""
AUTO_LAM_LR, AUTO_LAM_BETAS = 0.05, (0.9, 0.99)
"""λ's steps without a config: AdamW (the paper's), whose steps are about lr in λ whatever the
losses' scale, decaying to 0 on a cosine over the run. The second moment forgets within ~100
steps (0.99, not 0.999), so λ's steps do not stall once its gradient has shrunk."""
PINNED = 1e-4
"""A weight closer than this to 0 is pinned (the softmax's gradient vanishes there)."""


def curvature(f: LossFn, theta: torch.Tensor, iters: int = 30, seed: int = 0) -> float:
    """The largest Hessian eigenvalue of f at theta (its absolute value), by power iteration on
    Hessian-vector products (double backward)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
    v = v / v.norm()
    value = 0.0
    for _ in range(iters):
        th = theta.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(f(th), th, create_graph=True)
        if not grad.requires_grad:  # linear in theta: no curvature
            return 0.0
        (hv,) = torch.autograd.grad((grad * v).sum(), th)
        value, norm = float((v * hv).sum()), hv.norm()
        if norm == 0:
            return 0.0
        v = hv / norm
    return abs(value)


@dataclass(frozen=True)
class AutoSteps:
    """The steps of `solve` without a config, from the problem's own curvature.

    u and w take gradient steps of 1/L of their own problems: lr_u = 1/(α·L_A) and
    lr_w = 1/(L_G + α·L_A), with L_A the largest curvature of a source loss and L_G that of the
    validation loss, measured at `init` (`curvature`), so both track their targets within a few
    steps. λ moves on a slower time scale (AUTO_LAM_LR). α steps through AUTO_ALPHAS."""

    la: float
    lg: float
    steps: int
    dtype: torch.dtype = torch.float64

    @classmethod
    def of(cls, problem: BilevelProblem, steps: int) -> AutoSteps:
        la = max(curvature(f, problem.init) for f in problem.fns)
        lg = curvature(problem.val_loss, problem.init)
        if not la > 0 or not math.isfinite(la + lg):
            raise ConfigError(
                f"the source losses have no finite curvature at init (largest {la:.3g}): the "
                "step sizes cannot be read from it; give solve a BilevelConfig with lr_w, "
                "lr_u and lr_lam."
            )
        return cls(la, lg, steps, problem.init.dtype)

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(a for a in AUTO_ALPHAS if a <= AUTO_ALPHA_MAX.get(self.dtype, 1e2))

    def config(self, step: int) -> BilevelConfig:
        """The step's config (α and the models' rates change with the stage)."""
        per = max(1, self.steps // len(self.alphas))
        a = self.alphas[min(step // per, len(self.alphas) - 1)]
        return BilevelConfig(
            alpha=a,
            lr_u=1.0 / (a * self.la),
            lr_w=1.0 / (self.lg + a * self.la),
            lr_lam=AUTO_LAM_LR,
            optimizer="sgd",
            lam_optimizer="adamw",
            betas=AUTO_LAM_BETAS,
            weight_decay=0.0,
            schedule="constant",
            lam_schedule="cosine",
            warmup_ratio=0.0,
            total_steps=self.steps,
            clip_norm=math.inf,
        )


def collapse(trajectory: Mapping[str, np.ndarray], names: Sequence[str]) -> str | None:
    """A warning when p collapsed onto the simplex's boundary where it should not: a weight
    pinned within PINNED of 0 over the last tenth of the run, while the gradient in p,
    −α(d_s − p·d) with d = l̄(w) − l̄(u), pulls it back in: the softmax's gradient vanishes
    there, so nothing recovers. A weight at 0 that the gradient pushes out is a true zero."""
    p, d = trajectory["p"][:-1], trajectory["loss_w"] - trajectory["loss_u"]
    alpha = trajectory["alpha"]
    n = len(p)
    if n < 8:
        return None
    pull = -alpha[:, None] * (d - (p * d).sum(1, keepdims=True))
    tail = slice(n - max(1, n // 10), n)
    scale = float(np.abs(pull[tail]).max())
    for s, name in enumerate(names):
        pinned = p[:, s] < PINNED
        if not pinned[tail].all() or pull[tail, s].mean() <= 1e-3 * scale + 1e-12:
            continue
        since = n - int(np.argmin(pinned[::-1])) if not pinned.all() else 0
        return (
            f"p collapsed onto the boundary of the simplex: {name!r} has weight "
            f"{p[-1, s]:.1e} since step {since}, while its gradient pulls it back in (the "
            "softmax's gradient vanishes there, so nothing recovers). λ's step was too large "
            "for the models': lower lr_lam (e.g. 10×), or call solve(problem) without a config "
            "(steps from the problem's curvature)."
        )
    return None


def solve(
    problem: BilevelProblem,
    config: BilevelConfig | None = None,
    steps: int | None = None,
    lam_init: torch.Tensor | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> BilevelResult:
    """Run ScaleBiO steps on a custom problem: `steps` (default config.total_steps, or
    AUTO_STEPS) with `config`, or, without one, with the models' step sizes from the problem's
    own curvature, λ on a slower time scale and α growing through AUTO_ALPHAS (`AutoSteps`: no
    learning rate to choose).

    The trajectory holds, per step, p (before the step's update; a last row holds the final p),
    L1, L2_w, L2_u, the gap L2_w − L2_u, alpha, lr_lam and the per-source losses loss_w and
    loss_u. `callback(metrics)` is called after each step (a live plot, a progress bar). A
    collapse onto the simplex's boundary is warned of (`collapse`) and kept in `result.warning`.
    """
    if steps is None:
        steps = AUTO_STEPS if config is None else config.total_steps
    if steps < 1:
        raise ConfigError("steps must be >= 1.")
    auto = AutoSteps.of(problem, steps) if config is None else None
    w, u = ParamVector(problem.init), ParamVector(problem.init)
    state = init_state(w, u, problem.names, config or auto.config(0), lam=lam_init)
    fns = ProblemFns(problem)
    rows: dict[str, list] = {k: [] for k in ("p", *TRAJECTORY_KEYS)}
    for t in range(steps):
        if auto is not None:
            state.config = auto.config(t)
        m = scalebio_step(state, None, None, fns)
        for k in rows:
            rows[k].append(m[k])
        if callback is not None:
            callback(m)
    rows["p"].append(state.p.tolist())
    traj = {k: np.asarray(v, dtype=float) for k, v in rows.items()}
    warning = collapse(traj, problem.names)
    if warning:
        messages.warn(warning, stacklevel=2)
    return BilevelResult(trajectory=traj, weights=state.weights(), state=state, warning=warning)


def loglog_slope(x: Iterable[float], y: Iterable[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = np.log(np.asarray(list(x), float)), np.log(np.asarray(list(y), float))
    if not (np.all(np.isfinite(lx)) and np.all(np.isfinite(ly))):
        raise ValueError("loglog_slope needs positive finite values.")
    return float(np.polyfit(lx, ly, 1)[0])


__all__ = [
    "BilevelProblem",
    "BilevelResult",
    "ParamVector",
    "curvature",
    "solve",
    "loglog_slope",
]
