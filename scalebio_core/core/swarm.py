"""Regression over proxy runs (`method: swarm`): the mixtures of a swarm, the fit of the target
loss on the mixture, and the fitted surface's minimiser on the simplex.

A swarm trains N small proxies, each on a fixed mixture p drawn from a Dirichlet around the
natural shares, and scores each by its target (validation) loss L at its end (RegMix, Liu et al.
2024; Data Mixing Laws, Ye et al. 2024; Olmix 2026). A regressor of L on p is then fitted and
minimised on the simplex, optionally within KL(p ‖ natural) ≤ kl_max (Olmix's constraint). Two
regressors:

- `log-linear` (the default; numpy least squares, nothing to install): log L is linear in
  features of p, fitted by least squares on log L,

      log L(p) ≈ Σ_s b_s p_s + Σ_{s<r} a_sr p_s p_r        (`pairs`, the default)
      log L(p) ≈ Σ_s b_s p_s                                (pairs=False)

  Without the pair terms this is the first-order law of Data Mixing Laws / Olmix
  (L = exp(c + Σ t_s p_s); its intercept is absorbed, as Σ p_s = 1 makes a constant one more
  combination of the p_s). We fit log L, not L = c + k·exp(t·p): a loss is positive and its
  changes are relative (a shift of the mixture scales the excess loss), and the fit stays linear
  least squares, exact and deterministic, where the form with an offset c needs a non-convex
  fit. The pair terms are Scheffé's quadratic mixture model (1958), the standard second-order
  model of mixture experiments, in log space. They are on by default because a single target
  loss is not monotone in the mixture in general: a first-order surface, being monotone along
  every edge, always puts its minimum at a vertex of the simplex (all weight on one source)
  unless the KL constraint holds it back, whereas a target drawn from several sources (the
  planted mixture of notebook 10) has its minimum inside. With pairs the fit has
  K + K(K − 1)/2 coefficients: fewer proxies than that leave it underdetermined (the
  smallest-norm coefficients that fit are used, and the run warns).
- `lightgbm`: RegMix's gradient-boosted trees on p (`pip install 'scalebio_core[swarm]'`),
  fitted on L; a tree model has no gradient, so its minimiser is a search: the mean of the best
  `TOP` of many Dirichlet draws (and the proxies' own mixtures) by predicted loss, as RegMix
  averages its best predicted mixtures.

The smooth surface is minimised by SLSQP (scipy) from several starts (the natural shares, the
uniform mixture, the vertices, the best proxy, prior draws), with Σ p = 1, 0 ≤ p ≤ 1 and the KL
constraint; the answer is finally pulled towards the natural shares along the segment between
them, by bisection, until KL(p ‖ natural) ≤ kl_max holds exactly (KL is convex along it).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import rel_entr

from ..errors import ConfigError, check_all, check_types

FLAT_PREFIX = "swarm_"  # a run config sets SwarmConfig's fields as swarm_<field>
REGRESSORS = ("log-linear", "lightgbm")
INSTALL = "pip install 'scalebio_core[swarm]'"
TINY = 1e-300
SEARCH = 20_000
"""Dirichlet draws the tree model's minimiser searches over."""
TOP = 100
"""The best of them (by predicted loss) whose mean is the tree model's answer (RegMix's 100)."""


@dataclass(frozen=True)
class SwarmConfig:
    """The swarm of proxy runs and its regressor (`method: swarm`)."""

    runs: int = 16
    """Proxy runs N, each a plain fine-tuning of the same model on one mixture."""
    steps: int = 0
    """Steps of each proxy (0: the run's `steps`); the schedules span one proxy."""
    concentration: float = 1.0
    """Spread of the proxies' mixtures: Dirichlet(concentration · K · natural); 1 with sources
    of equal size is the flat Dirichlet (uniform over the simplex); larger stays nearer
    natural."""
    regressor: str = "log-linear"
    """'log-linear' (least squares on log L; no extra package) or 'lightgbm' (RegMix's
    gradient-boosted trees; pip install 'scalebio_core[swarm]')."""
    pairs: bool = True
    """With log-linear: the pair terms p_s·p_r (Scheffé's quadratic model, in log space);
    false: the first-order law of Data Mixing Laws / Olmix, whose minimum is a vertex."""
    kl_max: float | None = field(default=None, metadata={"kinds": (float, type(None))})
    """The largest KL(p ‖ natural) the answer may have (None: no constraint)."""

    def __post_init__(self) -> None:
        check_types(self, prefix=FLAT_PREFIX)  # messages name the keys of a run config
        kl = self.kl_max
        check_all(
            "SwarmConfig",
            [
                (self.runs >= 1, "swarm_runs must be >= 1"),
                (self.steps >= 0, "swarm_steps must be >= 0 (0: the run's steps)"),
                (
                    self.concentration > 0 and math.isfinite(self.concentration),
                    "swarm_concentration must be a finite number > 0",
                ),
                (self.regressor in REGRESSORS, f"swarm_regressor must be one of {REGRESSORS}"),
                (
                    kl is None
                    or (isinstance(kl, int | float) and not isinstance(kl, bool))
                    and math.isfinite(kl)
                    and kl > 0,
                    f"swarm_kl_max must be null (no constraint) or a finite number > 0; got {kl!r}",
                ),
            ],
        )


def require_lightgbm() -> None:
    """Refuse `swarm_regressor: lightgbm` where the lightgbm package is missing."""
    if importlib.util.find_spec("lightgbm") is None:
        raise ConfigError(
            "swarm_regressor=lightgbm needs the lightgbm package, which is not installed: "
            f"{INSTALL} (or swarm_regressor=log-linear, the default, which needs nothing more)."
        )


# ---------------------------------------------------------------- the proxies' mixtures


def prior(natural: Sequence[float], concentration: float) -> np.ndarray:
    """The Dirichlet parameters of the proxies' mixtures: concentration · K · natural."""
    q = np.asarray(natural, dtype=np.float64)
    return concentration * len(q) * q


def draw_mixtures(natural: Sequence[float], n: int, concentration: float, seed: int) -> np.ndarray:
    """n mixtures (n × K) from Dirichlet(concentration · K · natural), reproducible by seed."""
    rng = np.random.default_rng([seed, 0x5EED])
    p = rng.dirichlet(prior(natural, concentration), size=n)
    return p / p.sum(axis=1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p ‖ q) in nats (0·log 0 = 0)."""
    return float(np.sum(rel_entr(np.asarray(p, dtype=np.float64), np.asarray(q))))


def into_kl_ball(p: np.ndarray, natural: np.ndarray, kl_max: float | None) -> np.ndarray:
    """p itself, or, where KL(p ‖ natural) > kl_max, the point of the segment from natural to p
    farthest from natural with KL ≤ kl_max (KL is convex along the segment: bisection)."""
    if kl_max is None or kl(p, natural) <= kl_max:
        return p
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl(natural + mid * (p - natural), natural) <= kl_max else (lo, mid)
    return natural + lo * (p - natural)


# ---------------------------------------------------------------- regressors


def features(p: np.ndarray, pairs: bool) -> np.ndarray:
    """The log-linear model's features of mixtures (rows): p_s, and p_s·p_r (s < r) with pairs."""
    p = np.atleast_2d(np.asarray(p, dtype=np.float64))
    if not pairs:
        return p
    k = p.shape[1]
    cross = [p[:, s] * p[:, r] for s in range(k) for r in range(s + 1, k)]
    return np.column_stack([p, *cross]) if cross else p


def n_coefficients(k: int, pairs: bool) -> int:
    """Coefficients of the log-linear fit over k sources."""
    return k + (k * (k - 1) // 2 if pairs else 0)


@dataclass
class Surface:
    """A fitted target loss over mixtures: `predict` (rows of p → L); `log_value` and
    `log_grad` of log L at one p where the model is smooth (None for trees)."""

    regressor: str
    predict: Callable[[np.ndarray], np.ndarray]
    log_value: Callable[[np.ndarray], float] | None = None
    log_grad: Callable[[np.ndarray], np.ndarray] | None = None
    info: dict = field(default_factory=dict)


def fit_log_linear(p: np.ndarray, loss: np.ndarray, pairs: bool = True) -> Surface:
    """Least squares of log L on the features of p (the smallest-norm solution when there are
    fewer proxies than coefficients)."""
    x = features(p, pairs)
    y = np.log(loss)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    k = p.shape[1]
    iu = np.triu_indices(k, 1)
    b, a = coef[:k], np.zeros((k, k))
    if pairs:
        a[iu] = coef[k:]
        a = a + a.T  # Σ_{s<r} a_sr p_s p_r = ½ pᵀ A p

    def log_value(q: np.ndarray) -> float:
        return float(b @ q + 0.5 * q @ a @ q)

    def log_grad(q: np.ndarray) -> np.ndarray:
        return b + a @ q

    fitted = x @ coef
    resid = y - fitted
    spread = float(np.sum((y - y.mean()) ** 2))
    info = {
        "coef_linear": b.tolist(),
        "coef_pairs": coef[k:].tolist() if pairs else [],
        "r2_log": 1.0 - float(resid @ resid) / spread if spread > 0 else 1.0,
        "coefficients": len(coef),
    }

    def predict(q: np.ndarray) -> np.ndarray:
        return np.exp(features(q, pairs) @ coef)

    return Surface("log-linear", predict, log_value, log_grad, info)


def fit_lightgbm(p: np.ndarray, loss: np.ndarray, seed: int = 0) -> Surface:
    """RegMix's regressor: gradient-boosted trees (LightGBM) of L on p."""
    require_lightgbm()
    lgb = importlib.import_module("lightgbm")  # an optional extra: imported only when chosen
    n = len(loss)
    params = {  # RegMix's objective and rate; leaves small enough for a few hundred proxies
        "objective": "regression",
        "learning_rate": 0.03,
        "num_leaves": 15,
        "min_data_in_leaf": max(2, min(20, n // 16)),
        "min_data_in_bin": 1,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 1,
        "verbosity": -1,
    }
    data = lgb.Dataset(np.asarray(p, dtype=np.float64), np.asarray(loss, dtype=np.float64))
    model = lgb.train(params, data, num_boost_round=400)

    def predict(q: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(np.atleast_2d(q)), dtype=np.float64)

    resid = loss - predict(p)
    spread = float(np.sum((loss - loss.mean()) ** 2))
    info = {"r2": 1.0 - float(resid @ resid) / spread if spread > 0 else 1.0}
    return Surface("lightgbm", predict, info=info)


def fit_surface(
    p: np.ndarray, loss: np.ndarray, regressor: str = "log-linear", pairs: bool = True, seed=0
) -> Surface:
    """The fitted target loss of proxies with mixtures `p` (N × K) and target losses `loss`."""
    p, loss = np.asarray(p, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(loss) or len(loss) == 0:
        raise ConfigError(
            f"swarm fit: need N mixtures (N × K) and N losses; got {p.shape} and {loss.shape}."
        )
    if not np.all(np.isfinite(loss)) or np.any(loss <= 0):
        raise ConfigError(
            f"swarm fit: target losses must be finite and > 0 (a log-linear fit takes their "
            f"log); got {loss.tolist()}. Lower lr_w so that no proxy diverges."
        )
    if regressor == "log-linear":
        return fit_log_linear(p, loss, pairs)
    if regressor == "lightgbm":
        return fit_lightgbm(p, loss, seed)
    raise ConfigError(f"unknown swarm_regressor {regressor!r}; choose one of {REGRESSORS}.")


# ---------------------------------------------------------------- the minimiser


def _slsqp(surface: Surface, x0: np.ndarray, natural: np.ndarray, kl_max: float | None):
    k = len(x0)
    cons = [{"type": "eq", "fun": lambda q: q.sum() - 1.0, "jac": lambda q: np.ones(k)}]
    if kl_max is not None:
        cons.append(
            {
                "type": "ineq",
                "fun": lambda q: kl_max - kl(np.clip(q, 0, None), natural),
                "jac": lambda q: -(np.log(np.maximum(q, 1e-12) / natural) + 1.0),
            }
        )
    res = minimize(
        surface.log_value,
        x0,
        jac=surface.log_grad,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * k,
        constraints=cons,
        options={"maxiter": 500, "ftol": 1e-14},
    )
    q = np.clip(res.x, 0.0, None)
    return q / q.sum()


def _search(surface: Surface, candidates: np.ndarray, natural, kl_max) -> np.ndarray:
    if kl_max is not None:
        candidates = candidates[rel_entr(candidates, natural).sum(axis=1) <= kl_max]
    pred = surface.predict(candidates)
    best = np.argsort(pred, kind="stable")[: min(TOP, len(candidates))]
    return candidates[best].mean(axis=0)


def minimise(
    surface: Surface,
    natural: Sequence[float],
    kl_max: float | None = None,
    seed: int = 0,
    seen: np.ndarray | None = None,
    concentration: float = 1.0,
) -> np.ndarray:
    """The fitted surface's minimiser on the simplex, within KL(p ‖ natural) ≤ kl_max when
    given. `seen`: the proxies' mixtures (starts, and candidates of the tree search)."""
    q = np.asarray(natural, dtype=np.float64)
    k = len(q)
    rng = np.random.default_rng([seed, 0x5A17])
    draws = [rng.dirichlet(prior(q, concentration), size=SEARCH)]
    if kl_max is not None:  # candidates near natural, for a tight constraint
        draws += [rng.dirichlet(prior(q, c), size=SEARCH // 4) for c in (10.0, 100.0, 1000.0)]
    seen = np.empty((0, k)) if seen is None else np.asarray(seen, dtype=np.float64)
    if surface.log_value is None:
        candidates = np.vstack([q[None], seen, *draws])
        return into_kl_ball(_search(surface, candidates, q, kl_max), q, kl_max)
    starts = [q, np.full(k, 1.0 / k), *np.eye(k), *draws[0][:8]]
    if len(seen):
        starts.append(seen[int(np.argmin(surface.predict(seen)))])
    best, value = q, surface.log_value(q)  # natural is always feasible
    for x0 in starts:
        p = into_kl_ball(_slsqp(surface, x0, q, kl_max), q, kl_max)
        v = surface.log_value(p)
        if v < value - 1e-15:
            best, value = p, v
    return best


def swarm_weights(
    p: np.ndarray,
    loss: np.ndarray,
    natural: Sequence[float],
    cfg: SwarmConfig,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Fit the proxies' target losses and minimise the fit: (the weights, what the fit says:
    regressor, coefficients or R², predicted loss at the weights, KL to natural)."""
    surface = fit_surface(p, loss, cfg.regressor, cfg.pairs, seed)
    w = minimise(surface, natural, cfg.kl_max, seed, np.asarray(p), cfg.concentration)
    info = {
        "regressor": surface.regressor,
        **({"pairs": cfg.pairs} if surface.regressor == "log-linear" else {}),
        **surface.info,
        "predicted_loss": float(surface.predict(w[None])[0]),
        "best_proxy_loss": float(np.min(loss)),
        "kl_to_natural": kl(w, np.asarray(natural, dtype=np.float64)),
        "kl_max": cfg.kl_max,
    }
    return w, info
