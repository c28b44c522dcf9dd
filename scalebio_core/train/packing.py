"""Packed batches (`sampling.pack`): whether a model computes the same losses on them.

A packed row holds several records one after the other, with positions restarting at 0 for each.
transformers' causal models that build their attention mask from position ids (given no mask)
attend only within a record; a model that ignores position ids (ALiBi models such as BLOOM or
MPT; models outside transformers) would let a record see the one before it. `packing_check`
runs both layouts on the first records of the data and compares the logits of every real token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..sources.sampling import collate, pack
from .losses import forward

CHECK_RECORDS = 4
"""Records of the check, packed into one row."""
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
"""Largest difference of a logit between the layouts, over the logits' spread, by the model's
compute precision (others: LOW_TOLERANCE). A record that sees another moves its logits by a
sizeable share of their spread."""
LOW_TOLERANCE = 5e-2


def _token_logits(model: nn.Module, batch: dict[str, torch.Tensor], lengths: list[int]):
    logits = forward(model, batch).logits.float()
    if "segment" not in batch:
        return torch.cat([logits[j, :n] for j, n in enumerate(lengths)])
    return torch.cat([logits[batch["segment"] == j] for j in range(len(lengths))])


def _other_first(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`packed` with the first record's tokens changed (each id moved to the next one present)."""
    out = dict(packed)
    ids, first = packed["input_ids"].clone(), packed["segment"] == 0
    out["input_ids"] = ids.masked_scatter(first, (ids[first] + 1) % (int(ids.max()) + 1))
    return out


def packing_check(model: nn.Module, data: Any, pad_id: int, device: torch.device) -> str | None:
    """None when the model gives each record the same logits packed as padded (the first
    CHECK_RECORDS records of `data`, in one row), else why not. Two comparisons: packed
    against padded (within the precision's tolerance), and the records after the first with
    the first record's tokens changed (a model whose attention crosses records shows it there
    in any precision). Runs in eval mode without gradients; every process of a sharded model
    runs it on the same records."""
    idx = list(range(min(CHECK_RECORDS, len(data))))
    if len(idx) < 2:
        return None  # nothing to pack together
    lengths = [len(data.input_ids[i]) for i in idx]
    padded, packed = collate(data, idx, pad_id), pack(data, idx, pad_id, cap=sum(lengths))
    on = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            a = _token_logits(model, on(padded), lengths)
            b = _token_logits(model, on(packed), lengths)
            c = _token_logits(model, on(_other_first(packed)), lengths)
    except (TypeError, ValueError) as e:  # a forward that takes no position_ids
        return f"its forward does not take position ids ({type(e).__name__}: {e})"
    finally:
        model.train(was)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    spread = float(a.std()) or 1.0
    later = slice(lengths[0], None)
    crossed = float((b[later] - c[later]).abs().max()) / spread
    moved = float((a - b).abs().max()) / spread
    if crossed > TOLERANCE[torch.float32]:
        return (
            f"a record's logits change with the record before it in a packed row (by {crossed:.2g} "
            "of the logits' spread): its attention crosses records, as in models without "
            "position ids (ALiBi: BLOOM, MPT)"
        )
    if moved > TOLERANCE.get(dtype, LOW_TOLERANCE):
        return (
            f"records packed into one row get other logits than padded ones (largest difference "
            f"{moved:.2g} of the logits' spread): it does not restart positions at each record"
        )
    return None
