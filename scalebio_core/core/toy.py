"""Convex toy problems whose bilevel solution is computed exactly, independently of ScaleBiO.

Every toy is a quadratic bilevel problem in float64:

    lower  l_s(w) = ½ wᵀA_s w − b_sᵀw + c_s            (source s, A_s ≻ 0)
           w*(p)  = argmin_w Σ_s p_s l_s(w) = (Σ p_s A_s)⁻¹ Σ p_s b_s
    upper  L1(w)  = ½ wᵀG w − gᵀw + g0
    bilevel          F(p) = L1(w*(p)),                min over the simplex
    penalty surrogate Φ_α(p) = L1(w_α) + α(L2(p, w_α) − L2(p, w*(p))),
                      w_α(p) = argmin_w L1(w) + α L2(p, w) = (G + α A(p))⁻¹(g + α b(p)).

The exact minimisers of F and Φ_α over the simplex are found by a float64 SLSQP solve from several
starts, polished by Newton's method on the active face and checked against the KKT conditions.
ScaleBiO minimises Φ_α over lam with p = softmax(lam); the surrogate's minimiser p_α tends to the
bilevel p* like 1/α (smooth, strongly convex setting).

Families: `least_squares` (K regression sources, some shifted or noisy, clean validation),
`weighted_mean` (w*(p) = Σ p_s c_s, target outside the hull: exact zeros; Φ_α ∝ F for every α),
`conditioned_quadratic` (tunable condition number κ of the lower level).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
from scipy.optimize import minimize

from ..errors import ConfigError
from .bilevel import BilevelConfig
from .problem import BilevelProblem

DT = torch.float64


@dataclass
class QuadraticBilevel:
    """A quadratic bilevel data-reweighting problem (see the module docstring)."""

    A: torch.Tensor  # (K, d, d)
    b: torch.Tensor  # (K, d)
    c: torch.Tensor  # (K,)
    G: torch.Tensor  # (d, d)
    g: torch.Tensor  # (d,)
    g0: float
    names: tuple[str, ...]
    description: str = ""

    def __post_init__(self) -> None:
        k, d = self.b.shape
        if self.A.shape != (k, d, d) or self.c.shape != (k,) or len(self.names) != k:
            raise ConfigError(
                f"mismatched lengths: A {tuple(self.A.shape)}, b {tuple(self.b.shape)}, "
                f"c {tuple(self.c.shape)}, {len(self.names)} names; need (K,d,d), (K,d), (K,), K."
            )
        if self.G.shape != (d, d) or self.g.shape != (d,):
            raise ConfigError(
                f"G must be ({d},{d}) and g ({d},); got {tuple(self.G.shape)}, "
                f"{tuple(self.g.shape)}."
            )

    @property
    def k(self) -> int:
        return self.b.shape[0]

    @property
    def d(self) -> int:
        return self.b.shape[1]

    # -- the losses ------------------------------------------------------------------------
    def source_loss(self, s: int, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * w @ self.A[s].to(w.dtype) @ w - self.b[s].to(w.dtype) @ w + self.c[s].item()

    def upper_loss(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * w @ self.G.to(w.dtype) @ w - self.g.to(w.dtype) @ w + self.g0

    def lower_loss(self, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return sum(p[s] * self.source_loss(s, w) for s in range(self.k))

    def lower_star(self, p: torch.Tensor) -> torch.Tensor:
        """w*(p) = (Σ p_s A_s)⁻¹ Σ p_s b_s."""
        a = torch.einsum("s,sij->ij", p, self.A)
        return torch.linalg.solve(a, p @ self.b)

    def penalty_w(self, p: torch.Tensor, alpha: float) -> torch.Tensor:
        """w_α(p) = argmin_w L1(w) + α L2(p, w)."""
        a = self.G + alpha * torch.einsum("s,sij->ij", p, self.A)
        return torch.linalg.solve(a, self.g + alpha * (p @ self.b))

    def bilevel_objective(self, p: torch.Tensor) -> torch.Tensor:
        """F(p) = L1(w*(p))."""
        return self.upper_loss(self.lower_star(p))

    def surrogate(self, p: torch.Tensor, alpha: float) -> torch.Tensor:
        """Φ_α(p) = min_w max_u L1(w) + α(L2(p, w) − L2(p, u))."""
        w, u = self.penalty_w(p, alpha), self.lower_star(p)
        return self.upper_loss(w) + alpha * (self.lower_loss(p, w) - self.lower_loss(p, u))

    # -- exact solutions -------------------------------------------------------------------
    def exact(self, alpha: float | None = None) -> tuple[np.ndarray, float]:
        """(p*, F(p*)) for alpha=None, else the surrogate's minimiser (p_α, Φ_α(p_α))."""
        f = self.bilevel_objective if alpha is None else (lambda p: self.surrogate(p, alpha))
        return minimize_on_simplex(f, self.k)

    # -- as a custom problem for ScaleBiO --------------------------------------------------
    def as_problem(self, init: torch.Tensor | None = None) -> BilevelProblem:
        sources = [
            (n, (lambda s: lambda th: self.source_loss(s, th))(s)) for s, n in enumerate(self.names)
        ]
        start = torch.zeros(self.d, dtype=DT) if init is None else init
        return BilevelProblem(sources=sources, val_loss=self.upper_loss, init=start)


# ------------------------------------------------------------------ the independent solver


def minimize_on_simplex(f, k: int, tol: float = 1e-12) -> tuple[np.ndarray, float]:
    """Minimise a smooth torch function of p over the probability simplex, in float64.

    SLSQP from the centre and from each vertex-biased start; the best is polished by Newton's
    method on its face (the support) and accepted only if the KKT conditions hold.
    """

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        p = torch.tensor(x, dtype=DT, requires_grad=True)
        v = f(p)
        (grad,) = torch.autograd.grad(v, p)
        return float(v.detach()), grad.numpy()

    starts = [np.full(k, 1.0 / k)] + [0.5 * np.eye(k)[i] + 0.5 / k for i in range(k)]
    best = None
    for x0 in starts:
        r = minimize(
            fun,
            x0,
            jac=True,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * k,
            constraints=[
                {"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones_like(x)}
            ],
            options={"ftol": 1e-16, "maxiter": 2000},
        )
        x = np.clip(r.x, 0, None)
        x /= x.sum()
        if best is None or fun(x)[0] < fun(best)[0]:
            best = x
    p = _newton_polish(f, best)
    value, grad = fun(p)
    _check_kkt(p, grad, tol=1e-6 * max(1.0, np.abs(grad).max()))
    return p, value


def _newton_polish(f, p0: np.ndarray, iters: int = 30) -> np.ndarray:
    support = np.flatnonzero(p0 > 1e-7)
    p = np.where(p0 > 1e-7, p0, 0.0)
    p /= p.sum()
    if len(support) == 1:
        return p
    # coordinates: p_support = q0 + N z, with N a basis of {Σ = 0} on the support
    m = len(support)
    basis = np.linalg.qr(np.vstack([np.ones(m), np.eye(m)[:-1]]).T)[0][:, 1:]

    def reduced(z: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(len(p), dtype=DT)
        full[support] = torch.tensor(p[support], dtype=DT) + torch.tensor(basis, dtype=DT) @ z
        return f(full)

    z = torch.zeros(m - 1, dtype=DT)
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(reduced, z)
        h = torch.autograd.functional.hessian(reduced, z)
        step = torch.linalg.solve(h, g)
        z = z - step
        if float(step.abs().max()) < 1e-15:
            break
    q = p.copy()
    q[support] = p[support] + basis @ z.numpy()
    if q.min() < 0:  # Newton left the face: keep the SLSQP point
        return p
    return q / q.sum()


def _check_kkt(p: np.ndarray, grad: np.ndarray, tol: float) -> None:
    support = p > 1e-9
    mu = grad[support].mean()
    spread = np.abs(grad[support] - mu).max()
    below = (grad[~support] - mu).min() if (~support).any() else 0.0
    if spread > tol or below < -tol:
        raise RuntimeError(
            f"exact solver: KKT conditions not met (gradient spread on the support {spread:.2e}, "
            f"most negative reduced gradient off the support {below:.2e}); the toy is ill-posed."
        )


# ------------------------------------------------------------------ the families


def _names(k: int, labels: list[str] | None = None) -> tuple[str, ...]:
    return tuple(labels) if labels else tuple(f"s{i}" for i in range(k))


def least_squares_samples(
    k: int = 4,
    d: int = 6,
    n: int = 400,
    n_val: int = 1000,
    shift: tuple[float, ...] = (0.25, 0.5, 1.0, 0.5),
    noise: tuple[float, ...] = (0.1, 0.1, 0.1, 1.0),
    seed: int = 0,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """The samples behind `least_squares`: [(X_s, y_s)] per source and the validation (X, y)
    (minibatches of them give the stochastic version of toy (a))."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=d)
    v = np.linalg.qr(rng.normal(size=(d, k)))[0].T
    delta = v - v.mean(0)
    sources = []
    for s in range(k):
        x = rng.normal(size=(n, d))
        sources.append((x, x @ (beta + shift[s] * delta[s]) + noise[s] * rng.normal(size=n)))
    xv = rng.normal(size=(n_val, d))
    return sources, (xv, xv @ beta + 0.1 * rng.normal(size=n_val))


def least_squares(
    k: int = 4,
    d: int = 6,
    n: int = 400,
    n_val: int = 1000,
    shift: tuple[float, ...] = (0.25, 0.5, 1.0, 0.5),
    noise: tuple[float, ...] = (0.1, 0.1, 0.1, 1.0),
    ridge: float = 1e-3,
    seed: int = 0,
) -> QuadraticBilevel:
    """(a) Weighted least-squares data reweighting.

    Source s: x ~ N(0, I_d), y = xᵀ(β + shift_s·δ_s) + noise_s·ε, where the δ_s = v_s − mean(v)
    for orthonormal v_s are the centred vertices of a simplex: no source alone has the clean β,
    but a mixture does (p_s ∝ 1/shift_s cancels the shifts). Validation: clean, y = xᵀβ + 0.1·ε.
    Lower l_s(w) = 1/(2n)‖X_s w − y_s‖² + ridge/2 ‖w‖²; upper the same on the validation set.
    The more shifted or the noisier a source, the less weight it should get.
    """
    if not len(shift) == len(noise) == k:
        raise ConfigError(
            f"least_squares: shift and noise need one value per source (k={k}); "
            f"got {len(shift)} and {len(noise)}."
        )
    if d < k:
        raise ConfigError(f"least_squares needs d >= k (got d={d}, k={k}).")
    if n < 1 or n_val < 1:
        raise ConfigError(
            f"least_squares: a source with no samples (n={n}, n_val={n_val}); "
            "give every source and the validation set at least one sample."
        )
    sources, (xv, yv) = least_squares_samples(k, d, n, n_val, shift, noise, seed)
    A, b, c = [], [], []
    for x, y in sources:
        A.append(x.T @ x / n + ridge * np.eye(d))
        b.append(x.T @ y / n)
        c.append(y @ y / (2 * n))
    labels = [f"shift{shift[s]:g}_noise{noise[s]:g}" for s in range(k)]
    return QuadraticBilevel(
        A=torch.tensor(np.array(A), dtype=DT),
        b=torch.tensor(np.array(b), dtype=DT),
        c=torch.tensor(c, dtype=DT),
        G=torch.tensor(xv.T @ xv / n_val, dtype=DT),
        g=torch.tensor(xv.T @ yv / n_val, dtype=DT),
        g0=float(yv @ yv / (2 * n_val)),
        names=_names(k, labels),
        description="weighted least squares",
    )


def weighted_mean(
    k: int = 5, d: int = 5, support: int = 3, distance: float = 1.0, seed: int = 0
) -> tuple[QuadraticBilevel, np.ndarray]:
    """(b) Weighted mean: l_s(w) = ½‖w − c_s‖², so w*(p) = Σ p_s c_s; L1(w) = ½‖w − t‖².

    The target t lies at `distance` outside the hull, straight out from a point q = C p_face on a
    face spanned by `support` sources, so p* = p_face: the other K − support weights are exactly
    zero. Returns (problem, p_face) — p_face is the analytic answer, `exact_weighted_mean` the
    independent one.
    """
    if not 1 <= support < k or d < k - 1:
        raise ConfigError("weighted_mean needs 1 <= support < k and d >= k - 1.")
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    p_face = np.zeros(k)
    p_face[:support] = rng.dirichlet(np.full(support, 2.0))
    q = p_face @ centers
    span = (centers[1:support] - centers[0]).T if support > 1 else np.zeros((d, 0))
    for _ in range(1000):
        n = rng.normal(size=d)
        if span.shape[1]:
            n -= span @ np.linalg.lstsq(span, n, rcond=None)[0]
        n /= np.linalg.norm(n)
        if np.all((centers[support:] - q) @ n < -0.05):
            break
    else:  # pragma: no cover - random directions always succeed for d >= k - 1
        raise RuntimeError("weighted_mean: could not place the target outside the hull.")
    t = q + distance * n
    eye = torch.eye(d, dtype=DT)
    ct = torch.tensor(centers, dtype=DT)
    problem = QuadraticBilevel(
        A=eye.expand(k, d, d).clone(),
        b=ct,
        c=0.5 * (ct**2).sum(1),
        G=eye,
        g=torch.tensor(t, dtype=DT),
        g0=float(0.5 * t @ t),
        names=_names(k),
        description="weighted mean",
    )
    return problem, p_face


def exact_weighted_mean(problem: QuadraticBilevel) -> np.ndarray:
    """Projection of t onto the hull of the c_s by enumerating supports (small K), in float64."""
    c, t = problem.b.numpy(), problem.g.numpy()
    k = len(c)
    best, best_val = None, np.inf
    for m in range(1, k + 1):
        for sup in combinations(range(k), m):
            cs = c[list(sup)]
            # min ½‖Σ p c − t‖² s.t. Σ p = 1 on the support: KKT linear system
            kkt = np.block([[cs @ cs.T, np.ones((m, 1))], [np.ones((1, m)), np.zeros((1, 1))]])
            rhs = np.concatenate([cs @ t, [1.0]])
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:m]
            if sol.min() < -1e-12:
                continue
            p = np.zeros(k)
            p[list(sup)] = np.clip(sol, 0, None)
            val = 0.5 * np.sum((p @ c - t) ** 2)
            if val < best_val - 1e-14:
                best, best_val = p, val
    return best


def conditioned_quadratic(
    k: int = 4, d: int = 8, kappa: float = 10.0, offset: float = 0.1, seed: int = 0
) -> QuadraticBilevel:
    """(c) Strongly convex quadratic bilevel problem with lower-level condition number κ.

    l_s(w) = ½ (w − c_s)ᵀ H_s (w − c_s), eigenvalues of H_s log-spaced in [1, κ]; L1(w) =
    ½‖w − t‖² with t = w*(p_true) + offset·δ for an interior p_true, so F* > 0 and p* is interior.
    """
    if kappa < 1:
        raise ConfigError("kappa (the condition number) must be >= 1.")
    rng = np.random.default_rng(seed)
    eig = np.geomspace(1.0, kappa, d)
    hs, cs = [], rng.normal(size=(k, d))
    for _ in range(k):
        qm, _ = np.linalg.qr(rng.normal(size=(d, d)))
        hs.append(qm @ np.diag(eig) @ qm.T)
    A = torch.tensor(np.array(hs), dtype=DT)
    b = torch.einsum("sij,sj->si", A, torch.tensor(cs, dtype=DT))
    c = 0.5 * torch.einsum("si,si->s", b, torch.tensor(cs, dtype=DT))
    p_true = torch.tensor(rng.dirichlet(np.full(k, 20.0)), dtype=DT)
    eye = torch.eye(d, dtype=DT)
    tmp = QuadraticBilevel(
        A=A, b=b, c=c, G=eye, g=torch.zeros(d, dtype=DT), g0=0.0, names=_names(k)
    )
    t = tmp.lower_star(p_true) + offset * torch.tensor(rng.normal(size=d), dtype=DT)
    return QuadraticBilevel(
        A=A,
        b=b,
        c=c,
        G=eye,
        g=t,
        g0=float(0.5 * t @ t),
        names=_names(k),
        description=f"quadratic, condition number {kappa:g}",
    )


# ------------------------------------------------------------------ convergence checks


def p_error(p_traj: np.ndarray, p_star: np.ndarray) -> np.ndarray:
    """Max-abs distance of each row of a p trajectory to p*."""
    return np.abs(np.asarray(p_traj) - np.asarray(p_star)[None]).max(axis=1)


def objective_error(problem: QuadraticBilevel, p_traj: np.ndarray, f_star: float) -> np.ndarray:
    """Relative gap (F(p_t) − F*) / |F*| along a p trajectory."""
    with torch.no_grad():
        vals = np.array(
            [float(problem.bilevel_objective(torch.tensor(p, dtype=DT))) for p in p_traj]
        )
    return (vals - f_star) / abs(f_star)


def toy_config(
    problem: QuadraticBilevel,
    alpha: float,
    steps: int,
    lr_lam: float = 0.5,
    tau: float = 1.0,
    tau_every: int = 1,
) -> BilevelConfig:
    """Plain gradient descent for all three (SGD, constant rates, no decay, no clipping).

    The model step sizes are 1/L of their own problems: lr_u = 1/(α·L_A), lr_w = 1/(L_G + α·L_A),
    with L_A the largest eigenvalue over the A_s and L_G that of G, so u and w track their
    targets within a few steps and lam sees (almost) the exact surrogate gradient.
    """
    la = float(torch.linalg.eigvalsh(problem.A).max())
    lg = float(torch.linalg.eigvalsh(problem.G).max())
    a_max = alpha * tau**steps if tau > 1 else alpha
    return BilevelConfig(
        alpha=alpha,
        tau=tau,
        tau_every=tau_every,
        alpha_max=max(alpha, min(a_max, 1e6)),
        lr_u=1.0 / (alpha * la),
        lr_w=1.0 / (lg + alpha * la),
        lr_lam=lr_lam,
        optimizer="sgd",
        lam_optimizer="sgd",
        weight_decay=0.0,
        schedule="constant",
        lam_schedule="constant",
        warmup_ratio=0.0,
        total_steps=steps,
        clip_norm=float("inf"),
    )
