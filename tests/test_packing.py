"""Packed batches: the layout, the same per-record losses as padded rows on every architecture
the package supports, the same trajectories (full, LISA, LoRA, gradient checkpointing), and the
refusal of a model whose attention crosses records."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from scalebio_core.errors import ConfigError
from scalebio_core.sources.data import TokenizedData
from scalebio_core.sources.sampling import IGNORE, collate, pack, pack_rows, real_tokens
from scalebio_core.train import build
from scalebio_core.train import models as M
from scalebio_core.train.config import TrainConfig
from scalebio_core.train.losses import per_sample_loss, response_only_loss
from scalebio_core.train.packing import packing_check
from scalebio_core.train.runs import load_trajectory, read_jsonl
from scalebio_core.train.trainer import train

LENGTHS = [7, 12, 5, 9, 15, 3, 11, 4]


def _data(vocab: int = 100, lengths: list[int] = LENGTHS, seed: int = 0) -> TokenizedData:
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, vocab, (n,), generator=gen) for n in lengths]
    labels = []
    for x in ids:
        y = x.clone()
        y[: len(x) // 2] = IGNORE  # the prompt
        labels.append(y)
    sources = torch.tensor([j % 3 for j in range(len(lengths))])
    return TokenizedData(("a", "b", "c"), ids, labels, sources)


def test_pack_rows_place_every_record_once_within_the_longest():
    rows = pack_rows(LENGTHS)
    assert sorted(j for r in rows for j in r) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[j] for j in r) <= max(LENGTHS) for r in rows)
    assert len(rows) < len(LENGTHS)  # 66 tokens in rows of 15: fewer rows than records
    assert len(pack_rows(LENGTHS, cap=sum(LENGTHS))) == 1


def test_pack_layout_positions_labels_segments():
    data = _data()
    idx = [3, 0, 6, 1, 7]
    b, padded = pack(data, idx, pad_id=0), collate(data, idx, pad_id=0)
    assert "attention_mask" not in b and b["input_ids"].shape[1] == max(LENGTHS[i] for i in idx)
    assert int(real_tokens(b)) == int(real_tokens(padded)) == sum(LENGTHS[i] for i in idx)
    assert torch.equal(b["source_ids"], data.source_ids[idx])
    for j, i in enumerate(idx):
        where = b["segment"] == j
        assert torch.equal(b["input_ids"][where], data.input_ids[i])
        assert torch.equal(b["position_ids"][where], torch.arange(LENGTHS[i]))
        want = data.labels[i].clone()
        want[0] = IGNORE  # never a target: the previous record's last token does not predict it
        assert torch.equal(b["labels"][where], want)
    fill = b["segment"] < 0
    assert (b["labels"][fill] == IGNORE).all() and (b["input_ids"][fill] == 0).all()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: M.save_tiny_model(arch, root / arch, seed=0) for arch in M.TINY_ARCHS}


@pytest.mark.parametrize("arch", sorted(M.TINY_ARCHS))
def test_every_architecture_gives_the_same_losses_packed(arch, tiny_dirs):
    """Per-record losses and their gradients, packed against padded, for every architecture of
    `save_tiny_model`, through both loss paths (full logits; head on labelled positions only).
    Trajectories on two of them: `test_packed_run_on_a_hub_architecture_follows_the_padded`."""
    model = M.load_model(str(tiny_dirs[arch]))
    model.config.use_cache = False
    # records longer than gemma2's sliding window (64) too
    lengths = [90, 20, 30, 70, 12, 40, 5, 100]
    data = _data(vocab=model.get_output_embeddings().weight.shape[0], lengths=lengths)
    idx = list(range(len(lengths)))
    assert packing_check(model, data, 0, torch.device("cpu")) is None
    padded, packed = collate(data, idx, 0), pack(data, idx, 0)
    assert packed["input_ids"].shape[0] < len(idx)  # records really share rows
    for loss in (per_sample_loss, response_only_loss):
        grads = []
        for batch in (padded, packed):
            model.zero_grad()
            values = loss(model, batch)
            values.sum().backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
            if batch is padded:
                want = values.detach()
        torch.testing.assert_close(values.detach(), want, rtol=1e-5, atol=1e-6)
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def _bloom() -> BloomForCausalLM:
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=2))


def test_a_model_whose_attention_crosses_records_is_found_in_any_precision():
    """BLOOM (ALiBi, no position ids) attends across a packed row: the check says so, also with
    bf16 weights, where packed and padded logits differ by rounding anyway."""
    data = _data()
    for dtype in (torch.float32, torch.bfloat16):
        reason = packing_check(_bloom().to(dtype), data, 0, torch.device("cpu"))
        assert reason is not None and "crosses records" in reason


def test_packing_on_refuses_and_auto_pads_with_one_warning():
    data, dist = _data(), SimpleNamespace(rank=0, device=torch.device("cpu"))
    cfg = TrainConfig(model="bloom-folder", packing="on")
    with pytest.raises(ConfigError, match="packing=off"):
        build.decide_packing(cfg, dist, _bloom(), data, 0)
    with pytest.warns(UserWarning, match="right-padded, not packed") as caught:
        packed = build.decide_packing(TrainConfig(packing="auto"), dist, _bloom(), data, 0)
    assert not packed and len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not build.decide_packing(TrainConfig(packing="off"), dist, _bloom(), data, 0)
        gpt2 = M.load_model("embedded:nano")
        assert build.decide_packing(TrainConfig(packing="auto"), dist, gpt2, data, 0)


SMOKE = dict(
    corpus="multilingual",  # records of 42 to 128 tokens, median 58
    corpus_args={"n_per_source": 24, "n_val": 16},
    model="embedded:nano",
    max_length=128,
    steps=6,
    batch_size=12,
    val_batch_size=8,
    lr_w=2e-3,
    lr_u=2e-3,
    lr_lam=0.2,
    checkpoint_every=3,
)


def _rows_used(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(rows, records) of every packed micro-batch the runs lay out."""
    seen: list[tuple[int, int]] = []

    def spy(data, idx, pad_id):
        b = pack(data, idx, pad_id)
        seen.append((b["input_ids"].shape[0], len(idx)))
        return b

    monkeypatch.setattr(build, "pack", spy)
    return seen


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"lisa_active": 1, "lisa_interval": 2},
        {"lora_rank": 4},
        {"gradient_checkpointing": True, "grad_accum": 2},
    ],
    ids=["full", "lisa", "lora", "checkpointing"],
)
def test_packed_run_follows_the_padded_trajectory(tmp_path, monkeypatch, extra):
    seen = _rows_used(monkeypatch)
    runs = {}
    for packing in ("off", "on"):
        out = tmp_path / packing
        cfg = TrainConfig(**{**SMOKE, **extra, "packing": packing, "out_dir": str(out)})
        train(cfg, progress=False)
        runs[packing] = load_trajectory(out)
    assert seen and sum(r for r, _ in seen) < sum(n for _, n in seen)  # rows were shared
    a, b = runs["off"], runs["on"]
    for key in ("L1", "L2_w", "L2_u"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5)
    # p moves by λ's gradient α·(l̄(w) − l̄(u)), a difference of two nearly equal losses: the
    # losses' float rounding (1e-7 of them) grows there to ~1e-4 of p's motion. A record that
    # saw another, or a lost label, moves p by a sizeable share of its motion.
    motion = np.abs(a["p"] - a["p"][0]).max()
    assert motion > 1e-3  # the weights moved: a real comparison
    np.testing.assert_allclose(b["p"], a["p"], rtol=0, atol=1e-3 * motion)
    tokens = [[r["tokens"] for r in read_jsonl(tmp_path / k / "trajectory.jsonl")] for k in runs]
    assert tokens[0] == tokens[1]  # the same real tokens: the same records in every step


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_packed_run_on_a_hub_architecture_follows_the_padded(tmp_path, tiny_dirs, arch):
    runs = {}
    for packing in ("off", "on"):
        out = tmp_path / packing
        extra = {"model": str(tiny_dirs[arch]), "packing": packing, "out_dir": str(out)}
        train(TrainConfig(**{**SMOKE, **extra}), progress=False)
        runs[packing] = load_trajectory(out)
    a, b = runs["off"], runs["on"]
    np.testing.assert_allclose(b["L1"], a["L1"], rtol=1e-5)
    motion = np.abs(a["p"] - a["p"][0]).max()
    assert motion > 1e-3
    np.testing.assert_allclose(b["p"], a["p"], rtol=0, atol=1e-3 * motion)


def test_token_groups_stay_within_the_budget_and_meet_a_count():
    gen = np.random.default_rng(0)
    for packed in (True, False):
        for _ in range(200):
            lengths = [int(x) for x in gen.integers(1, 60, gen.integers(1, 20))]
            budget = int(gen.integers(max(lengths), 4 * max(lengths) + 1))
            at_least = int(gen.integers(1, 25))
            groups = build.token_groups(lengths, budget, packed, at_least)
            assert sorted(j for g in groups for j in g) == list(range(len(lengths)))
            assert len(groups) >= min(at_least, len(lengths)) and all(groups)
            for g in groups:
                assert build.laid_out_tokens([lengths[j] for j in g], packed) <= budget
    # packed: one row of 40 holds the four short records; padded: [40, 10] and [10, 10, 10]
    assert len(build.token_groups([40, 10, 10, 10, 10], 80, packed=True)) == 1
    assert len(build.token_groups([40, 10, 10, 10, 10], 80, packed=False)) == 2


@pytest.mark.parametrize("packing", ["on", "off"])
def test_micro_tokens_splits_micro_batches_on_the_same_trajectory(tmp_path, monkeypatch, packing):
    """A bound of 128 tokens (one longest record) per micro-batch: several micro-batches per
    step, none above the bound, the same trajectory as the unbounded run."""
    sizes: list[int] = []
    real_split = build.split_parts

    def spy(s, data, idx, n):
        parts = real_split(s, data, idx, n)
        lay_out = pack if s.packed else collate
        sizes.extend(lay_out(data, p, 0)["input_ids"].numel() for p in parts)
        return parts

    monkeypatch.setattr(build, "split_parts", spy)
    runs = {}
    for bound in (None, 128):
        out = tmp_path / str(bound)
        extra = {"packing": packing, "micro_tokens": bound, "out_dir": str(out)}
        train(TrainConfig(**{**SMOKE, **extra}), progress=False)
        runs[bound] = load_trajectory(out)
        if bound:
            assert max(sizes) <= bound and len(sizes) > 2 * SMOKE["steps"]
        sizes.clear()
    a, b = runs[None], runs[128]
    np.testing.assert_allclose(b["L1"], a["L1"], rtol=1e-5)
    motion = np.abs(a["p"] - a["p"][0]).max()
    assert motion > 1e-3
    np.testing.assert_allclose(b["p"], a["p"], rtol=0, atol=1e-3 * motion)


def test_every_rank_runs_the_same_number_of_micro_batches_under_micro_tokens():
    """Rank 0's records need 4 micro-batches of 40 tokens, rank 1's one: both get 4 (a sharded
    forward is collective), each within the bound, together the whole batch once."""
    lengths = [40, 5, 40, 5, 40, 5, 40, 5]  # rank 0: the 40s, rank 1: the 5s
    data = _data(lengths=lengths)
    parts = {}
    for rank in (0, 1):
        s = SimpleNamespace(
            dist=SimpleNamespace(world=2, rank=rank),
            cfg=SimpleNamespace(micro_tokens=40),
            packed=True,
        )
        parts[rank] = build.split_parts(s, data, list(range(8)), 1)
    assert len(parts[0]) == len(parts[1]) == 4
    assert sorted(i for r in parts.values() for p in r for i in p) == list(range(8))
    for p in [*parts[0], *parts[1]]:
        assert build.laid_out_tokens([lengths[i] for i in p], packed=True) <= 40


def test_records_that_share_no_row_keep_the_padded_layout():
    data = _data(lengths=[9, 9, 9, 6])  # no two fit one row of 9
    assert torch.equal(
        pack(data, range(4), 0)["input_ids"], collate(data, range(4), 0)["input_ids"]
    )
    assert "segment" not in pack(data, range(4), 0)
