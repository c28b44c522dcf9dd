"""Runs of ScaleBiO on the toy problems, measured against their exact solutions.

These are the experiments of notebook 01 and of the exact-solution tests: one code path, with the
preset deciding the sizes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NonFiniteLossError
from .bilevel import BilevelConfig, init_state, scalebio_step
from .problem import BilevelResult, ParamVector, loglog_slope, solve
from .toy import QuadraticBilevel, conditioned_quadratic, objective_error, p_error, toy_config


@dataclass
class ToyRun:
    """ScaleBiO on a toy beside its exact solution: p*, F*, the surrogate's p_α, errors by step."""

    problem: QuadraticBilevel
    alpha: float
    p_star: np.ndarray
    f_star: float
    p_alpha: np.ndarray
    result: BilevelResult

    @property
    def p(self) -> np.ndarray:
        return self.result.trajectory["p"]

    @property
    def p_err(self) -> np.ndarray:
        """max_s |p_t,s − p*_s| for each step t (row 0 = start)."""
        return p_error(self.p, self.p_star)

    @property
    def p_err_alpha(self) -> np.ndarray:
        """max_s |p_t,s − p_α,s|: distance to what ScaleBiO actually minimises."""
        return p_error(self.p, self.p_alpha)

    def f_err(self, every: int = 1) -> np.ndarray:
        """Relative upper-objective gap (F(p_t) − F*)/|F*| at every `every`-th step."""
        return objective_error(self.problem, self.p[::every], self.f_star)

    @property
    def final_weights(self) -> dict[str, float]:
        return self.result.weights


def run_toy(
    problem: QuadraticBilevel,
    alpha: float,
    steps: int,
    lr_lam: float = 0.5,
    exact: tuple[np.ndarray, float] | None = None,
    tau: float = 1.0,
) -> ToyRun:
    """ScaleBiO (plain gradient descent, `toy.toy_config`) on a toy, with its exact solutions."""
    p_star, f_star = exact if exact is not None else problem.exact()
    p_alpha, _ = problem.exact(alpha=alpha) if tau == 1.0 else (p_star, f_star)
    result = solve(problem.as_problem(), toy_config(problem, alpha, steps, lr_lam, tau=tau))
    return ToyRun(problem, alpha, p_star, f_star, p_alpha, result)


@dataclass
class BiasSweep:
    """Bias of the penalty surrogate against alpha: exact minimisers and ScaleBiO's end points."""

    alphas: np.ndarray
    bias_exact: np.ndarray
    bias_scalebio: np.ndarray

    @property
    def slope_exact(self) -> float:
        return loglog_slope(self.alphas, self.bias_exact)

    @property
    def slope_scalebio(self) -> float:
        return loglog_slope(self.alphas, self.bias_scalebio)


def bias_sweep(problem: QuadraticBilevel, alphas, steps: int, lr_lam: float = 0.5) -> BiasSweep:
    """For each alpha: ‖p_α − p*‖_∞ (exact surrogate minimiser) and ‖p_final − p*‖_∞ (ScaleBiO)."""
    exact = problem.exact()
    runs = [run_toy(problem, a, steps, lr_lam, exact=exact) for a in alphas]
    return BiasSweep(
        alphas=np.asarray(alphas, float),
        bias_exact=np.array([p_error(r.p_alpha[None], exact[0])[0] for r in runs]),
        bias_scalebio=np.array([r.p_err[-1] for r in runs]),
    )


def steps_to_tolerance(errors: np.ndarray, tol: float) -> int | None:
    """First step after which the error stays below tol (None if it never does)."""
    above = np.flatnonzero(np.asarray(errors) >= tol)
    if len(above) == 0:
        return 0
    return None if above[-1] == len(errors) - 1 else int(above[-1] + 1)


def condition_sweep(
    kappas, alpha: float, steps: int, lr_lam: float = 0.5, tol: float = 1e-3, seed: int = 0
) -> dict[str, np.ndarray]:
    """Steps ScaleBiO needs to bring p within `tol` of p_α on (c), for each condition number."""
    out = []
    for kappa in kappas:
        run = run_toy(conditioned_quadratic(kappa=kappa, seed=seed), alpha, steps, lr_lam)
        n = steps_to_tolerance(run.p_err_alpha, tol)
        out.append(np.nan if n is None else n)
    return {"kappa": np.asarray(kappas, float), "steps": np.asarray(out, float)}


def converges(
    problem: QuadraticBilevel, c: BilevelConfig, target: np.ndarray, tol: float = 1e-3
) -> bool:
    """Whether ScaleBiO with config c ends within tol of target (a diverging run raises, and
    does not converge)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = solve(problem.as_problem(), c).trajectory["p"][-1]
    except NonFiniteLossError:
        return False
    return bool(np.isfinite(p).all() and np.abs(p - target).max() < tol)


def alpha_tradeoff(
    problem: QuadraticBilevel,
    alphas: Sequence[float],
    steps: int,
    lr_lam: float,
    step_multiples: Sequence[float],
    p_star: np.ndarray,
) -> dict[str, list]:
    """What a larger α buys and costs on a toy, per α (lists under these keys): the bias
    ‖p_α − p*‖_∞ ("bias"), the errors to p* of a float64 and a float32 run ("err64", "err32"),
    the λ updates until ‖p − p_α‖_∞ < 1e-3 ("steps"), the largest stable model step: the largest
    of `step_multiples` × the 1/L step whose run still converges to p_α ("stable"), and the 1/L
    step the runs take ("lr_w")."""
    tradeoff = {
        "alpha": [],
        "bias": [],
        "err64": [],
        "err32": [],
        "steps": [],
        "stable": [],
        "lr_w": [],
    }
    for a in alphas:
        p_a, _ = problem.exact(alpha=a)
        c = toy_config(problem, a, steps, lr_lam)
        p64 = solve(problem.as_problem(), c).trajectory["p"]
        p32 = solve(
            problem.as_problem(init=torch.zeros(problem.d, dtype=torch.float32)), c
        ).trajectory["p"]
        ok = [
            m
            for m in step_multiples
            if converges(problem, dataclasses.replace(c, lr_w=m * c.lr_w, lr_u=m * c.lr_u), p_a)
        ]
        for key, value in (
            ("alpha", a),
            ("bias", np.abs(p_a - p_star).max()),
            ("err64", np.abs(p64[-1] - p_star).max()),
            ("err32", np.abs(p32[-1] - p_star).max()),
            ("steps", steps_to_tolerance(np.abs(p64 - p_a).max(axis=1), 1e-3)),
            ("stable", max(ok, default=0) * c.lr_w),
            ("lr_w", c.lr_w),
        ):
            tradeoff[key].append(value)
    return tradeoff


class LeastSquaresMinibatches:
    """StepFns of the stochastic toy (a): a batch is (x, y, source ids), a val batch (x, y);
    `ridge` as in `toy.least_squares`."""

    def __init__(self, ridge: float = 1e-3):
        self.ridge = ridge

    def source_ids(self, batch):
        return batch[2]

    def source_losses(self, model, batch):
        x, y, ids = batch
        theta = model.theta
        return 0.5 * (x @ theta - y) ** 2 + 0.5 * self.ridge * theta @ theta, ids

    def val_loss(self, model, val_batch):
        x, y = val_batch
        return 0.5 * ((x @ model.theta - y) ** 2).mean()


def stochastic_run(
    problem: QuadraticBilevel,
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    val: tuple[np.ndarray, np.ndarray],
    p_star: np.ndarray,
    alpha: float,
    lr_lam: float,
    schedule: str,
    steps: int,
    seed: int,
    per_source: int = 8,
    val_size: int = 32,
) -> np.ndarray:
    """ScaleBiO on minibatches of toy (a) (`toy.least_squares_samples`: `samples` per source
    and the validation pair `val`): `per_source` samples of each source and `val_size` of the
    validation set per step, drawn by a generator seeded with `seed`, λ's step following
    `schedule`; returns ‖p − p*‖_∞ after each step."""
    x_val, y_val = val
    gen = torch.Generator().manual_seed(seed)
    c = dataclasses.replace(
        toy_config(problem, alpha, steps, lr_lam), lam_schedule=schedule, warmup_ratio=0.0
    )
    zeros = torch.zeros(problem.d, dtype=torch.float64)
    state = init_state(ParamVector(zeros), ParamVector(zeros), problem.names, c)
    xs = [torch.tensor(x) for x, _ in samples]
    ys = [torch.tensor(y) for _, y in samples]
    xv, yv = torch.tensor(x_val), torch.tensor(y_val)
    errors = []
    for _ in range(steps):
        pick = [torch.randint(len(x), (per_source,), generator=gen) for x in xs]
        batch = (
            torch.cat([x[i] for x, i in zip(xs, pick)]),
            torch.cat([y[i] for y, i in zip(ys, pick)]),
            torch.arange(len(xs)).repeat_interleave(per_source),
        )
        v = torch.randint(len(xv), (val_size,), generator=gen)
        scalebio_step(state, batch, (xv[v], yv[v]), LeastSquaresMinibatches())
        errors.append(float(np.abs(state.p.detach().numpy() - p_star).max()))
    return np.array(errors)


__all__ = [
    "ToyRun",
    "BiasSweep",
    "run_toy",
    "bias_sweep",
    "condition_sweep",
    "steps_to_tolerance",
    "converges",
    "alpha_tradeoff",
    "LeastSquaresMinibatches",
    "stochastic_run",
]
