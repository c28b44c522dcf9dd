"""Exact-solution tests: ScaleBiO against independently computed optima of the convex toys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scalebio_core.core.toy import (
    DT,
    conditioned_quadratic,
    exact_weighted_mean,
    least_squares,
    weighted_mean,
)
from scalebio_core.core.toy_runs import bias_sweep, run_toy
from scalebio_core.errors import ConfigError

# The settings below are the ones docs/toys.md quotes.
ALPHA_A, STEPS_A, LR_LAM_A = 100.0, 2000, 2.0
ALPHA_B, STEPS_B, LR_LAM_B = 10.0, 3000, 0.5
LR_LAM_C = 0.5
BIAS_ALPHAS, BIAS_STEPS = [10.0, 30.0, 100.0, 300.0, 1000.0], 1000


def test_exact_solver_agrees_with_enumeration_and_analytic_answer():
    prob, p_face = weighted_mean()
    p_enum = exact_weighted_mean(prob)
    p_slsqp, _ = prob.exact()
    np.testing.assert_allclose(p_enum, p_face, atol=1e-10)
    np.testing.assert_allclose(p_slsqp, p_face, atol=1e-8)
    assert (p_face == 0).sum() == 2


def test_exact_solver_is_a_minimum_on_the_simplex():
    prob = least_squares()
    p_star, f_star = prob.exact()
    rng = np.random.default_rng(0)
    for _ in range(200):
        q = np.clip(p_star + 0.01 * rng.normal(size=len(p_star)), 0, None)
        q /= q.sum()
        assert float(prob.bilevel_objective(torch.tensor(q, dtype=DT))) >= f_star - 1e-15


def test_weighted_mean_reaches_exact_weights_and_zeros():
    """(b): max |p − p*| < 1e-3 and the weights that should be zero end below 1e-3."""
    prob, p_face = weighted_mean()
    run = run_toy(prob, ALPHA_B, STEPS_B, LR_LAM_B)
    p = run.p[-1]
    assert np.abs(p - p_face).max() < 1e-3
    zeros = p_face == 0
    assert p[zeros].max() < 1e-3
    # the error keeps falling: last tenth below the first tenth
    assert run.p_err[-1] < run.p_err[STEPS_B // 10] < run.p_err[0]


def test_weighted_mean_surrogate_is_exact_for_every_alpha():
    prob, p_face = weighted_mean()
    for alpha in (0.1, 1.0, 10.0, 1000.0):
        np.testing.assert_allclose(prob.exact(alpha=alpha)[0], p_face, atol=1e-8)


def test_least_squares_upper_objective_within_1e4_relative():
    """(a): F(p_final) within 1e-4 relative of F*; the most shifted source gets least weight."""
    prob = least_squares()
    run = run_toy(prob, ALPHA_A, STEPS_A, LR_LAM_A)
    gap = run.f_err()[-1]
    assert 0 <= gap < 1e-4 or abs(gap) < 1e-12
    assert np.abs(run.p[-1] - run.p_alpha).max() < 1e-8  # converged to the surrogate's minimiser
    w = run.final_weights
    assert min(w, key=w.get) == "shift1_noise0.1"


@pytest.mark.parametrize("family", ["least_squares", "conditioned_quadratic"])
def test_surrogate_bias_shrinks_like_one_over_alpha(family):
    if family == "least_squares":
        prob, lr_lam = least_squares(), LR_LAM_A
    else:
        prob, lr_lam = conditioned_quadratic(kappa=10), LR_LAM_C
    sweep = bias_sweep(prob, BIAS_ALPHAS, BIAS_STEPS, lr_lam)
    assert -1.3 <= sweep.slope_exact <= -0.7
    assert -1.3 <= sweep.slope_scalebio <= -0.7
    # ScaleBiO's end points are the surrogate's minimisers
    np.testing.assert_allclose(sweep.bias_scalebio, sweep.bias_exact, rtol=0.05)


def test_toy_bad_inputs():
    with pytest.raises(ConfigError, match="one value per source"):
        least_squares(k=3)
    with pytest.raises(ConfigError, match="condition number"):
        conditioned_quadratic(kappa=0.5)
    with pytest.raises(ConfigError, match="mismatched lengths"):
        p = least_squares()
        type(p)(A=p.A, b=p.b[:2], c=p.c, G=p.G, g=p.g, g0=p.g0, names=p.names)
    with pytest.raises(ConfigError, match="no samples"):
        least_squares(n=0)
