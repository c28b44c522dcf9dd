"""The recipe of `method: swarm`: N proxy runs on mixtures around the natural shares, each scored
by its target loss, then the fitted loss's minimiser (`core.swarm`) as the weights.

Each proxy is a plain fine-tuning (`plain_step`, the weights fixed) of the same initial model
on its own mixture, for `swarm_steps` steps, on the same batches as every other proxy (step j
of each proxy reads the sampler's batch j: the proxies differ by their mixture alone), and is
scored at its end by its mean loss on the whole validation set. The proxies run one after the
other as the steps of one `loop.Method`: proxy i is steps i·S … i·S + S − 1 of the run
(S = swarm_steps), so the loop's trajectory, timing, checkpoint cadence, signals and resume are
those of every method. Each proxy's last row holds its result (`target_loss`, and `result`: its
mixture, tokens and seconds); a checkpoint covers the finished proxies only (each proxy starts
afresh from the initial model and its own seed), so a resume continues at the first unfinished
proxy. A checkpoint is written as each proxy ends (at the next one's first step) and at the
loop's cadence.

The run folder also holds swarm.jsonl (one line per finished proxy) and, once the last proxy
has ended, swarm.json (the fit and the compute: training tokens of the forward–backward passes,
evaluation tokens, seconds). weights.json holds the natural shares (the proxies' prior mean)
until the last proxy has ended, then the minimiser of the fit.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import files, messages
from ..core.baselines import fixed_weights, plain_step
from ..core.bilevel import make_optimizer
from ..core.swarm import draw_mixtures, n_coefficients, require_lightgbm, swarm_weights
from ..errors import ConfigError
from . import checkpoint, runs
from .build import count_tokens, setup, train_batch
from .config import TrainConfig
from .evaluation import target_loss
from .losses import LMFns

PROXIES, SUMMARY = "swarm.jsonl", "swarm.json"
SEED_STRIDE = 1_000_003
"""Proxy i of a run with seed s draws its dropout from torch seed s · SEED_STRIDE + i."""


def proxy_steps(cfg: TrainConfig) -> int:
    """Steps of each proxy of a swarm: swarm_steps, or the run's steps when it is 0."""
    return cfg.swarm.steps or cfg.steps


def swarm_rows(cfg: TrainConfig) -> int:
    """Rows of a finished swarm's trajectory.jsonl: every step of every proxy."""
    return cfg.swarm.runs * proxy_steps(cfg)


class SwarmRun:
    """`method: swarm`: the proxies as the steps of one run, then the fit (module docstring)."""

    desc = "swarm"
    advice = "lr_w"
    learns_weights = False  # its rows' p are the proxies' mixtures: nothing to converge
    checkpoints = True
    recorded_config = None

    def __init__(self, cfg: TrainConfig, accelerator: Any):
        sc = cfg.swarm
        if sc.regressor == "lightgbm":
            require_lightgbm()  # before any proxy trains
        if accelerator.num_processes > 1:
            raise ConfigError(
                "method: swarm trains its proxies in one process: run python -m scalebio_core "
                "train … directly, not under accelerate launch."
            )
        if cfg.lisa_active > 0:
            raise ConfigError(
                "method: swarm trains every block of each proxy: set lisa_active=0 (LISA is "
                "for ScaleBiO's and DoReMi's runs)."
            )
        self.cfg, self.sc = cfg, sc
        self.setup = s = setup(cfg, accelerator, copies=1)
        self.dist = s.dist
        self.n_steps = proxy_steps(cfg)
        self.total = sc.runs * self.n_steps
        counts = dict(zip(s.names, s.train.counts().tolist()))
        self.natural = np.array(list(fixed_weights("natural", counts).values()))
        self.mixtures = draw_mixtures(self.natural, sc.runs, sc.concentration, cfg.seed)
        self.bcfg = dataclasses.replace(s.state.config, total_steps=self.n_steps)
        self.fns = LMFns(cfg.val_dropout, chunked_head=cfg.gradient_checkpointing)
        self.init = {k: v.detach().clone() for k, v in s.state.w.state_dict().items()}
        self.done: list[dict] = []
        self.final: tuple[np.ndarray, dict] | None = None
        self.began = 0.0
        coef = n_coefficients(len(s.names), sc.pairs)
        if sc.regressor == "log-linear" and sc.runs < coef:
            messages.warn(
                f"swarm: {sc.runs} proxies for the {coef} coefficients of the log-linear fit "
                f"over {len(s.names)} sources: the fit is underdetermined (the smallest "
                f"coefficients that fit are used). Give swarm_runs >= {coef}, or "
                "swarm_pairs=false for the first-order law.",
                stacklevel=2,
            )

    # ---------------------------------------------------------------- steps

    def _start_proxy(self, i: int) -> None:
        """Proxy i: the initial model, a fresh optimizer, its own dropout seed; the proxies
        before it are checkpointed (their rows are in the trajectory now)."""
        s = self.setup
        if i > 0:
            self.save(Path(self.cfg.out_dir), self.weights())
        s.state.w.load_state_dict(self.init)
        c = s.state.config
        s.state.opt_w = make_optimizer(
            s.state.w.parameters(), c.optimizer, c.lr_w, c.weight_decay, c
        )
        torch.manual_seed(self.cfg.seed * SEED_STRIDE + i)
        self.tokens, self.began = 0, time.perf_counter()

    def step(self, t: int) -> tuple[dict, int]:
        s = self.setup
        i, j = divmod(t, self.n_steps)
        if j == 0:
            self._start_proxy(i)
        p = torch.as_tensor(self.mixtures[i], dtype=torch.float32, device=s.device)
        batch = train_batch(s, j)  # step j of every proxy: the same batch
        with s.dist.autocast():
            m = plain_step(s.state.w, s.state.opt_w, batch, self.fns, p, self.bcfg, j, s.divisor)
        s.state.step = t + 1
        tokens = count_tokens(s, batch)
        self.tokens += tokens
        row = {
            "step": t,
            "proxy": i,
            "proxy_step": j,
            "p": dict(zip(s.names, self.mixtures[i].tolist())),
            "loss": m["loss"],
            "loss_w": dict(zip(s.names, m["loss_w"])),
            "lr_w": m["lr_w"],
            "tokens": tokens,
        }
        if j == self.n_steps - 1:
            row["target_loss"], row["result"] = self._score(i)
            self.done.append(row["result"])
        return row, tokens

    def _score(self, i: int) -> tuple[float, dict]:
        """Proxy i's target loss (mean over the validation set) and its record."""
        s = self.setup
        with s.dist.autocast():
            loss = target_loss(s.state.w, s.val, s.tokenizer.pad_token_id, s.cfg.val_batch_size)
        record = {
            "proxy": i,
            "p": dict(zip(s.names, self.mixtures[i].tolist())),
            "target_loss": loss,
            "tokens": self.tokens,
            "eval_tokens": int(sum(len(x) for x in s.val.input_ids)),
            "seconds": time.perf_counter() - self.began,
        }
        return loss, record

    def postfix(self, row: dict) -> str:
        return f"proxy {row['proxy'] + 1}/{self.sc.runs} loss={row['loss']:.3f}"

    # ---------------------------------------------------------------- the product

    def weights(self) -> dict[str, float]:
        """The fit's minimiser once every proxy has ended; the natural shares before."""
        names = self.setup.names
        if len(self.done) < self.sc.runs:
            return dict(zip(names, self.natural.tolist()))
        if self.final is None:
            t0 = time.perf_counter()
            p = np.array([[r["p"][n] for n in names] for r in self.done])
            loss = np.array([r["target_loss"] for r in self.done])
            w, info = swarm_weights(p, loss, self.natural, self.sc, self.cfg.seed)
            self.final = (w, {**info, "seconds": time.perf_counter() - t0})
        return dict(zip(names, self.final[0].tolist()))

    def summary(self) -> dict:
        """swarm.json: the swarm's settings, the fit and its compute."""
        w = self.weights()
        fit = self.final[1] if self.final else None
        proxy_seconds = sum(r["seconds"] for r in self.done)
        return {
            "runs": self.sc.runs,
            "steps_per_proxy": self.n_steps,
            "concentration": self.sc.concentration,
            "natural": dict(zip(self.setup.names, self.natural.tolist())),
            "weights": w,
            "fit": fit,
            "compute": {
                "forward_backward_tokens": sum(r["tokens"] for r in self.done),
                "eval_tokens": sum(r["eval_tokens"] for r in self.done),
                "proxy_seconds": proxy_seconds,
                "fit_seconds": fit["seconds"] if fit else 0.0,
                "seconds": proxy_seconds + (fit["seconds"] if fit else 0.0),
            },
        }

    # ---------------------------------------------------------------- checkpoints

    def save(self, run_dir: Path, weights: dict[str, float]) -> None:
        """last.pt (the step the finished proxies cover, the run's identity), weights.json,
        swarm.jsonl; swarm.json once every proxy has ended."""
        run_dir = Path(run_dir)
        sd = {"step": len(self.done) * self.n_steps, "identity": self.setup.identity()}
        files.write_text(run_dir / PROXIES, "".join(json.dumps(r) + "\n" for r in self.done))
        if len(self.done) == self.sc.runs:
            files.write_json(run_dir / SUMMARY, self.summary())
        files.save_torch(run_dir / runs.CHECKPOINT, sd)
        files.write_json(run_dir / runs.WEIGHTS, weights)

    def load(self, run_dir: Path, accept_data_change: bool = False) -> tuple[int, dict]:
        """The finished proxies, from the checkpoint's step and the trajectory's rows."""
        path = Path(run_dir) / runs.CHECKPOINT
        try:
            sd = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or damaged file: torch's zip and unpickling errors
            raise ConfigError(
                f"cannot resume: {path} is unreadable ({type(e).__name__}). Nothing was "
                f"changed; {PROXIES} keeps the proxies run so far. Start a new out_dir."
            ) from e
        if not isinstance(sd, dict) or "step" not in sd:
            raise ConfigError(f"cannot resume: {path} is not a checkpoint of this package.")
        changes = checkpoint.check_identity(
            sd.get("identity"), self.setup.identity(), path, accept_data_change
        )
        start = int(sd["step"])
        rows = runs.covered_rows(Path(run_dir) / runs.TRAJECTORY, start)
        self.done = [r["result"] for r in rows if "result" in r]
        if start % self.n_steps or len(self.done) != start // self.n_steps:
            raise ConfigError(
                f"cannot resume: {path} covers {start} steps but {runs.TRAJECTORY} holds "
                f"{len(self.done)} finished proxies of {self.n_steps} steps. Nothing was "
                "changed; start a new out_dir."
            )
        self.setup.state.step = start
        return start, changes
