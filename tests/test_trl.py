"""The learned mixture handed on: `pipeline.mixture` gives TRL's SFTTrainer a dataset drawn by a
run's weights (issue 29, item 2), and says when records repeat."""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter

import pytest

from scalebio_core.train.config import TrainConfig
from scalebio_core.train.models import load_model, load_tokenizer
from scalebio_core.train.pipeline import _largest_remainder, mixture
from scalebio_core.train.trainer import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mix") / "run"
    cfg = {
        "model": "embedded:nano",
        "corpus": "noisy",
        "corpus_args": {"n_per_source": 12, "n_val": 8},
        "steps": 3,
        "batch_size": 12,
        "val_batch_size": 8,
        "max_length": 64,
        "out_dir": str(out),
    }
    train(TrainConfig.from_dict(cfg), progress=False)
    return out


def test_the_mixture_is_drawn_by_the_weights_and_says_when_records_repeat(run):
    weights = json.loads((run / "weights.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 60 draws of 6 × 12 records: nothing repeats
        ds = mixture(run, 60, seed=1)
    assert ds.column_names == ["prompt", "completion", "source"] and len(ds) == 60
    want = dict(zip(weights, _largest_remainder(list(weights.values()), 60)))
    assert Counter(ds["source"]) == {k: v for k, v in want.items() if v}
    assert all(r["completion"] and r["prompt"] for r in ds)
    with pytest.warns(UserWarning, match=r"repeats records .*draws of 12 records"):
        assert len(mixture(run, 200)) == 200


def test_trl_fine_tunes_on_the_mixture(run, tmp_path):
    """TRL's SFTTrainer takes the mixture as it is (prompt–completion: the loss on the
    completion only) and fine-tunes the embedded model on it."""
    import trl  # the trl extra (make setup installs it)

    tok = load_tokenizer("embedded")
    model = load_model("embedded:nano", vocab_size=len(tok))
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        max_length=64,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=mixture(run, 40), processing_class=tok
    )
    assert trainer.args.completion_only_loss is not False
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result.training_loss)
