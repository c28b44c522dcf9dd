"""ScaleBiOTrainer (transformers' Trainer) follows the package's own trainer step for step."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import datasets
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from scalebio_core.core.distributed import run_group, run_launch
from scalebio_core.errors import ConfigError, DataError
from scalebio_core.sources.corpora import build_corpus
from scalebio_core.train.config import TrainConfig
from scalebio_core.train.hf_trainer import ScaleBiOConfig, ScaleBiOTrainer, records_of
from scalebio_core.train.models import load_model, load_tokenizer
from scalebio_core.train.runs import read_jsonl
from scalebio_core.train.trainer import train

ROOT = Path(__file__).resolve().parent.parent
CORPUS = {"n_per_source": 24, "n_val": 16, "noise_rates": [0.0, 0.5, 1.0]}
RUN = {"max_length": 80, "lr_w": 1e-3, "lr_u": 1e-3, "lr_lam": 0.05, "seed": 0}
"""The run both paths make: the package's names on the left, the Trainer's in `_args`."""


def _args(out: Path, steps: int = 4, batch: int = 12, accum: int = 1, **extra) -> ScaleBiOConfig:
    kwargs = {
        "output_dir": str(out),
        "max_steps": steps,
        "per_device_train_batch_size": batch // accum,
        "gradient_accumulation_steps": accum,
        "target_batch_size": 8,
        "learning_rate": RUN["lr_w"],
        "lr_u": RUN["lr_u"],
        "lr_lam": RUN["lr_lam"],
        "weight_decay": 5e-4,  # the run config's default; TrainingArguments' is 0
        "warmup_steps": 0.03,
        "max_length": RUN["max_length"],
        "seed": RUN["seed"],
        "optim": "adamw_torch",
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
    }
    return ScaleBiOConfig(**{**kwargs, **extra})


def _trainer(out: Path, args: ScaleBiOConfig | None = None, **kwargs) -> ScaleBiOTrainer:
    corpus = build_corpus("noisy", **CORPUS)
    tok = load_tokenizer("embedded", vocab_size=2048)
    model = load_model("embedded:nano", vocab_size=len(tok), seed=RUN["seed"])
    sources = {n: datasets.Dataset.from_list(r) for n, r in corpus.sources.items()}
    target = datasets.Dataset.from_list(corpus.validation)
    return ScaleBiOTrainer(
        model, args or _args(out), sources, target, processing_class=tok, **kwargs
    )


def _reference(out: Path, steps: int = 4, batch: int = 12, accum: int = 1, **extra) -> list:
    cfg = TrainConfig(
        corpus="noisy",
        corpus_args=CORPUS,
        model="embedded:nano",
        steps=steps,
        batch_size=batch,
        grad_accum=accum,
        val_batch_size=8,
        out_dir=str(out),
        checkpoint_every=steps,
        **RUN,
        **extra,
    )
    train(cfg, progress=False)
    return read_jsonl(out / "trajectory.jsonl")


def _same(ref: list, rows: list, rtol: float = 1e-6) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for a, b in zip(ref, rows):
        for key in ("L1", "L2_w", "L2_u"):
            assert b[key] == pytest.approx(a[key], rel=rtol), (a["step"], key)
        assert b["p"] == pytest.approx(a["p"], rel=rtol), a["step"]
    moved = max(abs(v - 1 / 3) for v in rows[-1]["p"].values())
    assert moved > 1e-3, "the weights never moved: the comparison would be empty"


@pytest.mark.parametrize(
    "package, trainer",
    [
        ({}, {}),
        ({"lisa_active": 1, "lisa_interval": 2}, {"lisa_active": 1, "lisa_interval": 2}),
        ({"grad_accum": 2}, {"accum": 2}),
        ({"gradient_checkpointing": True}, {"activation_checkpointing": True}),
    ],
    ids=["full", "lisa", "accumulation", "recompute"],
)
def test_the_trainer_follows_the_package_trajectory(tmp_path, package, trainer):
    accum = package.pop("grad_accum", 1)
    ref = _reference(tmp_path / "cli", accum=accum, **package)
    hf = _trainer(tmp_path / "hf", _args(tmp_path / "hf", **trainer))
    hf.train()
    _same(ref, hf.history)
    logged = [h for h in hf.state.log_history if "loss" in h]
    assert [h["p/noise_0.0"] for h in logged] == [r["p"]["noise_0.0"] for r in hf.history]
    assert logged[-1]["L1"] == hf.history[-1]["L1"] == logged[-1]["loss"]
    saved = json.loads((tmp_path / "hf" / "weights.json").read_text())
    assert saved == pytest.approx(hf.weights) and hf.weights == pytest.approx(
        json.loads((tmp_path / "cli" / "weights.json").read_text()), rel=1e-6
    )


def test_lora_from_a_peft_config_follows_the_package_lora_run(tmp_path):
    ref = _reference(tmp_path / "cli", lora_rank=4, lora_alpha=8.0)
    hf = _trainer(tmp_path / "hf", peft_config=LoraConfig(r=4, lora_alpha=8))
    hf.train()
    _same(ref, hf.history)
    hf.save_model(str(tmp_path / "w"))  # w's adapter, in PEFT's layout
    assert (tmp_path / "w" / "w" / "adapter_model.safetensors").is_file()


def test_save_model_writes_w_and_checkpoints_hold_the_weights(tmp_path):
    hf = _trainer(tmp_path / "hf", _args(tmp_path / "hf", save_strategy="steps", save_steps=2))
    hf.train()
    hf.save_model(str(tmp_path / "w"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    mine = hf.setup.state.w.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in loaded.state_dict().items())
    for step in (2, 4):
        folder = tmp_path / "hf" / f"checkpoint-{step}"
        assert (folder / "checkpoints" / "last.pt").is_file()
        weights = json.loads((folder / "weights.json").read_text())
        assert weights == pytest.approx(hf.history[step - 1]["p"], abs=0.05)
    assert json.loads((tmp_path / "hf" / "weights.json").read_text()) == pytest.approx(hf.weights)


class _Crash(TrainerCallback):
    """Fails the run in the step after `at` (a checkpoint was written at `at`)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at + 1:
            raise RuntimeError("crash")


def test_a_crashed_run_resumes_from_its_checkpoint_on_the_same_trajectory(tmp_path):
    whole = _trainer(tmp_path / "whole")
    whole.train()
    args = _args(tmp_path / "run", save_strategy="steps", save_steps=2)
    crashed = _trainer(tmp_path / "run", args, callbacks=[_Crash(2)])
    with pytest.raises(RuntimeError, match="crash"):
        crashed.train()
    assert len(crashed.history) == 3  # step 2 ran after the checkpoint of step 2, and is lost
    resumed = _trainer(
        tmp_path / "run", _args(tmp_path / "run", save_strategy="steps", save_steps=2)
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    _same(whole.history[2:], resumed.history, rtol=1e-6)
    assert resumed.weights == pytest.approx(whole.weights, rel=1e-6)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    first = _trainer(tmp_path / "a", _args(tmp_path / "a", save_strategy="steps", save_steps=2))
    first.train()
    other = _trainer(tmp_path / "b", _args(tmp_path / "b", sampler="union"))
    with pytest.raises(ConfigError, match="another run"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_what_the_trainer_path_cannot_do_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="ScaleBiOConfig"):
        _trainer(tmp_path, TrainingArguments(output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="lr_scheduler_type must be one of"):
        _args(tmp_path, lr_scheduler_type="linear")
    with pytest.raises(ConfigError, match="max_grad_norm must stay 0.*clip_norm"):
        _args(tmp_path, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="FSDP and DeepSpeed are not wired"):
        _trainer(tmp_path, _args(tmp_path, fsdp="full_shard"))
    with pytest.raises(ConfigError, match="lora_dropout"):
        _trainer(tmp_path, peft_config=LoraConfig(r=4, lora_dropout=0.1))
    tok = load_tokenizer("embedded", vocab_size=2048)
    model = load_model("embedded:nano", vocab_size=len(tok))
    rows = datasets.Dataset.from_list([{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match="no 'source' column"):
        ScaleBiOTrainer(model, _args(tmp_path), rows, rows, processing_class=tok)
    with pytest.raises(ConfigError, match="give the tokenizer"):
        ScaleBiOTrainer(model, _args(tmp_path), {"a": rows}, rows)


def test_trl_rows_become_records(tmp_path):
    tok = load_tokenizer("embedded", vocab_size=2048)
    chat = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    ]
    with pytest.raises(DataError, match="chat template"):
        records_of(chat, tok, "source 'a'")
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert records_of(chat, tok, "a") == [{"prompt": "<user>2+2?<assistant>", "response": "4"}]
    pc = [
        {"prompt": "Q: 1+1?", "completion": " 2"},
        {
            "prompt": [{"role": "user", "content": "1+2?"}],
            "completion": [{"role": "assistant", "content": "3"}],
        },
        {"instruction": "Add 1 and 3.", "output": "4"},
    ]
    got = records_of(pc, tok, "a")
    assert got[0] == {"prompt": "Q: 1+1?", "response": " 2"}
    assert got[1] == {"prompt": "<user>1+2?<assistant>", "response": "3"}
    assert got[2]["response"] == "4" and "Add 1 and 3." in got[2]["prompt"]
    with pytest.raises(DataError, match="no assistant turn"):
        records_of([{"messages": [{"role": "user", "content": "hi"}]}], tok, "a")


def test_one_dataset_with_a_source_column_is_the_same_run(tmp_path):
    corpus = build_corpus("noisy", **CORPUS)
    rows = [{**r, "source": n} for n, recs in corpus.sources.items() for r in recs]
    tok = load_tokenizer("embedded", vocab_size=2048)
    model = load_model("embedded:nano", vocab_size=len(tok), seed=0)
    one = ScaleBiOTrainer(
        model,
        _args(tmp_path / "one", steps=3),
        datasets.Dataset.from_list(rows),
        datasets.Dataset.from_list(corpus.validation),
        processing_class=tok,
    )
    one.train()
    split = _trainer(tmp_path / "split", _args(tmp_path / "split", steps=3))
    split.train()
    _same(split.history, one.history, rtol=0)


def test_two_gloo_processes_under_accelerate_launch_follow_one(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from pathlib import Path\n"
        "from test_hf_trainer import _args, _trainer\n"
        "out = Path(sys.argv[1])\n"
        "world = int(sys.argv[2])\n"
        "args = _args(out, save_strategy='steps', save_steps=2)\n"
        "args.per_device_train_batch_size = 12 // world\n"
        "hf = _trainer(out, args)\n"
        "hf.train()\n"
        "if hf.setup.dist.is_main:\n"
        "    (out / 'history.json').write_text(json.dumps(hf.history))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = run_group([sys.executable, str(script), str(tmp_path / "one"), "1"], timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]

    def launch(port: int) -> list[str]:
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), str(script), str(tmp_path / "two"), "2",
        ]  # fmt: skip

    two = run_launch(launch, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    ref = json.loads((tmp_path / "one" / "history.json").read_text())
    rows = json.loads((tmp_path / "two" / "history.json").read_text())
    _same(ref, rows, rtol=1e-5)
    for run in ("one", "two"):  # every rank took part in each save; rank 0 wrote the files
        assert (tmp_path / run / "checkpoint-2" / "checkpoints" / "last.pt").is_file()


def test_the_docs_example_runs_as_printed(tmp_path, monkeypatch):
    page = (ROOT / "docs" / "trainer.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/trainer.md", "exec"), scope)
    weights = json.loads((tmp_path / "runs" / "trainer" / "weights.json").read_text())
    assert weights == pytest.approx(scope["trainer"].weights)
    assert len(scope["mixture"]) == 2000 and set(scope["mixture"]["source"]) == set(weights)
    assert (tmp_path / "runs" / "trainer" / "checkpoint-60" / "checkpoints" / "last.pt").is_file()


def test_evaluate_runs_on_w(tmp_path):
    hf = _trainer(tmp_path / "hf", _args(tmp_path / "hf", steps=1))
    ids = hf.setup.train.input_ids[0][:16].tolist()
    rows = [{"input_ids": ids, "attention_mask": [1] * 16, "labels": ids}] * 4
    hf.train()
    metrics = hf.evaluate(eval_dataset=datasets.Dataset.from_list(rows))
    assert 0 < metrics["eval_loss"] < 20


def test_the_readme_lines_run_as_printed(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text().split("### From your Trainer", 1)[1]
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["trainer"].history) == 40
    assert (tmp_path / "runs" / "hf" / "weights.json").is_file()
