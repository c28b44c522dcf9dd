"""Unit tests of the step: the weighted loss, the λ-gradient, schedules, determinism, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scalebio_core import (
    BilevelConfig,
    BilevelProblem,
    ConfigError,
    NonFiniteLossError,
    init_state,
    lam_grad,
    scalebio_step,
    solve,
    warmup_cosine,
    weighted_lower_loss,
)
from scalebio_core.core.problem import ParamVector


def test_weighted_loss_by_hand():
    # sources 0,0,2 present; source 1 absent; p = (0.5, 0.3, 0.2)
    losses = torch.tensor([1.0, 3.0, 5.0])
    ids = torch.tensor([0, 0, 2])
    p = torch.tensor([0.5, 0.3, 0.2])
    l2, est, counts = weighted_lower_loss(losses, ids, p)
    # source 0 mean = 2, source 2 mean = 5, source 1 contributes nothing
    assert float(l2) == pytest.approx(0.5 * 2.0 + 0.2 * 5.0)
    assert est.tolist() == pytest.approx([2.0, 0.0, 5.0])
    assert counts.tolist() == [2.0, 0.0, 1.0]


def test_weighted_loss_expected_counts_and_reduce():
    losses = torch.tensor([1.0, 3.0, 5.0])
    ids = torch.tensor([0, 0, 2])
    p = torch.tensor([0.5, 0.3, 0.2])
    # expected counts as divisor: sums / expected
    l2, est, _ = weighted_lower_loss(losses, ids, p, divisor=torch.tensor([4.0, 1.0, 2.0]))
    assert est.tolist() == pytest.approx([1.0, 0.0, 2.5])
    assert float(l2) == pytest.approx(0.5 * 1.0 + 0.2 * 2.5)
    # a reduce hook that doubles (two identical ranks): counts and sums double, means unchanged
    l2r, estr, counts = weighted_lower_loss(losses, ids, p, reduce=lambda t: 2 * t)
    assert counts.tolist() == [4.0, 0.0, 2.0]
    assert estr.tolist() == pytest.approx([2.0, 0.0, 5.0])
    # this rank's share of the loss: local sums over global counts
    assert float(l2r) == pytest.approx(0.5 * 4.0 / 4 + 0.2 * 5.0 / 2)


def test_weighted_loss_rejects_bad_shapes():
    p = torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="one source id each"):
        weighted_lower_loss(torch.ones(3), torch.zeros(2, dtype=torch.long), p)
    with pytest.raises(ValueError, match=r"source ids must lie in \[0, 2\)"):
        weighted_lower_loss(torch.ones(2), torch.tensor([0, 5]), p)
    with pytest.raises(ConfigError, match="no samples"):
        weighted_lower_loss(torch.ones(2), torch.tensor([0, 0]), p, divisor=torch.tensor([2.0, 0]))


@pytest.mark.parametrize("seed", range(5))
def test_lam_grad_matches_autograd(seed):
    g = torch.Generator().manual_seed(seed)
    k = 2 + seed
    lam = torch.randn(k, generator=g, dtype=torch.float64, requires_grad=True)
    lw, lu = (
        torch.rand(k, generator=g, dtype=torch.float64),
        torch.rand(k, generator=g, dtype=torch.float64),
    )
    alpha = 3.7
    p = torch.softmax(lam, 0)
    obj = alpha * ((p * lw).sum() - (p * lu).sum())
    (auto,) = torch.autograd.grad(obj, lam)
    closed = lam_grad(p.detach(), lw, lu, alpha)
    torch.testing.assert_close(closed, auto, rtol=1e-12, atol=1e-12)


def test_lam_grad_sign_worse_w_loses_weight():
    p = torch.full((3,), 1 / 3)
    # w is worse than u on source 0 only: its gradient is positive, so descent lowers its logit
    g = lam_grad(p, torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]), alpha=1.0)
    assert g[0] > 0 and g[1] < 0 and g[2] < 0


def test_warmup_cosine_schedule():
    total, warm = 100, 0.1
    vals = [warmup_cosine(s, total, warm) for s in range(total + 1)]
    assert vals[0] == pytest.approx(0.1) and vals[9] == pytest.approx(1.0)
    assert vals[10] == pytest.approx(1.0)
    assert vals[55] == pytest.approx(0.5)
    assert vals[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(vals[10:], vals[11:]))
    assert warmup_cosine(100, 100, 0.0, min_ratio=0.1) == pytest.approx(0.1)


def test_alpha_tau_growth():
    cfg = BilevelConfig(alpha=2.0, tau=1.5, tau_every=10, alpha_max=5.0)
    assert cfg.alpha_at(0) == 2.0 and cfg.alpha_at(9) == 2.0
    assert cfg.alpha_at(10) == pytest.approx(3.0)
    assert cfg.alpha_at(20) == pytest.approx(4.5)
    assert cfg.alpha_at(30) == 5.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"alpha": -1.0}, "alpha must be a finite number > 0"),
        ({"tau": 0.5}, "tau must be >= 1"),
        ({"lr_lam": 0.0}, "learning rates must be > 0"),
        ({"optimizer": "adam"}, "optimizer must be one of"),
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio must lie in \[0, 1\)"),
        ({"total_steps": 0}, "total_steps must be >= 1"),
        ({"alpha": 10.0, "alpha_max": 5.0}, "alpha_max must be >= alpha"),
    ],
)
def test_bad_config_messages(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BilevelConfig(**kwargs)


def _quad_problem(names=("a", "b")):
    c = {
        "a": torch.tensor([1.0, 0.0]),
        "b": torch.tensor([0.0, 1.0]),
        "c": torch.tensor([1.0, 1.0]),
    }
    return BilevelProblem(
        sources=[(n, (lambda v: lambda th: ((th - v) ** 2).sum())(c[n])) for n in names],
        val_loss=lambda th: ((th - torch.tensor([0.9, 0.1])) ** 2).sum(),
        init=torch.zeros(2),
    )


def test_problem_errors():
    with pytest.raises(ConfigError, match="no sources"):
        _quad_problem(names=())
    with pytest.raises(ConfigError, match=r"duplicate source names \['a'\]"):
        _quad_problem(names=("a", "b", "a"))
    with pytest.raises(ConfigError, match="init must be a floating-point"):
        BilevelProblem(
            sources={"a": lambda th: th.sum()},
            val_loss=lambda th: th.sum(),
            init=torch.zeros(2, dtype=torch.long),
        )
    bad = BilevelProblem(
        sources={"a": lambda th: th, "b": lambda th: th.sum()},
        val_loss=lambda th: th.sum(),
        init=torch.zeros(2),
    )
    with pytest.raises(ValueError, match="source 'a'.*must return the scalar mean loss"):
        solve(bad, BilevelConfig(total_steps=2))
    with pytest.raises(ConfigError, match="lam has shape"):
        solve(_quad_problem(), BilevelConfig(total_steps=2), lam_init=torch.zeros(3))


def test_nan_loss_stops_and_leaves_state_untouched():
    calls = {"n": 0}

    def val(th):
        calls["n"] += 1
        return (th**2).sum() * (math.nan if calls["n"] >= 3 else 1.0)

    prob = BilevelProblem(
        sources={"a": lambda th: (th**2).sum(), "b": lambda th: (th - 1).abs().sum()},
        val_loss=val,
        init=torch.ones(2),
    )
    w, u = ParamVector(prob.init), ParamVector(prob.init)
    state = init_state(w, u, prob.names, BilevelConfig(total_steps=10, lr_w=0.1, lr_u=0.1))
    from scalebio_core.core.problem import ProblemFns

    fns = ProblemFns(prob)
    scalebio_step(state, None, None, fns)
    scalebio_step(state, None, None, fns)
    before = {
        k: v.clone() for k, v in [("w", w.theta.data), ("u", u.theta.data), ("lam", state.lam.data)]
    }
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 2: L1 = nan") as e:
        scalebio_step(state, None, None, fns)
    assert e.value.step == 2
    assert state.step == 2
    for name, t in [("w", w.theta.data), ("u", u.theta.data), ("lam", state.lam.data)]:
        assert torch.equal(before[name], t), name


def test_a_non_finite_loss_on_another_process_stops_every_process_before_any_update():
    """Processes share the verdict (a sum over ranks of the bad-loss count), so a healthy rank
    raises at the same check as the one whose loss is NaN instead of waiting for it in the next
    collective. Here `reduce` stands for a sum with another rank that found one bad loss."""
    prob = _quad_problem()
    w, u = ParamVector(prob.init), ParamVector(prob.init)
    state = init_state(w, u, prob.names, BilevelConfig(total_steps=10, lr_w=0.1, lr_u=0.1))
    from scalebio_core.core.distributed import Local
    from scalebio_core.core.problem import ProblemFns

    class TwoRanks(Local):  # one process standing for two: `reduce` is the sum with the other
        world = 2

        def __init__(self, reduce):
            super().__init__()
            self.reduce = reduce

    before = [t.clone() for t in (w.theta.data, u.theta.data, state.lam.data)]
    with pytest.raises(NonFiniteLossError, match=r"step 0: L2\(u\) on another process = nan"):
        scalebio_step(state, None, None, ProblemFns(prob), TwoRanks(lambda t: t + 1))
    assert state.step == 0
    for old, new in zip(before, (w.theta.data, u.theta.data, state.lam.data)):
        assert torch.equal(old, new)
    scalebio_step(state, None, None, ProblemFns(prob), TwoRanks(lambda t: t))  # none failed: runs
    assert state.step == 1


def test_inf_lower_loss_is_reported():
    prob = BilevelProblem(
        sources={"a": lambda th: th.sum() * math.inf, "b": lambda th: th.sum()},
        val_loss=lambda th: th.sum(),
        init=torch.ones(2),
    )
    with pytest.raises(NonFiniteLossError, match=r"L2\(u\) = inf"):
        solve(prob, BilevelConfig(total_steps=3))


def test_step_order_and_lambda_update_use_pre_update_models():
    prob = _quad_problem()
    cfg = BilevelConfig(
        alpha=2.0,
        lr_w=0.1,
        lr_u=0.1,
        lr_lam=0.3,
        optimizer="sgd",
        lam_optimizer="sgd",
        weight_decay=0.0,
        schedule="constant",
        lam_schedule="constant",
        clip_norm=float("inf"),
    )
    w = ParamVector(torch.tensor([0.2, -0.1]))
    u = ParamVector(torch.tensor([0.5, 0.4]))
    state = init_state(w, u, prob.names, cfg)
    from scalebio_core.core.problem import ProblemFns

    # expected by hand (SGD): all gradients at the pre-update point
    p = torch.tensor([0.5, 0.5])
    ca, cb, t = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.9, 0.1])
    w0, u0 = w.theta.detach().clone(), u.theta.detach().clone()
    lw = torch.stack([((w0 - ca) ** 2).sum(), ((w0 - cb) ** 2).sum()])
    lu = torch.stack([((u0 - ca) ** 2).sum(), ((u0 - cb) ** 2).sum()])
    gu = 2.0 * (p[0] * 2 * (u0 - ca) + p[1] * 2 * (u0 - cb))
    gw = 2 * (w0 - t) + 2.0 * (p[0] * 2 * (w0 - ca) + p[1] * 2 * (w0 - cb))
    glam = 2.0 * p * ((lw - lu) - (p * (lw - lu)).sum())
    m = scalebio_step(state, None, None, ProblemFns(prob))
    torch.testing.assert_close(u.theta.detach(), u0 - 0.1 * gu)
    torch.testing.assert_close(w.theta.detach(), w0 - 0.1 * gw)
    torch.testing.assert_close(state.lam.detach(), -0.3 * glam)
    assert m["L2_w"] == pytest.approx(float((p * lw).sum()))
    assert m["gap"] == pytest.approx(float((p * (lw - lu)).sum()))
    assert state.step == 1


def test_determinism_under_seed():
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(3, 2, generator=g)
        prob = BilevelProblem(
            sources=[
                (f"s{i}", (lambda v: lambda th: ((th - v) ** 2).sum())(noise[i])) for i in range(3)
            ],
            val_loss=lambda th: (th**2).sum(),
            init=torch.zeros(2),
        )
        return solve(
            prob, BilevelConfig(alpha=5.0, lr_w=0.05, lr_u=0.05, lr_lam=0.05, total_steps=50)
        ).trajectory["p"]

    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_clipping_at_alpha_by_default():
    prob = BilevelProblem(
        sources={"a": lambda th: 1e3 * (th**2).sum(), "b": lambda th: th.sum()},
        val_loss=lambda th: 100 * th.sum(),
        init=torch.ones(4),
    )
    cfg = BilevelConfig(
        alpha=2.0,
        lr_w=1.0,
        lr_u=1.0,
        optimizer="sgd",
        weight_decay=0.0,
        schedule="constant",
        total_steps=1,
    )
    r = solve(prob, cfg)
    step = r.state.w.theta.detach() - 1.0
    # the raw gradient norm is far above alpha; the SGD step (lr 1) has norm exactly alpha
    assert float(step.norm()) == pytest.approx(2.0, rel=1e-5)
    r2 = solve(prob, BilevelConfig(**{**cfg.to_dict(), "clip_norm": float("inf")}))
    assert float((r2.state.w.theta.detach() - 1.0).norm()) > 100
