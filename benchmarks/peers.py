"""ScaleBiO beside two bilevel libraries from PyPI, in one run: Betty and BOAT.

The peers are the optional `peers` extra, never a dependency of the core (`make peers`, which
`make test` runs):

* **Betty** (`betty-ml` 0.1.1, Choe et al. 2023): bilevel problems as `ImplicitProblem`s linked
  in an `Engine`, with the hypergradient of its `Config(type=...)`: "darts" (finite differences),
  "neumann" (a Neumann series for the inverse Hessian), "cg" (conjugate gradient). Its metadata
  declares `torch>=1.6.*`, a specifier that pip >= 24.1 refuses, so `make peers` installs it
  with `--no-deps --ignore-requires-python` (torch and numpy are already installed); its
  `Engine`, problems and configs import and run with torch 2.13.
* **BOAT** (`boat-torch` 1.1.1): a bilevel toolbox configured by a dict; its first-order
  operations include "PGDO" (penalty-based gradient descent, Shen & Chen 2023: the value-function
  penalty γ·(g(x, y) − g(x, ŷ)) that ScaleBiO also minimises) and "VFO" (the value-function
  method of BOME, Liu et al. 2022). It pins numpy <= 1.26.4 and asks for torchvision, neither of
  which it imports, so `make peers` installs it with `--no-deps`, beside `higher`, which it does
  import.

Each peer is driven through its own classes and configuration, as its documentation shows; the
problem they are given is the one ScaleBiO gets. Where a peer fails, its row gives the error.

(a) The exact toy of `toy_scaling.py` (a separable quadratic bilevel problem, p* computed in
    float64 independently of every method): error to p*, the seconds until max|p − p*| ≤ 1e-3
    first holds, the peak resident memory of the loop; each method in a fresh process, each at
    its best upper learning rate of one shared grid (the ratio of the two levels' step sizes is
    the one setting every method needs; the table says which rate won).

(b) Data reweighting of the planted mixture (`corpora.planted_mixture`, notebook 10) with the
    embedded GPT-2 (nano): each method runs for the same wall-clock budget in a fresh process
    from the same models and batches (`build.setup` of configs/planted.yaml at quick, constant
    learning rates: the preset's AdamW rates for the model and for λ, for every method); then the
    seconds per upper step, the peak resident memory of the loop, ‖p − p_planted‖ at the end of
    the budget, and the held-out loss of a fresh model fine-tuned on each method's weights
    (`pipeline.sft`, the same resample size and steps for all).

    .venv/bin/python benchmarks/peers.py --out benchmarks/RESULTS.md     # full (~20 min)
    .venv/bin/python benchmarks/peers.py --tiny                          # code path (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_scaling as ts  # noqa: E402
from _common import machine_lines, reset_peak, status_kib, write_section  # noqa: E402

from scalebio_core.core.problem import ParamVector  # noqa: E402

DT = ts.DT
TOL = 1e-3
LR_GRID = (0.02, 0.2, 2.0, 20.0, 200.0, 2000.0)
UPDATE_Y_AHEAD = False  # BOAT marks True as what meta-learning needs; False measured closer here


def peers_installed() -> dict[str, str | None]:
    """The peers' versions, or None where one is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("betty-ml", "boat-torch", "higher"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


class Logits(nn.Module):
    """The upper-level variable: the logits λ of p = softmax(λ), starting at uniform."""

    def __init__(self, k: int, dtype: torch.dtype = DT):
        super().__init__()
        self.lam = nn.Parameter(torch.zeros(k, dtype=dtype))

    def p(self) -> torch.Tensor:
        return torch.softmax(self.lam, 0)


# ------------------------------------------------------------------ (a) the toy, each method


def run_betty(kind: str):
    """Betty with hypergradient `kind`: an upper `ImplicitProblem` over λ whose loss is L1 of
    the lower's parameters, a lower one over w whose loss is L2(p, w); `unroll_steps` lower
    steps per upper step (the implicit baseline's inner steps)."""

    def run(toy: ts.DiagonalBilevel, s: ts.Settings, monitor: ts.Monitor) -> torch.Tensor:
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine
        from betty.problems import ImplicitProblem

        la, _ = toy.lipschitz()

        class Upper(ImplicitProblem):
            def training_step(self, batch):
                return toy.upper_loss(self.lower.module.theta)

            def param_callback(self, params):  # after each upper step
                monitor(self.module.p().detach())

        class Lower(ImplicitProblem):
            def training_step(self, batch):
                return toy.lower_loss(self.upper.module.p(), self.module.theta)

        data = [(torch.zeros(1, dtype=DT),)]  # the toy has no data: one dummy batch, repeated
        up, low = Logits(toy.k), ParamVector(torch.zeros(toy.d, dtype=DT))
        upper = Upper(
            name="upper",
            module=up,
            optimizer=torch.optim.SGD(up.parameters(), lr=s.lr_lam),
            config=Config(),
            train_data_loader=data,
            device="cpu",
        )
        lower_config = Config(
            type=kind,
            unroll_steps=s.inner,
            neumann_iterations=s.cg,
            neumann_alpha=1.0 / la,
            cg_iterations=s.cg,
        )
        lower = Lower(
            name="lower",
            module=low,
            optimizer=torch.optim.SGD(low.parameters(), lr=1.0 / la),
            config=lower_config,
            train_data_loader=data,
            device="cpu",
        )
        engine = Engine(
            config=EngineConfig(train_iters=s.steps_implicit * s.inner, logger_type="none"),
            problems=[upper, lower],
            dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        )
        engine.run()
        return up.p().detach()

    return run


def boat_lower(feed: dict, ul_model: Logits, ll_model: ParamVector, toy=None) -> torch.Tensor:
    """BOAT's lower-level objective g(x, y) = L2(p, w): x = the logits, y = w."""
    return toy.lower_loss(ul_model.p(), ll_model.theta)


def boat_upper(feed: dict, ul_model: Logits, ll_model: ParamVector, toy=None) -> torch.Tensor:
    """BOAT's upper-level objective F(x, y) = L1(w)."""
    return toy.upper_loss(ll_model.theta)


def run_boat(op: str):
    """BOAT with first-order operation `op` ("PGDO" or "VFO"), configured by its dict (the
    keys its `Problem` reads); `lower_iters` lower steps per upper step, the implicit
    baseline's inner steps."""

    def run(toy: ts.DiagonalBilevel, s: ts.Settings, monitor: ts.Monitor) -> torch.Tensor:
        from boat_torch import Problem

        la, _ = toy.lipschitz()
        ul, ll = Logits(toy.k), ParamVector(torch.zeros(toy.d, dtype=DT))
        with tempfile.TemporaryDirectory() as tmp:
            config = {
                "fo_op": op,
                "gm_op": None,
                "na_op": None,
                "lower_level_model": ll,
                "upper_level_model": ul,
                "lower_level_var": list(ll.parameters()),
                "upper_level_var": list(ul.parameters()),
                "lower_level_opt": torch.optim.SGD(ll.parameters(), lr=1.0 / la),
                "upper_level_opt": torch.optim.SGD(ul.parameters(), lr=s.lr_lam),
                "device": "cpu",
                "lower_iters": s.inner,
                "fo_ol_batch_input": False,
                "return_grad": False,
                "loss_log_path": str(Path(tmp) / "losses.json"),
                "PGDO": {
                    "y_hat_lr": 1.0 / la,
                    "gamma_init": s.alpha,
                    "gamma_max": s.alpha,
                    "gamma_argmax_step": 1,
                    "update_y_ahead": UPDATE_Y_AHEAD,
                    "penalty": "difference",
                },
                "VFO": {"y_hat_lr": 1.0 / la, "eta": 1.0, "u1": 1.0},
            }
            losses = {
                "lower_level_loss": {"function": "peers.boat_lower", "params": {"toy": toy}},
                "upper_level_loss": {"function": "peers.boat_upper", "params": {"toy": toy}},
            }
            problem = Problem(config, losses)
            problem.build_ll_solver()
            problem.build_ul_solver()
            for it in range(s.steps_implicit):
                problem.run_iter({}, {}, it)
                monitor(ul.p().detach())
        return ul.p().detach()

    return run


METHODS = {
    "ScaleBiO": ts.run_scalebio,
    "implicit (ours, IFT + CG)": ts.run_implicit,
    "Betty darts": run_betty("darts"),
    "Betty neumann": run_betty("neumann"),
    "Betty cg": run_betty("cg"),
    "BOAT PGDO": run_boat("PGDO"),
    "BOAT VFO": run_boat("VFO"),
}
PEERS = {"Betty": "betty-ml", "BOAT": "boat-torch"}


def child(method: str, d: int, s: ts.Settings, p_star: list[float]) -> dict:
    ts.METHODS[method] = METHODS[method]  # toy_scaling's measured child runs any method
    return ts.child(method, d, s, p_star)


def run_child(method: str, d: int, s: ts.Settings, p_star: np.ndarray) -> dict:
    """One method in a fresh interpreter; an error comes back as {"error": its last line}."""
    try:
        return ts.run_child(method, d, s, p_star, script=Path(__file__).resolve())
    except RuntimeError as e:
        lines = [x for x in str(e).strip().splitlines() if x.strip()]
        return {"error": lines[-1]}


def toy_part(d: int, s: ts.Settings, grid: tuple[float, ...]) -> tuple[list[str], list[dict]]:
    """Every method at every upper learning rate of `grid`; the best (lowest final error) of
    each, as table rows."""
    toy = ts.DiagonalBilevel(d, s)
    p_star, f_star, p_alpha = ts.exact(toy, s.alpha)
    installed = peers_installed()
    results = []
    for method in METHODS:
        peer = next((dist for name, dist in PEERS.items() if method.startswith(name)), None)
        if peer is not None and installed[peer] is None:
            results.append({"method": method, "error": f"{peer} is not installed (make peers)"})
            continue
        tries = []
        for lr in grid:
            r = run_child(method, d, replace(s, lr_lam=lr), p_star)
            r["lr"] = lr
            if "error" not in r:
                r["err"] = float(np.abs(np.asarray(r["p"]) - p_star).max())
                if not np.isfinite(r["err"]):
                    r = {"lr": lr, "error": f"p is not finite: {r['p']}"}
            tries.append(r)
            print(f"  {method} lr {lr:g}: {r.get('err', r.get('error'))}", file=sys.stderr)
        ok = [t for t in tries if "error" not in t]
        best = min(ok, key=lambda t: t["err"]) if ok else tries[-1]
        results.append(
            {"method": method, **best, "tried": len(tries), "failed": len(tries) - len(ok)}
        )
    notes = [
        f"Toy: `toy_scaling.py`'s separable quadratic, d = {d:,} parameters, K = {s.k} sources, "
        f"κ = {s.kappa:g}, seed {s.seed}, float64, {s.threads} torch thread. p* = "
        f"{ts.fmt_p(p_star)}; ScaleBiO's surrogate minimiser p_α (α = {s.alpha:g}) is "
        f"{float(np.abs(p_alpha - p_star).max()):.1e} from it.",
        f"Budgets: ScaleBiO {s.steps_scalebio} upper steps of one lower step each (its u and "
        f"w steps, α = {s.alpha:g}); the implicit baseline, Betty and BOAT "
        f"{s.steps_implicit} upper steps of {s.inner} lower steps each (Betty: unroll_steps "
        f"= {s.inner}; neumann and cg with {s.cg} iterations, neumann_alpha = 1/L; darts at "
        f"its default darts_alpha; BOAT: lower_iters = {s.inner}, PGDO with γ = α and "
        f"update_y_ahead = {UPDATE_Y_AHEAD}, VFO with u1 = 1). Lower steps: SGD at 1/L "
        "everywhere. Upper: SGD on the logits, the best learning rate of the grid "
        f"{list(grid)} for each method.",
        "Peak memory at this size is allocator noise (under 0.5 MiB): the model is a vector of "
        f"{d:,} numbers. Part (b) measures memory where it matters.",
    ]
    return notes, [{**r, "f_star": f_star} for r in results]


def toy_table(rows: list[dict]) -> list[str]:
    base = next((r for r in rows if r["method"] == "ScaleBiO" and "error" not in r), None)
    lines = [
        f"| method | upper lr (best of grid) | final max\\|p − p*\\| | to {TOL:g} (updates / s) "
        "| loop seconds | peak MiB | × ScaleBiO: seconds, to tol, memory |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | — | failed: {r['error']} | — | — | — | — |")
            continue
        hit = r["hit"] or (None, None)
        to_tol = f"{hit[0]} / {hit[1]:.2f}" if hit[0] else "not reached"
        ratios = "1, 1, 1"
        if base is not None and r is not base:
            bh = base["hit"] or (None, None)
            ratios = (
                f"{ts._ratio(r['seconds'], base['seconds'])}, {ts._ratio(hit[1], bh[1])}, "
                f"{ts._ratio(r['peak_mib'], base['peak_mib'])}"
            )
        failed = f" ({r['failed']} of {r['tried']} rates failed)" if r["failed"] else ""
        lines.append(
            f"| {r['method']} | {r['lr']:g}{failed} | {r['err']:.2e} | {to_tol} | "
            f"{r['seconds']:.2f} | {r['peak_mib']:.2f} | {ratios} |"
        )
    return lines


# ------------------------------------------------------------------ (b) reweighting a GPT-2

KEYS = ("input_ids", "attention_mask", "labels", "source_ids")
LM_METHODS = ("ScaleBiO", "Betty darts", "Betty neumann", "Betty cg", "BOAT PGDO", "BOAT VFO")
MIXTURE = [0.5, 0.3, 0.2, 0.0]


def lm_config(tiny: bool, out_dir: str):
    """The run config every method of (b) starts from: configs/planted.yaml at quick (smoke
    sizes with --tiny), constant learning rates, eager attention for all (Betty's neumann and
    cg differentiate twice, which torch's SDPA kernel on a CPU cannot)."""
    from scalebio_core.lab.experiments import preset_config

    return preset_config(
        "planted",
        "smoke" if tiny else "quick",
        out_dir=out_dir,
        schedule="constant",
        lam_schedule="constant",
        warmup_ratio=0.0,
        attn_implementation="eager",  # SDPA's CPU kernel has no double backward (neumann, cg)
        corpus_args={**({"n_per_source": 40, "n_val": 40} if tiny else {}), "mixture": MIXTURE},
    )


class Stream:
    """Endless batches of a sampler as tuples (Betty's loaders yield tuples of tensors)."""

    def __init__(self, s, val: bool):
        self.s, self.val = s, val

    def __iter__(self):
        from scalebio_core.train.build import batches

        data, sampler = (
            (self.s.val, self.s.val_sampler) if self.val else (self.s.train, self.s.sampler)
        )
        t = 0
        while True:
            (mb,) = batches(self.s, data, sampler.indices(t), 1)
            yield tuple(mb[k] for k in KEYS)
            t += 1


def lm_child(method: str, tiny: bool, budget: float) -> dict:
    """One method for `budget` seconds on the planted mixture; p after each upper step."""
    from scalebio_core.core.bilevel import weighted_lower_loss
    from scalebio_core.train.build import setup, step_batches
    from scalebio_core.train.trainer import lm_fns, run_step

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = lm_config(tiny, str(Path(tmp) / "run"))
        s = setup(cfg)
    fns, names = lm_fns(s), list(s.names)
    lr_w, lr_lam = cfg.bilevel.lr_w, cfg.bilevel.lr_lam
    trace: list[tuple[float, list[float]]] = []

    def record(p: torch.Tensor) -> None:
        trace.append((time.perf_counter() - start, p.detach().double().tolist()))

    def lower_loss(model, mb, p):
        losses, ids = fns.source_losses(model, mb)
        return weighted_lower_loss(losses, ids, p, s.divisor)[0]

    reset_peak()
    rss0 = status_kib("VmRSS")
    start = time.perf_counter()
    if method == "ScaleBiO":
        t = 0
        while time.perf_counter() - start < budget:
            run_step(s, t, fns)
            record(torch.softmax(s.state.lam, 0))
            t += 1
    elif method.startswith("Betty"):
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine
        from betty.problems import ImplicitProblem

        class Stop(Exception):
            pass

        class Upper(ImplicitProblem):
            def training_step(self, batch):
                return fns.val_loss(self.lower.module, dict(zip(KEYS, batch)))

            def param_callback(self, params):
                record(self.module.p())
                if time.perf_counter() - start >= budget:
                    raise Stop

        class Lower(ImplicitProblem):
            def training_step(self, batch):
                return lower_loss(self.module, dict(zip(KEYS, batch)), self.upper.module.p())

        up, model = Logits(len(names), torch.float32), s.state.w
        upper = Upper(
            name="upper",
            module=up,
            optimizer=torch.optim.AdamW(up.parameters(), lr=lr_lam, weight_decay=0.0),
            config=Config(),
            train_data_loader=Stream(s, val=True),
            device="cpu",
        )
        lower = Lower(
            name="lower",
            module=model,
            optimizer=torch.optim.AdamW(
                model.parameters(), lr=lr_w, weight_decay=cfg.bilevel.weight_decay
            ),
            config=Config(type=method.split()[1], unroll_steps=1),
            train_data_loader=Stream(s, val=False),
            device="cpu",
        )
        engine = Engine(
            config=EngineConfig(train_iters=10**9, logger_type="none"),
            problems=[upper, lower],
            dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        )
        try:
            engine.run()
        except Stop:
            pass
    else:  # BOAT
        from boat_torch import Problem

        up, model = Logits(len(names), torch.float32), s.state.w
        config = {
            "fo_op": method.split()[1],
            "gm_op": None,
            "na_op": None,
            "lower_level_model": model,
            "upper_level_model": up,
            "lower_level_var": list(model.parameters()),
            "upper_level_var": list(up.parameters()),
            "lower_level_opt": torch.optim.AdamW(
                model.parameters(), lr=lr_w, weight_decay=cfg.bilevel.weight_decay
            ),
            "upper_level_opt": torch.optim.AdamW(up.parameters(), lr=lr_lam, weight_decay=0.0),
            "device": "cpu",
            "lower_iters": 1,
            "fo_ol_batch_input": False,
            "return_grad": False,
            "loss_log_path": str(Path(tempfile.mkdtemp()) / "losses.json"),
            "PGDO": {
                "y_hat_lr": lr_w,
                "gamma_init": cfg.bilevel.alpha,
                "gamma_max": cfg.bilevel.alpha,
                "gamma_argmax_step": 1,
                "update_y_ahead": UPDATE_Y_AHEAD,
                "penalty": "difference",
            },
            "VFO": {"y_hat_lr": lr_w, "eta": 1.0, "u1": 1.0},
        }
        losses = {
            "lower_level_loss": {"function": "peers.boat_lm_lower", "params": {"fn": lower_loss}},
            "upper_level_loss": {"function": "peers.boat_lm_upper", "params": {"fn": fns.val_loss}},
        }
        problem = Problem(config, losses)
        problem.build_ll_solver()
        problem.build_ul_solver()
        t = 0
        while time.perf_counter() - start < budget:
            batch, val = step_batches(s, t)
            problem.run_iter(batch[0], val[0], t)
            record(up.p())
            t += 1
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    return {
        "names": names,
        "trace": trace,
        "seconds": seconds,
        "steps": len(trace),
        "peak_mib": max(0, peak - rss0) / 1024,
    }


def boat_lm_lower(feed: dict, ul_model: Logits, ll_model: nn.Module, fn=None) -> torch.Tensor:
    """BOAT's lower-level objective on a language model: L2(p, w) of the training batch."""
    return fn(ll_model, feed, ul_model.p())


def boat_lm_upper(feed: dict, ul_model: Logits, ll_model: nn.Module, fn=None) -> torch.Tensor:
    """BOAT's upper-level objective: the validation loss of w."""
    return fn(ll_model, feed)


def run_lm_child(method: str, tiny: bool, budget: float) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--lm-child",
        method,
        str(int(tiny)),
        str(budget),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        lines = [x for x in out.stderr.strip().splitlines() if x.strip()]
        return {"error": lines[-1] if lines else f"exit status {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fine_tune(weights: dict[str, float], tiny: bool, workdir: Path, name: str) -> float:
    """Held-out loss of a fresh model fine-tuned on a resample by `weights` (same n, steps)."""
    from scalebio_core import files
    from scalebio_core.train import runs
    from scalebio_core.train.pipeline import resample_run, sft

    run_dir = workdir / "planted_run"
    cfg = lm_config(tiny, str(run_dir))
    if not (run_dir / runs.CONFIG).exists():
        files.write_yaml(run_dir / runs.CONFIG, cfg.to_dict())
    out = workdir / f"sft_{name.replace(' ', '_')}"
    n, steps = (120, 3) if tiny else (3000, 250)
    data = resample_run(run_dir, n, out / "data" / "train.jsonl", seed=0, weights=weights)
    result = sft(
        cfg.replace(steps=steps, out_dir=str(out), schedule="cosine", warmup_ratio=0.03),
        data,
        out,
        progress=False,
    )
    return float(result["target_loss"])


def lm_part(tiny: bool, budget: float) -> tuple[list[str], list[str]]:
    from scalebio_core.sources.corpora import planted_weights

    planted = planted_weights(MIXTURE)
    installed = peers_installed()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in LM_METHODS:
            peer = next((dist for name, dist in PEERS.items() if method.startswith(name)), None)
            if peer is not None and installed[peer] is None:
                rows.append({"method": method, "error": f"{peer} is not installed (make peers)"})
                continue
            r = run_lm_child(method, tiny, budget)
            print(f"  LM {method}: {r.get('error') or r['steps']} steps", file=sys.stderr)
            if "error" not in r:
                if not r["trace"]:
                    r = {"error": f"no upper step within {budget:g} s"}
                else:
                    final = np.asarray(r["trace"][-1][1])
                    target = np.array([planted[n] for n in r["names"]])
                    r["distance"] = float(np.linalg.norm(final - target))
                    if not np.isfinite(final).all():
                        r = {"error": f"p is not finite: {final.tolist()}"}
                    else:
                        r["heldout"] = fine_tune(
                            dict(zip(r["names"], final.tolist())), tiny, Path(tmp), method
                        )
            rows.append({"method": method, **r})
        uniform = fine_tune(dict.fromkeys(planted, 0.25), tiny, Path(tmp), "uniform")
    base = next((r for r in rows if r["method"] == "ScaleBiO" and "error" not in r), None)
    lines = [
        f"| method | upper steps in {budget:g} s | seconds per upper step | peak MiB | "
        "‖p − p_planted‖ at the end | held-out loss after fine-tuning | "
        "× ScaleBiO: s/step, memory |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | — | — | — | — | — |")
            continue
        per = r["seconds"] / r["steps"]
        ratios = "1, 1"
        if base is not None and r is not base:
            base_per = base["seconds"] / base["steps"]
            ratios = f"{per / base_per:.2f}, {ts._ratio(r['peak_mib'], base['peak_mib'])}"
        lines.append(
            f"| {r['method']} | {r['steps']} | {per:.3f} | {r['peak_mib']:.0f} | "
            f"{r['distance']:.3f} | {r['heldout']:.4f} | {ratios} |"
        )
    lines.append(
        f"| uniform (no run) | — | — | — | {np.linalg.norm(np.full(4, 0.25) - MIXTURE):.3f} | "
        f"{uniform:.4f} | — |"
    )
    notes = [
        f"Corpus: the planted mixture {MIXTURE} (label_a … label_d), configs/planted.yaml at "
        f"{'smoke' if tiny else 'quick'} (embedded nano GPT-2, batch "
        f"{lm_config(tiny, 'x').batch_size}, balanced); every method from the same initial "
        "model and the same batches, AdamW at the preset's rates (model and λ), constant, one "
        "lower step per upper step (Betty: unroll_steps = 1; BOAT: lower_iters = 1), eager "
        "attention (SDPA's CPU kernel has no second derivative, which Betty's neumann and cg "
        "take). "
        "ScaleBiO's step also trains its second model u; BOAT PGDO's ŷ is that model; Betty's "
        "darts, neumann and cg estimate the hypergradient from the one model.",
        "Held-out loss: a fresh model fine-tuned on a resample by the final weights "
        f"({'120 records, 3 steps' if tiny else '3000 records, 250 steps'}), scored on a fresh "
        "draw of the target distribution; one seed.",
    ]
    return notes, lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--lm-child"]:
        try:
            print(json.dumps(lm_child(argv[1], bool(int(argv[2])), float(argv[3]))))
        except Exception as e:  # the row says how the peer failed
            traceback.print_exc()
            print(f"{type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
            return 1
        return 0
    if argv[:1] == ["--child"]:
        method, d, spec, p_star = argv[1], int(argv[2]), json.loads(argv[3]), json.loads(argv[4])
        try:
            print(json.dumps(child(method, d, ts.Settings(**spec), p_star)))
        except Exception as e:  # the row says how the peer failed
            traceback.print_exc()
            print(f"{type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
            return 1
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="d = 100, short budgets, one rate")
    ap.add_argument("--d", type=int, default=1000, help="toy size (parameters)")
    ap.add_argument("--budget", type=float, help="seconds per method in (b) (default 60, tiny 4)")
    ap.add_argument("--part", choices=("all", "toy", "lm"), default="all")
    ap.add_argument("--out", type=Path, help="write/replace the Peers section of this file")
    a = ap.parse_args(argv)
    s = ts.Settings(tol=TOL)
    d, grid = a.d, LR_GRID
    if a.tiny:
        d, grid = 100, (2.0,)
        s = replace(s, steps_scalebio=200, steps_implicit=20)
    start = time.perf_counter()
    installed = peers_installed()
    lines = ["Installed: " + ", ".join(f"{k} {v or 'missing'}" for k, v in installed.items()) + "."]
    if a.part in ("all", "toy"):
        notes, rows = toy_part(d, s, grid)
        lines += ["", "### (a) The exact toy", "", *toy_table(rows), "", *notes]
    if a.part in ("all", "lm"):
        budget = a.budget or (4.0 if a.tiny else 60.0)
        notes, table = lm_part(a.tiny, budget)
        lines += [
            "",
            "### (b) Reweighting the planted mixture with a GPT-2",
            "",
            *table,
            "",
            *notes,
        ]
    lines += ["", f"Total wall time {time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines)
    print(text)
    if a.out:
        write_section(a.out, "Peers: Betty and BOAT beside ScaleBiO", [*machine_lines(), "", text])
    return 0


if __name__ == "__main__":
    sys.exit(main())
