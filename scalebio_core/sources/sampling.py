"""Training batches by source: which samples ("union" or "balanced", resumable), and how they
are laid out: right-padded rows (`collate`) or packed rows without padding (`pack`).

The batch estimate of L2 = Σ_s p_s · l̄_s divides each source's loss sum by a per-source count
(`bilevel.weighted_lower_loss`). Which count keeps it unbiased depends on the sampler:

* ``union``: each batch position is a uniform draw over all N samples, so a small source can be
  absent. Divide by ``expected_counts()`` = B·n_s/N (unbiased). Dividing by the *realized* count and
  dropping absent sources (the paper's estimate) is biased towards the large sources.
* ``balanced``: every batch holds every source, b_s ≥ 1 samples each, so the realized counts
  (``divisor=None``) are unbiased at every step. ``expected_counts()`` = B/K is also exact: the
  B mod K extra slots rotate over the sources, so any K consecutive batches give each source B
  samples in all.

``indices(step)`` is a pure function of (seed, step): a sampler rebuilt after a restart yields the
same batches, so resuming needs only the step number. It returns the *global* batch (all ranks);
each rank takes its slice, and the counts stay global.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import DataError

KINDS = ("union", "balanced")
IGNORE = -100  # label of prompt and padding tokens
NO_PAD = (
    "tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token (or add a pad "
    "token) before tokenizing."
)


def _fail(message: str) -> None:
    raise DataError(message)


def stream_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one named stream, stable across processes and Python versions."""
    key = ":".join(str(x) for x in ("scalebio", seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


class BatchSampler:
    """Global batches of sample indices; see the module docstring for the two kinds.

    Each stream (all samples for ``union``, each source for ``balanced``) is an infinite
    concatenation of epoch permutations, the permutation of epoch e drawn from a
    ``torch.Generator`` seeded by (seed, stream, e); batch t reads the stream at fixed positions.
    """

    def __init__(
        self,
        source_ids: torch.Tensor,
        n_sources: int,
        batch_size: int,
        kind: str = "balanced",
        seed: int = 0,
    ) -> None:
        ids = torch.as_tensor(source_ids, dtype=torch.long).flatten()
        if kind not in KINDS:
            _fail(f"unknown sampler kind {kind!r}; known kinds: {', '.join(KINDS)}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            _fail(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
        if n_sources < 1 or ids.numel() == 0:
            _fail("the sampler needs at least one source and one sample.")
        if int(ids.min()) < 0 or int(ids.max()) >= n_sources:
            _fail(f"source ids must lie in [0, {n_sources}); got {ids.unique().tolist()}.")
        counts = torch.bincount(ids, minlength=n_sources)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            _fail(f"source(s) {empty} have no samples: remove them from the sources or add data.")
        if kind == "balanced" and batch_size < n_sources:
            _fail(
                f"balanced batches hold every source, so batch_size ({batch_size}) must be >= the "
                f"number of sources ({n_sources}). Raise batch_size to at least {n_sources}, or "
                "use kind='union' with divisor=expected_counts()."
            )
        self.kind = kind
        self.seed = int(seed)
        self.batch_size = batch_size
        self.n_sources = n_sources
        self.n = ids.numel()
        self._counts = counts
        self._members = [torch.nonzero(ids == s).flatten() for s in range(n_sources)]
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def _perm(self, stream: int, epoch: int) -> torch.Tensor:
        """Permutation of stream `stream` (-1: all samples; s: source s) in epoch `epoch`."""
        key = (stream, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * self.n_sources + 8:
                self._perms.clear()
            n = self.n if stream < 0 else int(self._counts[stream])
            g = torch.Generator().manual_seed(stream_seed(self.seed, self.kind, stream, epoch))
            self._perms[key] = torch.randperm(n, generator=g)
        return self._perms[key]

    def _read(self, stream: int, start: int, length: int) -> list[int]:
        """Positions [start, start + length) of a stream's infinite epoch concatenation."""
        n = self.n if stream < 0 else int(self._counts[stream])
        out: list[int] = []
        pos, end = start, start + length
        while pos < end:
            epoch, offset = divmod(pos, n)
            take = min(end - pos, n - offset)
            out.extend(self._perm(stream, epoch)[offset : offset + take].tolist())
            pos += take
        return out

    def quotas(self, step: int) -> list[int]:
        """Samples per source in batch `step` (balanced): B // K, plus one for the sources that
        the rotating remainder reaches, i.e. slots step·r … step·r + r − 1 (mod K), r = B mod K."""
        k, r = self.n_sources, self.batch_size % self.n_sources
        base = self.batch_size // k
        extra = {(step * r + j) % k for j in range(r)}
        return [base + (s in extra) for s in range(k)]

    def _drawn_before(self, s: int, step: int) -> int:
        """Samples of source s used by batches 0 … step − 1 (balanced)."""
        k, r = self.n_sources, self.batch_size % self.n_sources
        return step * (self.batch_size // k) + max(0, (step * r - s + k - 1) // k)

    def indices(self, step: int) -> list[int]:
        """Sample indices of batch `step` (all ranks); a pure function of (seed, step)."""
        if step < 0:
            _fail(f"step must be >= 0, got {step}.")
        b = self.batch_size
        if self.kind == "union":
            return self._read(-1, step * b, b)
        out: list[int] = []
        for s, q in enumerate(self.quotas(step)):
            local = self._read(s, self._drawn_before(s, step), q)
            out.extend(self._members[s][local].tolist())
        g = torch.Generator().manual_seed(stream_seed(self.seed, "order", step))
        return [out[i] for i in torch.randperm(len(out), generator=g).tolist()]

    def expected_counts(self) -> torch.Tensor:
        """E[count of source s in a batch]: B·n_s/N (union), B/K (balanced); float64 [K]."""
        if self.kind == "union":
            return self.batch_size * self._counts.double() / self.n
        return torch.full((self.n_sources,), self.batch_size / self.n_sources, dtype=torch.float64)

    def __repr__(self) -> str:
        return (
            f"BatchSampler(kind={self.kind!r}, batch_size={self.batch_size}, "
            f"n_sources={self.n_sources}, n={self.n}, seed={self.seed})"
        )


def _checked(data: Any, indices: Sequence[int], pad_id: int | None, what: str) -> list[int]:
    if pad_id is None:
        _fail(NO_PAD)
    idx = [int(i) for i in indices]
    if not idx:
        _fail(f"{what} needs at least one sample index.")
    if min(idx) < 0 or max(idx) >= len(data):
        _fail(f"sample indices must lie in [0, {len(data)}); got {min(idx)}..{max(idx)}.")
    return idx


def collate(data: Any, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples `indices` of a `data.TokenizedData` to the longest: input_ids,
    attention_mask, labels (-100 on prompt and padding), source_ids."""
    idx = _checked(data, indices, pad_id, "collate")
    t = max(len(data.input_ids[i]) for i in idx)
    input_ids = torch.full((len(idx), t), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(idx), t), dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(data.input_ids[i])
        input_ids[row, :n] = data.input_ids[i]
        labels[row, :n] = data.labels[i]
        mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "source_ids": data.source_ids[idx],
    }


def pack_rows(lengths: Sequence[int], cap: int | None = None) -> list[list[int]]:
    """Records (by position in `lengths`) into rows of `cap` tokens (default and at least: the
    longest record's length), first fit in decreasing length: by default no row is longer than
    the padded batch's, and there are as few rows as first fit finds (at most one per record)."""
    cap = max(max(lengths), cap or 0)
    rows: list[list[int]] = []
    free: list[int] = []
    for j in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        r = next((r for r, f in enumerate(free) if f >= lengths[j]), None)
        if r is None:
            rows.append([])
            free.append(cap)
            r = len(rows) - 1
        rows[r].append(j)
        free[r] -= lengths[j]
    return rows


def pack(
    data: Any, indices: Sequence[int], pad_id: int, cap: int | None = None
) -> dict[str, torch.Tensor]:
    """Samples `indices` of a `data.TokenizedData` concatenated into rows without padding
    between them (`pack_rows`): input_ids, position_ids restarting at 0 for every record,
    labels (-100 on prompts, on each record's first token and on the fill at a row's end),
    segment (the record's position in `indices` for each token, -1 on the fill) and source_ids
    in the order of `indices`, as `collate` gives them. `cap`: tokens per row (`pack_rows`).
    Where no two records would share a row (and `cap` is unset), the padded layout of `collate`:
    the same tokens laid out, and the model's usual inputs.

    No attention_mask: a causal model given position_ids and no mask (transformers) attends
    only within the runs of consecutive positions, so no record sees another; the fill at a
    row's end is a run of its own. `packing.packing_check` tests that a model does so."""
    idx = _checked(data, indices, pad_id, "pack")
    lengths = [len(data.input_ids[i]) for i in idx]
    rows = pack_rows(lengths, cap)
    if len(rows) == len(idx) and cap is None:  # no two records share a row: nothing saved
        return collate(data, idx, pad_id)
    t = max(max(lengths), cap or 0)
    input_ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), t), dtype=torch.long)
    segment = torch.full((len(rows), t), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for j in members:
            n, i = lengths[j], idx[j]
            input_ids[r, at : at + n] = data.input_ids[i]
            labels[r, at : at + n] = data.labels[i]
            labels[r, at] = IGNORE  # the previous record's last token does not predict it
            positions[r, at : at + n] = torch.arange(n)
            segment[r, at : at + n] = j
            at += n
        positions[r, at:] = torch.arange(t - at)
    return {
        "input_ids": input_ids,
        "position_ids": positions,
        "labels": labels,
        "segment": segment,
        "source_ids": data.source_ids[idx],
    }


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tokens of a batch's records (padding and fill excluded), packed or padded."""
    if "segment" in batch:
        return (batch["segment"] >= 0).sum()
    return batch["attention_mask"].sum()
