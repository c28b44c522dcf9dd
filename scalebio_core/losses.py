"""The language-model losses of a run: per-sample response loss, and the step's `StepFns`.

A sample's loss is the mean next-token cross-entropy over its response tokens (labels != -100),
never over the padded length. Where the model's logits are exactly its output embeddings applied
to the decoder's last hidden state (checked once, on the first batch), the LM head runs only at
the labelled positions (`response_only_loss`): responses are short, the vocabulary is large.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def per_sample_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over each sample's response tokens (labels != -100): shape [B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100, reduction="none"
    )
    mask = (labels != -100).to(ce.dtype)
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1)


def response_only_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`per_sample_loss` computing the LM head only where a label exists (responses are short).

    Uses the model's decoder (`base_model`) and output embeddings; valid only when the model's
    logits are exactly head(hidden state), which `head_matches_forward` checks.
    """
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()
    ce = F.cross_entropy(logits, labels[mask], reduction="none")
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
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            full = model(**kw).logits.float()
            head = model.get_output_embeddings()(model.base_model(**kw).last_hidden_state)
        return full.shape == head.shape and bool(
            torch.allclose(full, head.float(), rtol=1e-6, atol=1e-7)
        )
    except Exception:  # no base_model / output embeddings of the usual shape: use the full path
        return False
    finally:
        model.train(was)


class LMFns:
    """`bilevel.StepFns` for causal LMs; L1 is computed with dropout off unless `val_dropout`.

    `val_scale` (1/processes) makes each rank's validation mean its share of the global mean.
    `sharded`: the parameters are gathered only inside forward() (FSDP, DeepSpeed), so the head
    cannot run on its own and every loss takes the full forward.
    """

    def __init__(self, val_dropout: bool = False, val_scale: float = 1.0, sharded: bool = False):
        self.val_dropout = val_dropout
        self.val_scale = val_scale
        self.fast: bool | None = False if sharded else None  # None: decided on the first batch

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        if self.fast is None:
            self.fast = head_matches_forward(model, batch)
        return (response_only_loss if self.fast else per_sample_loss)(model, batch)

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
