"""State a bilevel data-reweighting problem with plain loss functions and solve it in one call.

    problem = BilevelProblem(sources={"a": f_a, "b": f_b}, val_loss=g, init=torch.zeros(3))
    result = solve(problem, BilevelConfig(alpha=100, lr_w=0.05, lr_u=0.05, lr_lam=0.05,
                                          total_steps=2000))
    result.weights          # {"a": 0.73, "b": 0.27}
    result.trajectory["p"]  # (steps, K) array of weights per step

Each source function maps the parameters theta to the mean loss of that source, l̄_s(theta); the
validation function maps theta to L1(theta). The same `scalebio_step` that trains language models
runs here: the problem becomes a one-parameter-tensor module and a full batch of K "samples".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .bilevel import BilevelConfig, BilevelState, check_source_names, init_state, scalebio_step
from .errors import ConfigError

LossFn = Callable[[torch.Tensor], torch.Tensor]

TRAJECTORY_KEYS = ("L1", "L2_w", "L2_u", "gap", "alpha")


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

    @property
    def theta(self) -> torch.Tensor:
        """The final upper-level parameters w."""
        return self.state.w.theta.detach()


def solve(
    problem: BilevelProblem,
    config: BilevelConfig,
    steps: int | None = None,
    lam_init: torch.Tensor | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> BilevelResult:
    """Run `steps` (default config.total_steps) ScaleBiO steps on a custom problem.

    The trajectory holds, per step, p (before the step's update; a last row holds the final p),
    L1, L2_w, L2_u, the gap L2_w − L2_u and alpha. `callback(metrics)` is called after each step
    (a live plot, a progress bar).
    """
    steps = config.total_steps if steps is None else steps
    if steps < 1:
        raise ConfigError("steps must be >= 1.")
    w, u = ParamVector(problem.init), ParamVector(problem.init)
    state = init_state(w, u, problem.names, config, lam=lam_init)
    fns = ProblemFns(problem)
    rows: dict[str, list] = {k: [] for k in ("p", *TRAJECTORY_KEYS)}
    for _ in range(steps):
        m = scalebio_step(state, None, None, fns)
        for k in rows:
            rows[k].append(m[k])
        if callback is not None:
            callback(m)
    rows["p"].append(state.p.tolist())
    traj = {k: np.asarray(v, dtype=float) for k, v in rows.items()}
    return BilevelResult(trajectory=traj, weights=state.weights(), state=state)


def loglog_slope(x: Iterable[float], y: Iterable[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = np.log(np.asarray(list(x), float)), np.log(np.asarray(list(y), float))
    if not (np.all(np.isfinite(lx)) and np.all(np.isfinite(ly))):
        raise ValueError("loglog_slope needs positive finite values.")
    return float(np.polyfit(lx, ly, 1)[0])


__all__ = ["BilevelProblem", "BilevelResult", "ParamVector", "solve", "loglog_slope"]
