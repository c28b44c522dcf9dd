"""Baselines on exact toys: fixed mixtures, plain training, and DoReMi's weight update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scalebio_core.core.baselines import (
    DoReMiConfig,
    doremi_problem,
    doremi_update,
    excess_sums,
    fixed_weights,
    train_on_mixture,
)
from scalebio_core.core.bilevel import BilevelConfig
from scalebio_core.core.problem import BilevelProblem
from scalebio_core.core.toy import weighted_mean
from scalebio_core.errors import ConfigError

GD = dict(
    optimizer="sgd",
    schedule="constant",
    weight_decay=0.0,
    warmup_ratio=0.0,
    clip_norm=math.inf,
)


def test_fixed_weights():
    sizes = {"a": 30, "b": 10}
    assert fixed_weights("uniform", sizes) == {"a": 0.5, "b": 0.5}
    assert fixed_weights("natural", sizes) == {"a": 0.75, "b": 0.25}
    assert fixed_weights("validation", sizes) == {"a": 0.0, "b": 0.0, "validation": 1.0}
    with pytest.raises(ConfigError, match="named 'validation'"):
        fixed_weights("validation", {"validation": 3, "b": 1})
    with pytest.raises(ConfigError, match="unknown fixed mixture 'popular'"):
        fixed_weights("popular", sizes)
    with pytest.raises(ConfigError, match="no sources"):
        fixed_weights("uniform", {})


def test_plain_training_reaches_the_exact_lower_solution():
    problem, _ = weighted_mean(k=4, d=4, support=2, seed=1)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    theta = train_on_mixture(problem.as_problem(), p.tolist(), BilevelConfig(lr_w=0.5, **GD), 200)
    torch.testing.assert_close(theta, problem.lower_star(p), rtol=1e-10, atol=1e-10)
    with pytest.raises(ConfigError, match="summing to 1"):
        train_on_mixture(problem.as_problem(), [0.5, 0.5, 0.5, 0.5], BilevelConfig(**GD), 1)


def test_doremi_update_by_hand():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    e = math.e
    out = doremi_update(p, torch.tensor([1.0, 0.0]), DoReMiConfig(eta=1.0, smoothing=0.0))
    torch.testing.assert_close(out, torch.tensor([e / (e + 1), 1 / (e + 1)], dtype=torch.float64))
    out = doremi_update(p, torch.tensor([1.0, 0.0]), DoReMiConfig(eta=1.0, smoothing=0.1))
    expected = 0.9 * torch.tensor([e / (e + 1), 1 / (e + 1)]) + 0.05
    torch.testing.assert_close(out, expected.double())
    # excess: per-sample max(proxy − reference, 0), summed per source
    sums, counts = excess_sums(
        torch.tensor([2.0, 1.0, 3.0]), torch.tensor([1.0, 2.0, 1.0]), torch.tensor([0, 0, 1]), 3
    )
    assert sums.tolist() == [1.0, 2.0, 0.0] and counts.tolist() == [2, 1, 0]
    with pytest.raises(ConfigError, match="doremi_smoothing"):
        DoReMiConfig(smoothing=1.0)


def test_doremi_weights_go_where_the_proxy_lags_the_reference():
    """Separate parameters per source, l_s = ½‖θ_s − c_s‖²: the reference (uniform mixture,
    trained to convergence) reaches every c_s; a fresh proxy lags most on the farthest c_s, so
    Group DRO gives the far sources the most weight — ordered by distance."""
    k, d = 4, 2
    c = torch.tensor([[1.0, 0], [2, 0], [4, 0], [8, 0]], dtype=torch.float64)
    sources = {
        f"s{s}": (lambda s: lambda th: 0.5 * ((th.view(k, d)[s] - c[s]) ** 2).sum())(s)
        for s in range(k)
    }
    problem = BilevelProblem(
        sources, val_loss=lambda th: (th**2).sum(), init=torch.zeros(k * d, dtype=torch.float64)
    )
    cfg = BilevelConfig(lr_w=0.05, total_steps=100, **GD)
    result = doremi_problem(problem, cfg, steps=100, ref_steps=3000)
    w = np.array(list(result.weights.values()))
    assert w.sum() == pytest.approx(1.0)
    assert np.all(np.diff(w) > 0), result.weights
    assert result.trajectory.shape == (101, k)
    assert result.trajectory[0] == pytest.approx([0.25] * 4)
    # equal distances: the weights stay uniform (no source lags more than another)
    c[:] = torch.tensor([[3.0, 0], [0, 3], [-3, 0], [0, -3]], dtype=torch.float64)
    same = doremi_problem(problem, cfg, steps=50, ref_steps=3000)
    assert list(same.weights.values()) == pytest.approx([0.25] * 4, abs=1e-9)
