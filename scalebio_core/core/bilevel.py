"""The ScaleBiO step: weighted lower-level loss, the closed-form λ-gradient, one u/w/λ update.

Notation (docs/algorithm.md, the one sign convention of the project):

    K sources, logits lam ∈ R^K, weights p = softmax(lam).
    L2(lam, w) = Σ_s p_s · l̄_s(w)           lower level (train mixture), l̄_s = mean loss of source s
    L1(w)                                    upper level (validation / target loss)
    min_{lam, w} max_u  L1(w) + alpha · (L2(lam, w) − L2(lam, u))

One step, all gradients first order, in this order:
    1. u   ← u   − lr_u · ∇_u [alpha · L2(lam, u)]
    2. w   ← w   − lr_w · ∇_w [L1(w) + alpha · L2(lam, w)]
    3. lam ← lam − lr_lam · alpha · (diag(p) − p pᵀ)(l̄(w) − l̄(u))   (both at the pre-update models)

Sources where w is worse than u lose weight. Nothing here prints, plots or touches files, and
nothing names a distributed engine: the processes are reached through one `Distribution`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import ConfigError, NonFiniteLossError, check_all, check_types
from .distributed import LOCAL, Distribution
from .masters import MasterOptimizer

Reduce = Callable[[torch.Tensor], torch.Tensor]
MAX_LR = 1e6
"""The largest learning rate a config accepts (lr_w, lr_u, lr_lam): far above any that trains,
well below what overflows a float32 step."""
LRS = ("lr_w", "lr_u", "lr_lam")


@dataclass(frozen=True)
class BilevelConfig:
    """Hyperparameters of the ScaleBiO step (defaults: the paper's GPT-2 run)."""

    alpha: float = 10.0
    """Penalty weight alpha_0 of the lower level (10 for GPT-2, 100 for LLMs in the paper)."""
    tau: float = 1.0
    """Growth of alpha per outer iteration: alpha_i = alpha_0 · tau^i (1 = constant, paper)."""
    tau_every: int = 1
    """Steps per outer iteration for the tau growth."""
    alpha_max: float = math.inf
    """Upper bound on alpha when tau > 1."""
    lr_w: float = 1e-5
    """Learning rate of the upper-level model w."""
    lr_u: float = 1e-5
    """Learning rate of the lower-level follower u."""
    lr_lam: float = 1e-2
    """Learning rate of the logits lam."""
    optimizer: str = "adamw"
    """Optimizer of u and w: 'adamw' (paper) or 'sgd'."""
    lam_optimizer: str = "adamw"
    """Optimizer of lam: 'adamw' (paper) or 'sgd'."""
    weight_decay: float = 5e-4
    """Decoupled weight decay of u and w (never applied to lam)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (u, w and lam)."""
    momentum: float = 0.0
    """SGD momentum, when optimizer is 'sgd'."""
    schedule: str = "cosine"
    """Learning-rate schedule of u and w: 'cosine' (with warm-up) or 'constant'."""
    lam_schedule: str = "cosine"
    """Learning-rate schedule of lam (keep it as u and w's: lam must not outrun stalled models)."""
    warmup_ratio: float = 0.03
    """Fraction of total_steps spent in linear warm-up (cosine schedules)."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of the peak learning rate."""
    total_steps: int = 1000
    """Number of steps the schedules span."""
    clip_norm: float | None = None
    """Max gradient norm of u and w; None clips at alpha (the reference), inf turns clipping off."""

    def __post_init__(self) -> None:
        check_types(self)
        bad_lr = next((k for k in LRS if not 0 < getattr(self, k) <= MAX_LR), None)
        betas = tuple(self.betas) if isinstance(self.betas, list | tuple) else ()
        object.__setattr__(self, "betas", betas)  # YAML gives a list
        check_all(
            "BilevelConfig",
            [
                (self.alpha > 0 and math.isfinite(self.alpha), "alpha must be a finite number > 0"),
                (self.tau >= 1, "tau must be >= 1 (alpha may only grow; use 1 for constant alpha)"),
                (self.tau_every >= 1, "tau_every must be a whole number >= 1"),
                (self.alpha_max >= self.alpha, "alpha_max must be >= alpha"),
                (
                    bad_lr is None,
                    f"learning rates must be > 0 and at most {MAX_LR:g} (a finite number); got "
                    f"{bad_lr} = {getattr(self, bad_lr or 'lr_w')!r}. Set {bad_lr} to a usual "
                    f"rate, e.g. {getattr(BilevelConfig, bad_lr or 'lr_w'):g}",
                ),
                (self.optimizer in OPTIMIZERS, f"optimizer must be one of {sorted(OPTIMIZERS)}"),
                (
                    self.lam_optimizer in OPTIMIZERS,
                    f"lam_optimizer must be one of {sorted(OPTIMIZERS)}",
                ),
                (self.weight_decay >= 0, "weight_decay must be >= 0"),
                (self.schedule in SCHEDULES, f"schedule must be one of {sorted(SCHEDULES)}"),
                (
                    self.lam_schedule in SCHEDULES,
                    f"lam_schedule must be one of {sorted(SCHEDULES)}",
                ),
                (0 <= self.warmup_ratio < 1, "warmup_ratio must lie in [0, 1)"),
                (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must lie in [0, 1]"),
                (self.total_steps >= 1, "total_steps must be >= 1"),
                (self.clip_norm is None or self.clip_norm > 0, "clip_norm must be > 0 or None"),
                (
                    len(betas) == 2
                    and all(isinstance(b, float | int) and 0 <= b < 1 for b in betas),
                    "betas must be two numbers in [0, 1), e.g. [0.9, 0.999]",
                ),
                (self.momentum >= 0, "momentum must be >= 0"),
            ],
        )

    def alpha_at(self, step: int) -> float:
        """alpha_i = alpha_0 · tau^i with i = step // tau_every, capped at alpha_max."""
        if self.tau == 1:
            return self.alpha
        i = step // self.tau_every
        return min(self.alpha * self.tau**i, self.alpha_max)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- schedules


def warmup_cosine(
    step: int, total_steps: int, warmup_ratio: float, min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to min_ratio."""
    warmup = int(math.ceil(warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_multiplier(kind: str, step: int, cfg: BilevelConfig) -> float:
    if kind == "constant":
        return 1.0
    return warmup_cosine(step, cfg.total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)


SCHEDULES = {"cosine", "constant"}
OPTIMIZERS = {"adamw", "sgd"}


def make_optimizer(
    params: Iterable[torch.Tensor], kind: str, lr: float, weight_decay: float, cfg: BilevelConfig
) -> torch.optim.Optimizer:
    params = list(params)
    if params and all(q.dtype in (torch.bfloat16, torch.float16) for q in params):
        # 16-bit weights (precision: bf16-weights): the update runs on fp32 masters
        return MasterOptimizer(
            params, kind, lr, weight_decay, betas=cfg.betas, momentum=cfg.momentum
        )
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=weight_decay)


# ---------------------------------------------------------------- the lower-level loss


def weighted_lower_loss(
    losses: torch.Tensor,
    source_ids: torch.Tensor,
    p: torch.Tensor,
    divisor: torch.Tensor | None = None,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2 = Σ_s p_s · l̂_s with l̂_s = (Σ_{i in batch, src(i)=s} loss_i) / divisor_s.

    `losses` are per-sample losses (each already the mean over its response tokens), `source_ids`
    their source index in [0, K). With `divisor=None` the divisor is the *realized* count of each
    source, summed over ranks by `reduce`, and a source absent from the batch contributes nothing
    (the paper's estimate). Pass the *expected* counts as `divisor` for an unbiased estimate under
    uniform ("union") sampling.

    Returns (L2 on this rank's samples — differentiable in `losses` and `p`, the global per-source
    estimates l̂ (detached, K), the global counts (K)).
    """
    reduce = reduce or (lambda t: t)
    k = p.shape[0]
    if losses.ndim != 1 or source_ids.shape != losses.shape:
        raise ValueError(
            f"per-sample losses must be a 1-D tensor with one source id each; got losses of shape "
            f"{tuple(losses.shape)} and source_ids of shape {tuple(source_ids.shape)}."
        )
    if source_ids.numel() and (int(source_ids.min()) < 0 or int(source_ids.max()) >= k):
        raise ValueError(f"source ids must lie in [0, {k}); got {source_ids.unique().tolist()}.")
    ids = source_ids.to(losses.device)
    sums = torch.zeros(k, dtype=losses.dtype, device=losses.device).index_add(0, ids, losses)
    counts = reduce(torch.bincount(ids, minlength=k).to(losses.dtype))
    if divisor is None:
        div = counts.clamp_min(1)
    else:
        div = divisor.to(losses.dtype).to(losses.device)
        if bool((div <= 0).any()):
            empty = torch.nonzero(div <= 0).flatten().tolist()
            raise ConfigError(
                f"source(s) {empty} have an expected count of 0: a source with no samples cannot "
                "be weighted. Remove it from the sources or give it data."
            )
    per_source = sums / div
    l2 = (p.to(device=losses.device, dtype=losses.dtype) * per_source).sum()
    estimates = reduce(sums.detach()) / div
    return l2, estimates, counts


def lam_grad(
    p: torch.Tensor, loss_w: torch.Tensor, loss_u: torch.Tensor, alpha: float
) -> torch.Tensor:
    """∇_lam of alpha·(L2(lam, w) − L2(lam, u)) = alpha · (diag(p) − p pᵀ)(l̄(w) − l̄(u))."""
    d = (loss_w - loss_u).to(p.dtype)
    return alpha * p * (d - (p * d).sum())


# ---------------------------------------------------------------- state and step


class StepFns(Protocol):
    """What the step needs of a problem: source ids, per-sample losses and the validation loss."""

    def source_ids(self, batch: Any) -> torch.Tensor:
        """Source index of each sample of a (micro-)batch, known before any forward pass."""

    def source_losses(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample losses, their source ids) of `model` on a training batch."""

    def val_loss(self, model: nn.Module, val_batch: Any) -> torch.Tensor:
        """Scalar validation loss L1 of `model`."""


@dataclass
class BilevelState:
    """Everything one step reads and writes: the models, lam, their optimizers, the step count."""

    w: nn.Module
    u: nn.Module
    lam: torch.Tensor
    opt_w: torch.optim.Optimizer
    opt_u: torch.optim.Optimizer
    opt_lam: torch.optim.Optimizer
    config: BilevelConfig
    source_names: tuple[str, ...]
    step: int = 0

    @property
    def p(self) -> torch.Tensor:
        return torch.softmax(self.lam.detach(), dim=0)

    @property
    def alpha(self) -> float:
        return self.config.alpha_at(self.step)

    def weights(self) -> dict[str, float]:
        """Current weights p by source name (the method's product)."""
        return {n: float(v) for n, v in zip(self.source_names, self.p.tolist())}

    def state_dict(self, models: bool = True) -> dict[str, Any]:
        """Everything to resume; `models=False` leaves out w, u and their optimizers (sharded
        runs save those per rank, see `distributed.py`)."""
        sd = {
            "lam": self.lam.detach().clone(),
            "opt_lam": self.opt_lam.state_dict(),
            "step": self.step,
        }
        if models:
            sd.update(
                w=self.w.state_dict(),
                u=self.u.state_dict(),
                opt_w=self.opt_w.state_dict(),
                opt_u=self.opt_u.state_dict(),
            )
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load what `state_dict` gave (w, u and their optimizers only when present)."""
        if "w" in sd:
            self.w.load_state_dict(sd["w"])
            self.u.load_state_dict(sd["u"])
            self.opt_w.load_state_dict(sd["opt_w"])
            self.opt_u.load_state_dict(sd["opt_u"])
        with torch.no_grad():
            self.lam.copy_(sd["lam"])
        self.opt_lam.load_state_dict(sd["opt_lam"])
        self.step = int(sd["step"])


def check_source_names(source_names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(source_names)
    if not names:
        raise ConfigError("no sources: give at least one training source (two to reweight).")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"duplicate source names {dupes}: every source needs a unique name.")
    return names


def init_state(
    w: nn.Module,
    u: nn.Module,
    source_names: Iterable[str],
    config: BilevelConfig,
    lam: torch.Tensor | None = None,
) -> BilevelState:
    """Build the state: lam = 0 (uniform p) unless given; one optimizer each for w, u and lam.

    All parameters of w and u are registered with their optimizers now, before any freezing.
    """
    names = check_source_names(source_names)
    dtype = next(iter(w.parameters())).dtype
    if lam is None:
        lam = torch.zeros(len(names), dtype=torch.float32 if dtype.itemsize < 4 else dtype)
    if lam.shape != (len(names),):
        raise ConfigError(f"lam has shape {tuple(lam.shape)} but there are {len(names)} sources.")
    lam = lam.detach().clone().requires_grad_(True)
    c = config
    return BilevelState(
        w=w,
        u=u,
        lam=lam,
        config=c,
        source_names=names,
        opt_w=make_optimizer(w.parameters(), c.optimizer, c.lr_w, c.weight_decay, c),
        opt_u=make_optimizer(u.parameters(), c.optimizer, c.lr_u, c.weight_decay, c),
        opt_lam=make_optimizer([lam], c.lam_optimizer, c.lr_lam, 0.0, c),
    )


def set_lr(opt: torch.optim.Optimizer, peak: float, mult: float) -> float:
    """Set every group's learning rate to peak · mult; returns it."""
    for g in opt.param_groups:
        g["lr"] = peak * mult
    return peak * mult


# ---------------------------------------------------------------- the passes of a step


class MicroBatches(list):
    """A batch given as micro-batches: gradients accumulate, counts are those of the whole batch."""


def micro_batches(batch: Any) -> list:
    """The micro-batches of a batch (a batch that is not `MicroBatches` is one)."""
    return list(batch) if isinstance(batch, MicroBatches) else [batch]


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: the device of its first parameter (the CPU if it has none)."""
    return next((q.device for q in model.parameters()), torch.device("cpu"))


@dataclass
class TrainBatch:
    """A training batch as the lower level sees it: its micro-batches, the per-source counts of
    the whole batch over every process, and the per-source divisor of L2."""

    micro: list
    counts: torch.Tensor
    div: torch.Tensor

    @classmethod
    def of(
        cls,
        batch: Any,
        fns: StepFns,
        p: torch.Tensor,
        dist: Distribution,
        divisor: torch.Tensor | None = None,
    ) -> TrainBatch:
        """Counts from the source ids (before any forward); `divisor` None: the realized counts."""
        micro = micro_batches(batch)
        ids = torch.cat([torch.as_tensor(fns.source_ids(mb)).reshape(-1).cpu() for mb in micro])
        counts = dist.reduce(torch.bincount(ids, minlength=p.shape[0]).to(p.dtype).to(p.device))
        return cls(micro, counts, counts.clamp_min(1) if divisor is None else divisor)


def lower_backward(
    model: nn.Module,
    batch: TrainBatch,
    fns: StepFns,
    p: torch.Tensor,
    scale: float,
    label: str,
    step: int,
    dist: Distribution,
) -> torch.Tensor:
    """Backpropagate scale · L2(lam, model) over the micro-batches; returns l̄ (K, all ranks)."""
    est = torch.zeros_like(p)
    for mb in batch.micro:
        losses, ids = fns.source_losses(model, mb)
        l2, est_mb, _ = weighted_lower_loss(losses, ids, p, batch.div)
        check_finite({label: l2}, step, dist)
        dist.backward(model, scale * l2)
        est += est_mb.to(est)
    return dist.reduce(est)


def upper_backward(
    model: nn.Module,
    val_batch: Any,
    fns: StepFns,
    step: int,
    dist: Distribution,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Backpropagate L1(model) over the validation micro-batches (weighted by their samples,
    `micro_shares`); returns L1 (its ranks' shares summed in `dtype`, the precision of lam, on
    the model's device)."""
    micro = micro_batches(val_batch)
    shares = micro_shares(micro)
    l1 = 0.0
    for vmb, share in zip(micro, shares):
        part = fns.val_loss(model, vmb)
        part = part / len(micro) if share is None else part * share
        check_finite({"L1": part}, step, dist)
        dist.backward(model, part)
        l1 += float(part.detach())
    return float(dist.reduce(torch.tensor(l1, dtype=dtype, device=model_device(model))))


def micro_shares(micro: list) -> list[float | None]:
    """Each micro-batch's share of the batch's samples, where the micro-batches differ in size
    (a `micro_tokens` split: dict batches with source_ids), else None: equal shares."""
    sizes = [
        len(mb["source_ids"]) if isinstance(mb, dict) and "source_ids" in mb else 0 for mb in micro
    ]
    if 0 in sizes or len(set(sizes)) <= 1:
        return [None] * len(micro)
    total = sum(sizes)
    return [n / total for n in sizes]


def check_finite(values: dict[str, torch.Tensor], step: int, dist: Distribution = LOCAL) -> None:
    """Raise NonFiniteLossError if a loss is NaN/inf. With several processes the verdict is
    shared (a sum of the bad-loss counts), so every process raises at the same point and none is
    left waiting in a collective (a hang) for one that stopped."""
    bad = {k: float(v.detach()) for k, v in values.items() if not torch.isfinite(v.detach()).all()}
    if dist.world > 1:
        device = next(iter(values.values())).device
        others = float(dist.reduce(torch.tensor(float(len(bad)), device=device))) - len(bad)
        if others > 0 and not bad:
            bad = {f"{' / '.join(values)} on another process": math.nan}
    if bad:
        names = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: {names}. No parameter was updated in this step. "
            "Lower the learning rates or alpha, check the data for empty responses, or use fp32.",
            step=step,
            metrics=bad,
        )


# ---------------------------------------------------------------- the step


def scalebio_step(
    state: BilevelState,
    batch: Any,
    val_batch: Any,
    fns: StepFns,
    dist: Distribution = LOCAL,
    divisor: torch.Tensor | None = None,
) -> dict[str, Any]:
    """One ScaleBiO step on `state` (in place); returns the step's metrics.

    Gradients of u and w are computed first and every loss is checked for NaN/inf before any
    parameter moves, so a non-finite loss raises `NonFiniteLossError` with the state untouched.
    `batch` and `val_batch` may be `MicroBatches` (gradient accumulation): the per-source counts
    are those of the whole batch over every process, and the validation micro-batches are
    weighted equally. `divisor` replaces the realized per-source counts (see
    `weighted_lower_loss`). `dist` (`distributed.py`) reduces over the processes, backpropagates
    and steps u and w; the default is one process.
    """
    cfg, step = state.config, state.step
    alpha = cfg.alpha_at(step)
    # lam stays where it was made (the CPU); p goes where the losses are (a GPU's reductions
    # and NCCL's collectives need it there)
    p = state.p.to(model_device(state.w))
    train = TrainBatch.of(batch, fns, p, dist, divisor)

    # 1. u: the gradient of alpha · L2(lam, u)
    state.opt_u.zero_grad(set_to_none=True)
    lbar_u = lower_backward(state.u, train, fns, p, alpha, "L2(u)", step, dist)

    # 2. w: the gradient of L1(w) + alpha · L2(lam, w), on the same training batch
    state.opt_w.zero_grad(set_to_none=True)
    l1 = upper_backward(state.w, val_batch, fns, step, dist, p.dtype)
    lbar_w = lower_backward(state.w, train, fns, p, alpha, "L2(w)", step, dist)

    # every loss was finite: move u and w (clipped at alpha unless clip_norm is set) ...
    mult = lr_multiplier(cfg.schedule, step, cfg)
    lr_u = set_lr(state.opt_u, cfg.lr_u, mult)
    lr_w = set_lr(state.opt_w, cfg.lr_w, mult)
    max_norm = alpha if cfg.clip_norm is None else cfg.clip_norm
    gnorm_u = dist.clip_and_step(state.u, state.opt_u, max_norm)
    gnorm_w = dist.clip_and_step(state.w, state.opt_w, max_norm)

    # 3. lam: alpha · (diag(p) − p pᵀ)(l̄(w) − l̄(u)), from the losses before u and w moved
    lr_lam = set_lr(state.opt_lam, cfg.lr_lam, lr_multiplier(cfg.lam_schedule, step, cfg))
    state.opt_lam.zero_grad(set_to_none=True)
    state.lam.grad = lam_grad(p, lbar_w, lbar_u, alpha).to(state.lam.dtype).to(state.lam.device)
    state.opt_lam.step()
    state.step = step + 1

    l2_w, l2_u = float((p * lbar_w).sum()), float((p * lbar_u).sum())
    return {
        "step": step,
        "p": p.tolist(),
        "L1": l1,
        "L2_w": l2_w,
        "L2_u": l2_u,
        "gap": l2_w - l2_u,
        "loss_w": lbar_w.tolist(),
        "loss_u": lbar_u.tolist(),
        "counts": train.counts.tolist(),
        "alpha": alpha,
        "lr_w": lr_w,
        "lr_u": lr_u,
        "lr_lam": lr_lam,
        "grad_norm_w": gnorm_w,
        "grad_norm_u": gnorm_u,
    }
