"""The language-model losses of a run: per-sample response loss, and the step's `StepFns`.

A sample's loss is the mean next-token cross-entropy over its response tokens (labels != -100),
never over the padded length. A batch is right-padded rows (`sampling.collate`) or packed rows
(`sampling.pack`: records concatenated, positions restarting per record, a `segment` naming each
token's record); the per-sample losses are the same either way, one per record. Where the
model's logits are exactly its output embeddings applied to the decoder's last hidden state
(checked once, on the first batch), the LM head runs only at the labelled positions
(`response_only_loss`): responses are short, the vocabulary is large.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_packed = threading.local()


class _PackedHasNoMask(logging.Filter):
    """Drops transformers' advice to pass an attention mask while a packed batch runs: packed
    rows carry none on purpose (positions mark the records)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(_packed, "on", False) and "attention_mask" in record.getMessage())


logging.getLogger("transformers.modeling_utils").addFilter(_PackedHasNoMask())


def forward(module: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """`module` (a causal LM or its decoder) on a padded or packed batch, without a cache."""
    if "segment" not in batch:
        return module(**model_inputs(batch), use_cache=False)
    _packed.on = True
    try:
        return module(**model_inputs(batch), use_cache=False)
    finally:
        _packed.on = False


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's inputs of a batch: input_ids and the attention mask (padded rows), or
    input_ids and position ids and no mask (packed rows, `sampling.pack`)."""
    if "segment" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def by_record(batch: dict[str, torch.Tensor], ce: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `ce` (the losses at the labelled positions `mask` of labels[:, 1:], in order) per
    record of a packed batch: shape [records]."""
    records = batch["segment"][:, 1:][mask]
    n = len(batch["source_ids"])
    sums = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add(0, records, ce)
    counts = torch.bincount(records, minlength=n).clamp_min(1).to(ce.dtype)
    return sums / counts


def per_sample_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over each sample's response tokens (labels != -100): shape [B]."""
    logits = forward(model, batch).logits
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100, reduction="none"
    )
    if "segment" in batch:
        mask = labels != -100
        return by_record(batch, ce[mask], mask)
    mask = (labels != -100).to(ce.dtype)
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1)


def _head_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="none")


def response_only_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk: int | None = None
) -> torch.Tensor:
    """`per_sample_loss` computing the LM head only where a label exists (responses are short).

    Uses the model's decoder (`base_model`) and output embeddings; valid only when the model's
    logits are exactly head(hidden state), which `head_matches_forward` checks. With `chunk`
    (gradient checkpointing) the head and the loss run `chunk` positions at a time and are
    recomputed in backward, so the logits and log-probabilities (positions × vocabulary, in
    fp32) are never held for more than one chunk.
    """
    hidden = forward(model.base_model, batch).last_hidden_state
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    head, h, y = model.get_output_embeddings(), hidden[:, :-1][mask], labels[mask]
    if chunk is None or not torch.is_grad_enabled():
        ce = _head_loss(head, h, y)
    else:
        parts = [
            checkpoint(_head_loss, head, h[i : i + chunk], y[i : i + chunk], use_reentrant=False)
            for i in range(0, len(y), chunk)
        ]
        ce = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    if "segment" in batch:
        return by_record(batch, ce, mask)
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
    return sums / mask.sum(1).clamp_min(1).to(ce.dtype)


def head_matches_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """True when the model's logits are exactly its output embeddings applied to the decoder's
    last hidden state (no soft-capping or scaling after the head), checked on one batch."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = forward(model, batch).logits.float()
            head = model.get_output_embeddings()(forward(model.base_model, batch).last_hidden_state)
        return full.shape == head.shape and bool(
            torch.allclose(full, head.float(), rtol=1e-6, atol=1e-7)
        )
    except Exception:  # no base_model / output embeddings of the usual shape: use the full path
        return False
    finally:
        model.train(was)


HEAD_CHUNK_LOGITS = 2**24
"""Logits per chunk of the LM head under gradient checkpointing (64 MiB in fp32): the positions
of a chunk are this over the vocabulary, so the chunk's memory does not grow with it."""


def head_chunk(vocab: int) -> int:
    """Labelled positions per chunk of the LM head for a vocabulary of `vocab` tokens."""
    return max(64, HEAD_CHUNK_LOGITS // vocab)


class LMFns:
    """`bilevel.StepFns` for causal LMs; L1 is computed with dropout off unless `val_dropout`.

    `val_scale` (1/processes) makes each rank's validation mean its share of the global mean.
    `sharded`: the parameters are gathered only inside forward() (FSDP, DeepSpeed), so the head
    cannot run on its own and every loss takes the full forward. `chunked_head`: with gradient
    checkpointing, the head's loss in chunks of `head_chunk(vocabulary)` positions, recomputed
    in backward (`response_only_loss`).
    """

    def __init__(
        self,
        val_dropout: bool = False,
        val_scale: float = 1.0,
        sharded: bool = False,
        chunked_head: bool = False,
    ):
        self.val_dropout = val_dropout
        self.val_scale = val_scale
        self.fast: bool | None = False if sharded else None  # None: decided on the first batch
        self.chunked_head = chunked_head

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        if self.fast is None:
            self.fast = head_matches_forward(model, batch)
        if self.fast:
            vocab = model.get_output_embeddings().weight.shape[0]
            chunk = head_chunk(vocab) if self.chunked_head else None
            return response_only_loss(model, batch, chunk)
        return per_sample_loss(model, batch)

    def source_ids(self, batch: dict) -> torch.Tensor:
        return batch["source_ids"]

    def source_losses(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss(model, batch), batch["source_ids"]

    def val_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        if self.val_dropout:
            return self.loss(model, batch).mean() * self.val_scale
        model.eval()
        try:
            return self.loss(model, batch).mean() * self.val_scale
        finally:
            model.train()
