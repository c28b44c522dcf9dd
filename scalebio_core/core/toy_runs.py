"""Runs of ScaleBiO on the toy problems, measured against their exact solutions.

These are the experiments of notebook 01 and of the exact-solution tests: one code path, with the
preset deciding the sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problem import BilevelResult, loglog_slope, solve
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


__all__ = ["ToyRun", "BiasSweep", "run_toy", "bias_sweep", "condition_sweep", "steps_to_tolerance"]
