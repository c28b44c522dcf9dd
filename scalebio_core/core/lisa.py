"""LISA: layerwise importance sampling, so that only a few decoder blocks train at a time.

Every `interval` steps all decoder blocks are frozen and `n_active` of them, drawn at random, are
unfrozen; parameters outside the blocks (embeddings, head, final norm) keep training. The draw of
period k = step // interval depends only on (seed, k), so a resumed run reproduces it without
replaying earlier draws. Unlike the public reference code, the optimizer state of parameters that
become frozen is freed (`drop_frozen_state=True`), so memory really falls.

The blocks are those `blocks.find_blocks` finds (or the dotted path the user gives).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..errors import LisaError
from ..files import nbytes
from .blocks import find_blocks


def draw_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on `parts` (stable across processes and platforms)."""
    data = b"".join(int(x).to_bytes(16, "little", signed=True) for x in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


# ---------------------------------------------------------------- finding the blocks


# ---------------------------------------------------------------- the sampler


class LisaSampler:
    """Which blocks train at each step: `n_active` of `n_blocks`, redrawn every `interval` steps.

    The draw of period k = step // interval is `randperm(n_blocks)[:n_active]` (sorted) under a
    generator seeded with draw_seed(seed, k). Only the generator's *initial seed* is used (or an
    int seed), never its state, so the draw at any step is reproducible without replay.
    """

    def __init__(
        self, n_blocks: int, n_active: int, interval: int, generator: torch.Generator | int
    ):
        for name, v in (("n_blocks", n_blocks), ("n_active", n_active), ("interval", interval)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise LisaError(f"LisaSampler: {name} must be an int; got {v!r}.")
        if n_blocks < 1:
            raise LisaError(f"LisaSampler: n_blocks={n_blocks}; the model needs at least 1 block.")
        if not 1 <= n_active <= n_blocks:
            raise LisaError(
                f"LisaSampler: n_active={n_active} but there are n_blocks={n_blocks} decoder "
                f"blocks; choose n_active between 1 and {n_blocks}."
            )
        if interval < 1:
            raise LisaError(
                f"LisaSampler: interval={interval}; the number of steps between redraws must be "
                ">= 1 (the paper uses 20)."
            )
        self.n_blocks, self.n_active, self.interval = n_blocks, n_active, interval
        if isinstance(generator, torch.Generator):
            self.seed = int(generator.initial_seed())
        else:
            self.seed = int(generator)
        self._cache: tuple[int, tuple[int, ...]] | None = None

    def period(self, step: int) -> int:
        """Index of the draw in force at `step`."""
        if step < 0:
            raise LisaError(f"LisaSampler: step={step}; steps count from 0.")
        return step // self.interval

    def draw(self, period: int) -> tuple[int, ...]:
        """The sorted active block indices of draw number `period`."""
        if self._cache is not None and self._cache[0] == period:
            return self._cache[1]
        g = torch.Generator().manual_seed(draw_seed(self.seed, period))
        idx = tuple(sorted(torch.randperm(self.n_blocks, generator=g)[: self.n_active].tolist()))
        self._cache = (period, idx)
        return idx

    def active_at(self, step: int) -> tuple[int, ...]:
        """The sorted indices of the blocks that train at `step`."""
        return self.draw(self.period(step))


# ---------------------------------------------------------------- freezing


class Lisa:
    """LISA on one model: call `apply(step, optimizer)` every step, before the forward pass.

    Build it before any LISA freezing: the requires_grad flags at construction are the ceiling
    (a parameter frozen then, e.g. a PEFT base weight, is never unfrozen). All parameters stay
    registered with the optimizer; only requires_grad, .grad and optimizer state change.
    """

    def __init__(
        self,
        model: nn.Module,
        n_active: int = 2,
        interval: int = 20,
        seed: int | torch.Generator = 0,
        path: str | None = None,
        train_embeddings: bool = True,
        drop_frozen_state: bool = True,
    ):
        self.model = model
        self.path, self.blocks = find_blocks(model, path)
        try:
            self.sampler = LisaSampler(len(self.blocks), n_active, interval, seed)
        except LisaError as e:
            raise LisaError(f"{e} (blocks found at '{self.path}')") from e
        self.train_embeddings = train_embeddings
        self.drop_frozen_state = drop_frozen_state
        self._trainable = {id(p): p.requires_grad for p in model.parameters()}
        self._block_params = [list(b.parameters()) for b in self.blocks]
        in_blocks = {id(p) for ps in self._block_params for p in ps}
        self._outside = [p for p in model.parameters() if id(p) not in in_blocks]
        self._period: int | None = None
        self.active: tuple[int, ...] = ()

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def apply(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> tuple[int, ...]:
        """Set the trainable blocks for `step`; returns the active block indices.

        requires_grad changes only when a new draw starts (steps 0, interval, …) or on the first
        call (e.g. after resuming mid-period). Frozen parameters get `.grad = None` and, with an
        optimizer and `drop_frozen_state`, their optimizer state is deleted (AdamW re-initialises
        it lazily if they train again).
        """
        period = self.sampler.period(step)
        if period == self._period:
            return self.active
        self.active = self.sampler.draw(period)
        for p in self._outside:
            p.requires_grad_(self.train_embeddings and self._trainable[id(p)])
        for ps in self._block_params:
            for p in ps:
                p.requires_grad_(False)
        for i in self.active:
            for p in self._block_params[i]:
                p.requires_grad_(self._trainable[id(p)])
        for p in self.model.parameters():
            if not p.requires_grad:
                p.grad = None
                if optimizer is not None and self.drop_frozen_state:
                    optimizer.state.pop(p, None)
        self._period = period
        return self.active

    def n_trainable(self) -> int:
        """Number of parameter elements that train now."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def pair_seeds(seed: int, share: bool) -> tuple[int, int]:
    """Seeds of the (w, u) samplers: one shared draw, or independent draws (the paper)."""
    seed_w = draw_seed(seed, 0)
    return (seed_w, seed_w) if share else (seed_w, draw_seed(seed, 1))


def make_lisa_pair(
    w: nn.Module,
    u: nn.Module,
    n_active: int = 2,
    interval: int = 20,
    seed: int = 0,
    share: bool = False,
    **kwargs: Any,
) -> tuple[Lisa, Lisa]:
    """LISA for ScaleBiO's two copies: (lisa_w, lisa_u), sharing one draw when `share`.

    Seeds come from `pair_seeds`: w's draw is the same whether or not it is shared.
    Extra keyword arguments (path, train_embeddings, drop_frozen_state) go to both.
    """
    seed_w, seed_u = pair_seeds(seed, share)
    lisa_w = Lisa(w, n_active, interval, seed_w, **kwargs)
    lisa_u = Lisa(u, n_active, interval, seed_u, **kwargs)
    if share and lisa_w.n_blocks != lisa_u.n_blocks:
        raise LisaError(
            f"share=True needs w and u with the same number of blocks; w has {lisa_w.n_blocks} "
            f"at '{lisa_w.path}', u has {lisa_u.n_blocks} at '{lisa_u.path}'. Use share=False."
        )
    return lisa_w, lisa_u


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of the tensors held in the optimizer's per-parameter state."""
    return nbytes(list(optimizer.state.values()))
