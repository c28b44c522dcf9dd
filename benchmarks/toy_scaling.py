"""ScaleBiO (first order) vs implicit differentiation (second order), 10^2 to 10^5 parameters.

The problem is a separable quadratic bilevel toy whose exact solution is cheap at any size d:

    source s   l_s(w) = 1/(2d) Σ_i a_si (w_i − c_si)²           (diagonal Hessian diag(a_s)/d)
    upper      L1(w)  = 1/(2d) Σ_i G_i (w_i − t_i)²             (diagonal G)
    lower      w*(p)  = (Σ_s p_s a_s c_s) / (Σ_s p_s a_s)       (elementwise)
    bilevel    F(p)   = L1(w*(p)),   p = softmax(lam) on the simplex

with a_s log-uniform in [1, κ], c_s ~ N(0, 1), G uniform in [0.5, 2] and t = w*(p_true) + noise for
an interior p_true, so the optimum p* is interior and F* > 0. The exact p* (and the minimiser p_α of
ScaleBiO's penalty surrogate Φ_α) come from `scalebio_core.core.toy.minimize_on_simplex` in float64
(SLSQP from K + 1 starts, Newton polish, KKT check), independently of both methods.

Methods, both with plain SGD on lam (p = softmax(lam), start uniform) at the same learning rate,
each with a fixed budget of lam updates (default ScaleBiO 2000, implicit 200):

* ScaleBiO: a loop over `scalebio_step` (the code that trains language models) on a
  `BilevelProblem` whose source losses are torch functions of theta (autograd, nothing by hand);
  SGD for u and w at 1/L step sizes, constant α.
* implicit: the hypergradient of F via the implicit function theorem, as bilevel libraries do it:
  the inner w*(p) by warm-started gradient descent, v = H⁻¹ ∇L1(w) by warm-started conjugate
  gradient with Hessian-vector products from autograd (double backward), then
  ∇_lam F = −∂/∂lam [∇_w L2(softmax(lam), w) · v].

Each (d, method) runs in a fresh subprocess with one torch thread (float64), after a 3-step warm-up
on a 10-parameter copy (torch's lazy initialisation). Wall time covers the optimisation loop only
(no import, no problem construction); the table also gives the updates and seconds until the error
first drops below a tolerance (default 1e-4, above the O(1/α) surrogate bias), the fairer speed
comparison since the fixed budgets are arbitrary. Peak memory is the peak resident set
size increase over the loop: the high-water mark VmHWM is reset through /proc/self/clear_refs just
before the loop and read after it, minus the RSS at the start (torch's CPU allocator is invisible to
tracemalloc, so RSS is the honest measure; where clear_refs is not writable the ru_maxrss increase
is used instead, and the header says so). RSS includes allocator slack, so differences below ~0.5
MiB are noise.

    .venv/bin/python benchmarks/toy_scaling.py            # d = 1e2 … 1e5 (~1.5 min)
    .venv/bin/python benchmarks/toy_scaling.py --quick    # d = 1e2 … 1e4, half the steps (~40 s)
    .venv/bin/python benchmarks/toy_scaling.py --sizes 1000 100000 --out results.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_lines, peak_kib, reset_peak, status_kib, write_section  # noqa: E402

from scalebio_core.core.bilevel import BilevelConfig, init_state, scalebio_step  # noqa: E402
from scalebio_core.core.problem import BilevelProblem, ParamVector, ProblemFns  # noqa: E402
from scalebio_core.core.toy import minimize_on_simplex

DT = torch.float64

# ------------------------------------------------------------------ the scalable toy


@dataclass
class Settings:
    """Everything a run depends on (passed to the child processes as JSON)."""

    k: int = 4
    kappa: float = 100.0
    noise: float = 0.5
    seed: int = 0
    alpha: float = 1000.0
    lr_lam: float = 2.0
    steps_scalebio: int = 2000
    steps_implicit: int = 200
    inner: int = 10
    cg: int = 10
    tol: float = 1e-4
    threads: int = 1


class DiagonalBilevel:
    """Separable quadratic bilevel problem with diagonal per-source Hessians (module docstring)."""

    def __init__(self, d: int, s: Settings):
        rng = np.random.default_rng([s.seed, d])
        k = s.k
        self.d, self.k = d, k
        self.a = torch.tensor(np.exp(rng.uniform(0, np.log(s.kappa), (k, d))), dtype=DT)
        self.c = torch.tensor(rng.normal(size=(k, d)), dtype=DT)
        self.gdiag = torch.tensor(rng.uniform(0.5, 2.0, d), dtype=DT)
        self.p_true = torch.tensor(rng.dirichlet(np.full(k, 3.0)), dtype=DT)
        self.t = self.lower_star(self.p_true) + s.noise * torch.tensor(rng.normal(size=d), dtype=DT)
        self.names = tuple(f"s{i}" for i in range(k))

    # the losses, torch functions of w (autograd does every derivative)
    def source_loss(self, s: int, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.a[s] * (w - self.c[s]) ** 2).mean()

    def upper_loss(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.gdiag * (w - self.t) ** 2).mean()

    def lower_loss(self, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return sum(p[s] * self.source_loss(s, w) for s in range(self.k))

    # closed forms, used only for the exact reference solution
    def lower_star(self, p: torch.Tensor) -> torch.Tensor:
        return (p @ (self.a * self.c)) / (p @ self.a)

    def penalty_w(self, p: torch.Tensor, alpha: float) -> torch.Tensor:
        return (self.gdiag * self.t + alpha * (p @ (self.a * self.c))) / (
            self.gdiag + alpha * (p @ self.a)
        )

    def objective(self, p: torch.Tensor) -> torch.Tensor:
        """F(p) = L1(w*(p))."""
        return self.upper_loss(self.lower_star(p))

    def surrogate(self, p: torch.Tensor, alpha: float) -> torch.Tensor:
        """Φ_α(p) = L1(w_α) + α (L2(p, w_α) − L2(p, w*(p))), what ScaleBiO minimises."""
        w, u = self.penalty_w(p, alpha), self.lower_star(p)
        return self.upper_loss(w) + alpha * (self.lower_loss(p, w) - self.lower_loss(p, u))

    def lipschitz(self) -> tuple[float, float]:
        """(L_A, L_G): largest curvature of any source loss and of L1 (the 1/d included)."""
        return float(self.a.max()) / self.d, float(self.gdiag.max()) / self.d

    def as_problem(self) -> BilevelProblem:
        sources = [
            (n, (lambda s: lambda th: self.source_loss(s, th))(s)) for s, n in enumerate(self.names)
        ]
        return BilevelProblem(
            sources=sources, val_loss=self.upper_loss, init=torch.zeros(self.d, dtype=DT)
        )


# ------------------------------------------------------------------ the two methods


class Monitor:
    """Called with p after every lam update: records when max|p − p*| first drops below tol."""

    def __init__(self, p_star: torch.Tensor | None, tol: float):
        self.p_star, self.tol = p_star, tol
        self.updates = 0
        self.hit: tuple[int, float] | None = None
        self.start = time.perf_counter()

    def __call__(self, p: torch.Tensor) -> None:
        self.updates += 1
        if self.hit is None and self.p_star is not None:
            if float((p - self.p_star).abs().max()) <= self.tol:
                self.hit = (self.updates, time.perf_counter() - self.start)


def run_scalebio(toy: DiagonalBilevel, s: Settings, monitor: Monitor) -> torch.Tensor:
    """ScaleBiO steps: SGD everywhere, u and w at 1/L, constant α; returns final p."""
    la, lg = toy.lipschitz()
    cfg = BilevelConfig(
        alpha=s.alpha,
        lr_u=1.0 / (s.alpha * la),
        lr_w=1.0 / (lg + s.alpha * la),
        lr_lam=s.lr_lam,
        optimizer="sgd",
        lam_optimizer="sgd",
        weight_decay=0.0,
        schedule="constant",
        lam_schedule="constant",
        warmup_ratio=0.0,
        total_steps=s.steps_scalebio,
        clip_norm=float("inf"),
    )
    problem = toy.as_problem()
    state = init_state(ParamVector(problem.init), ParamVector(problem.init), problem.names, cfg)
    fns = ProblemFns(problem)
    for _ in range(s.steps_scalebio):
        scalebio_step(state, None, None, fns)
        monitor(state.p)
    return state.p


def conjugate_gradient(
    hvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x: torch.Tensor, iters: int
) -> torch.Tensor:
    """At most `iters` CG iterations on H x = b from the warm start x (H by products only).

    Costs one product for the warm-start residual plus one per iteration; stops early once the
    relative residual is below 1e-12.
    """
    r = b - hvp(x)
    d, rr = r.clone(), r @ r
    tol = 1e-24 * float(b @ b)
    for _ in range(iters):
        if float(rr) <= tol:
            break
        hd = hvp(d)
        step = rr / (d @ hd)
        x, r = x + step * d, r - step * hd
        rr_new = r @ r
        d, rr = r + (rr_new / rr) * d, rr_new
    return x


def run_implicit(toy: DiagonalBilevel, s: Settings, monitor: Monitor) -> torch.Tensor:
    """Hypergradient steps (IFT + CG with autograd HVPs); returns final p."""
    la, _ = toy.lipschitz()
    lam = torch.zeros(toy.k, dtype=DT, requires_grad=True)
    opt = torch.optim.SGD([lam], lr=s.lr_lam)
    w = torch.zeros(toy.d, dtype=DT)
    v = torch.zeros(toy.d, dtype=DT)
    for _ in range(s.steps_implicit):
        p = torch.softmax(lam.detach(), 0)
        for _ in range(s.inner):  # inner problem: gradient descent at 1/L, warm-started
            w.requires_grad_(True)
            (g,) = torch.autograd.grad(toy.lower_loss(p, w), w)
            w = (w - g / la).detach()
        w.requires_grad_(True)
        (gw,) = torch.autograd.grad(toy.lower_loss(torch.softmax(lam, 0), w), w, create_graph=True)
        (b,) = torch.autograd.grad(toy.upper_loss(w), w)

        def hvp(x: torch.Tensor, gw: torch.Tensor = gw, w: torch.Tensor = w) -> torch.Tensor:
            return torch.autograd.grad(gw, w, x, retain_graph=True)[0]

        v = conjugate_gradient(hvp, b.detach(), v, s.cg).detach()
        (mixed,) = torch.autograd.grad(gw, lam, v)
        opt.zero_grad(set_to_none=True)
        lam.grad = -mixed
        opt.step()
        w = w.detach()
        monitor(torch.softmax(lam.detach(), 0))
    return torch.softmax(lam.detach(), 0)


METHODS = {"ScaleBiO": run_scalebio, "implicit": run_implicit}


# ------------------------------------------------------------------ measurement (child side)


def child(method: str, d: int, s: Settings, p_star: list[float]) -> dict:
    """Build the toy, run one method, return final p, loop wall time and peak RSS increase."""
    torch.set_num_threads(s.threads)
    run = METHODS[method]
    tiny = replace(s, steps_scalebio=3, steps_implicit=3)
    run(DiagonalBilevel(10, tiny), tiny, Monitor(None, 0.0))  # warm-up: torch's lazy init
    toy = DiagonalBilevel(d, s)
    gc.collect()
    reset = reset_peak()
    rss0 = status_kib("VmRSS") if reset else peak_kib(reset)
    monitor = Monitor(torch.tensor(p_star, dtype=DT), s.tol)
    p = run(toy, s, monitor)
    seconds = time.perf_counter() - monitor.start
    peak = peak_kib(reset)
    return {
        "p": p.tolist(),
        "seconds": seconds,
        "peak_mib": max(0, peak - rss0) / 1024,
        "updates": monitor.updates,
        "hit": monitor.hit,
        "memory": "VmHWM reset" if reset else "ru_maxrss",
    }


def run_child(
    method: str, d: int, s: Settings, p_star: np.ndarray, script: Path | None = None
) -> dict:
    """Run `child` in a fresh interpreter (clean memory accounting); returns its result.
    `script`: another benchmark whose `--child` runs this one's `child` (benchmarks/peers.py)."""
    cmd = [
        sys.executable,
        str(script or Path(__file__).resolve()),
        "--child",
        method,
        str(d),
        json.dumps(asdict(s)),
        json.dumps(p_star.tolist()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{method} at d={d} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the table (parent side)


def exact(toy: DiagonalBilevel, alpha: float) -> tuple[np.ndarray, float, np.ndarray]:
    """(p*, F*, p_α): exact minimisers of F and of Φ_α over the simplex, float64."""
    p_star, f_star = minimize_on_simplex(toy.objective, toy.k)
    p_alpha, _ = minimize_on_simplex(lambda p: toy.surrogate(p, alpha), toy.k)
    return p_star, f_star, p_alpha


def fmt_p(p: np.ndarray) -> str:
    return "[" + ", ".join(f"{x:.6f}" for x in p) + "]"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def measure(sizes: list[int], s: Settings) -> list[dict]:
    """Run every (d, method) in a fresh process; one dict per run with the exact solution's
    p*, F* and surrogate bias beside the method's final error, gap, time and memory."""
    out = []
    for d in sizes:
        torch.set_num_threads(s.threads)
        toy = DiagonalBilevel(d, s)
        p_star, f_star, p_alpha = exact(toy, s.alpha)
        bias = float(np.abs(p_alpha - p_star).max())
        for m in METHODS:
            r = run_child(m, d, s, p_star)
            p = np.asarray(r["p"])
            with torch.no_grad():
                gap = (float(toy.objective(torch.tensor(p, dtype=DT))) - f_star) / abs(f_star)
            hit = r["hit"] or (None, None)
            out.append(
                {
                    **r,
                    "d": d,
                    "method": m,
                    "error": float(np.abs(p - p_star).max()),
                    "gap": gap,
                    "hit_updates": hit[0],
                    "hit_seconds": hit[1],
                    "p_star": p_star.tolist(),
                    "f_star": f_star,
                    "bias": bias,
                }
            )
            print(
                f"  d={d:,} {m}: error {out[-1]['error']:.2e}, {r['seconds']:.1f} s",
                file=sys.stderr,
            )
    return out


def benchmark(sizes: list[int], s: Settings) -> tuple[list[str], list[str]]:
    """Run every (d, method) (`measure`); return (header lines, markdown table lines)."""
    runs = measure(sizes, s)
    notes, rows, memory = [], [], set()
    for d in sizes:
        res = {r["method"]: r for r in runs if r["d"] == d}
        first = next(iter(res.values()))
        notes.append(
            f"- d={d:,}: p* = {fmt_p(np.asarray(first['p_star']))}, F* = {first['f_star']:.6g}; "
            f"surrogate bias max|p_α − p*| = {first['bias']:.2e} at α = {s.alpha:g}"
        )
        base = res["ScaleBiO"]
        for m, r in res.items():
            memory.add(r["memory"])
            hit = (r["hit_updates"], r["hit_seconds"])
            to_tol = f"{hit[0]} / {hit[1]:.2f}" if hit[0] else "not reached"
            if m == "ScaleBiO":
                ratios = "1 | 1 | 1"
            else:
                ratios = (
                    f"{_ratio(r['seconds'], base['seconds'])} | "
                    f"{_ratio(hit[1], base['hit_seconds'])} | "
                    f"{_ratio(r['peak_mib'], base['peak_mib'])}"
                )
            gap_s = f"{r['gap']:.2e}" if abs(r["gap"]) >= 1e-15 else "< 1e-15"
            rows.append(
                f"| {d:,} | {m} | {r['updates']} | {r['error']:.2e} | {gap_s} | {to_tol} "
                f"| {r['seconds']:.2f} | {r['peak_mib']:.2f} | {ratios} |"
            )
    mem_note = (
        "peak RSS increase over the loop (VmHWM reset via /proc/self/clear_refs)"
        if memory == {"VmHWM reset"}
        else "peak RSS increase over the loop (ru_maxrss)"
    )
    header = [
        f"### ScaleBiO (first order, penalty α = {s.alpha:g}, constant) vs implicit "
        "differentiation (IFT + CG with autograd HVPs)",
        "",
        f"Toy: separable quadratic bilevel, K = {s.k} sources with diagonal Hessians, lower-level "
        f"condition number κ = {s.kappa:g}, float64, {s.threads} torch thread(s), seed {s.seed}.",
        f"Both methods: SGD on lam (p = softmax(lam)), lr_lam = {s.lr_lam:g}, start p uniform. "
        f"ScaleBiO: {s.steps_scalebio} steps, one SGD step of u and of w at 1/L per lam update. "
        f"Implicit: {s.steps_implicit} lam updates, each {s.inner} warm-started GD steps at 1/L "
        f"on the inner problem + ≤ {s.cg} warm-started CG iterations (1 HVP each, + 1 for the "
        "start residual; early stop at relative residual 1e-12) + 1 mixed second derivative.",
        "Exact p* (and p_α, the minimiser of ScaleBiO's penalty surrogate Φ_α): "
        "scalebio_core.core.toy.minimize_on_simplex on the closed forms F(p) = L1(w*(p)) and "
        "Φ_α(p), "
        "float64 SLSQP + Newton polish + KKT check, independent of both methods.",
        f"Columns: error = max_s |p_s − p*_s| at the end (ScaleBiO converges to p_α, so its "
        f"error floors at the surrogate bias); gap = (F(p) − F*)/F* (< 1e-15: below float64 "
        "resolution); to tol = lam updates / "
        f"seconds until error ≤ {s.tol:g} first holds; wall time = optimisation loop only "
        f"(no import, no setup); peak mem = {mem_note}, one fresh subprocess per row "
        "(differences under ~0.5 MiB are allocator noise); ratios = implicit / ScaleBiO.",
        "",
        *notes,
    ]
    table = [
        "| d (params) | method | λ updates | error max\\|p−p*\\| | rel. gap (F−F*)/F* "
        f"| to tol {s.tol:g} (updates / s) | wall time (s) | peak mem (MiB) | time ratio "
        "| time-to-tol ratio | mem ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    return header, table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        method, d, spec, p_star = argv[1], int(argv[2]), json.loads(argv[3]), json.loads(argv[4])
        print(json.dumps(child(method, d, Settings(**spec), p_star)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="d = 1e2..1e4 and half the steps (under a minute)"
    )
    ap.add_argument("--sizes", type=int, nargs="+", help="problem sizes d (parameters)")
    ap.add_argument("--steps", type=int, help="ScaleBiO steps (default 2000, quick 1000)")
    ap.add_argument("--outer", type=int, help="implicit lam updates (default 200, quick 100)")
    ap.add_argument("--inner", type=int, default=Settings.inner, help="implicit: inner GD steps")
    ap.add_argument("--cg", type=int, default=Settings.cg, help="implicit: max CG iterations")
    ap.add_argument("--alpha", type=float, default=Settings.alpha, help="ScaleBiO penalty α")
    ap.add_argument("--lr-lam", type=float, default=Settings.lr_lam, help="SGD lr on lam (both)")
    ap.add_argument("--k", type=int, default=Settings.k, help="number of sources K")
    ap.add_argument(
        "--kappa", type=float, default=Settings.kappa, help="condition number of the lower level"
    )
    ap.add_argument("--tol", type=float, default=Settings.tol, help="error for the to-tol column")
    ap.add_argument("--seed", type=int, default=Settings.seed)
    ap.add_argument("--threads", type=int, default=Settings.threads, help="torch threads")
    ap.add_argument("--out", type=Path, help="also write the table as markdown to this file")
    args = ap.parse_args(argv)
    if args.k < 2:
        ap.error("--k must be >= 2 (one source has nothing to reweight)")
    half = 2 if args.quick else 1
    s = Settings(
        k=args.k,
        kappa=args.kappa,
        seed=args.seed,
        alpha=args.alpha,
        lr_lam=args.lr_lam,
        steps_scalebio=args.steps or Settings.steps_scalebio // half,
        steps_implicit=args.outer or Settings.steps_implicit // half,
        inner=args.inner,
        cg=args.cg,
        tol=args.tol,
        threads=args.threads,
    )
    sizes = args.sizes or ([100, 1_000, 10_000] if args.quick else [100, 1_000, 10_000, 100_000])
    start = time.perf_counter()
    header, table = benchmark(sizes, s)
    total = time.perf_counter() - start
    text = "\n".join(
        [
            *header,
            "",
            *table,
            "",
            f"Total wall time of the benchmark (incl. exact solves): {total:.1f} s",
        ]
    )
    print(text)
    if args.out:
        write_section(
            args.out,
            "Toy scaling: ScaleBiO vs implicit differentiation",
            [*machine_lines(), f"- numpy {np.__version__}", "", text],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
