"""ScaleBiO inside transformers' `Trainer`: `ScaleBiOConfig` and `ScaleBiOTrainer`.

A practitioner who fine-tunes with `Trainer` keeps their script: the model (or its name), the
training sources (`{name: Dataset}`, or one `Dataset` with a source column), the target set
(`target_dataset`, the upper level L1), the tokenizer and, optionally, a PEFT `LoraConfig`.

What each side does:

    this package   the data (records read as the command line reads them, plus TRL's
                   conversational and prompt-completion rows), the two models w and u, λ, LISA,
                   LoRA and the step itself (`bilevel.scalebio_step` through the package's own
                   `Distribution`: one process, or whole copies on every process), the batches
                   of each step (a function of the step: a resume continues the same draws) and
                   the checkpoint of u, w, λ and their optimizers
    the Trainer    the loop, callbacks, logging (`p/<source>`, the per-source losses, L1, α reach
                   `report_to` and `log_history`), checkpoint folders and their rotation,
                   `resume_from_checkpoint`, `save_model` (which writes w) and `evaluate`

The Trainer's own optimizer, scheduler and clipping are not used: the step owns u, w and λ's
optimizers, their schedules (cosine or constant, spanning `max_steps`) and clipping at
`clip_norm` (default α). FSDP and DeepSpeed launches are refused: run those with
`python -m scalebio_core train` under `accelerate launch` (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .. import files
from ..core.bilevel import SCHEDULES, BilevelConfig
from ..core.distributed import ended_at_exit
from ..errors import ConfigError, DataError
from ..sources.data import normalise_record
from . import checkpoint, runs
from .build import Given, Setup, count_tokens, setup
from .config import TrainConfig
from .lora import AdapterView
from .models import load_model, load_tokenizer, model_label
from .pipeline import prompt_completion, resample
from .trainer import lm_fns, run_step, scalebio_row

OPTIMS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "sgd": "sgd"}


@dataclass
class ScaleBiOConfig(TrainingArguments):
    """`TrainingArguments` with ScaleBiO's fields, named and meant as in the run config
    (docs/config.md). From the Trainer's own fields: `learning_rate` is lr_w, `max_steps` the
    run's steps (else `num_train_epochs` passes over the sources), `per_device_train_batch_size`
    × processes × `gradient_accumulation_steps` the batch, `weight_decay`, `adam_beta1/2`,
    `warmup_steps`, `seed`, `bf16`, `activation_checkpointing` (the package's recompute of u
    and w's blocks), `save_steps` as their names say;
    `lr_scheduler_type` is 'cosine' (default) or 'constant'; `optim` an AdamW or 'sgd'."""

    alpha: float = BilevelConfig.alpha
    """Penalty weight of the lower level (10 for GPT-2, 100 for LLMs in the paper)."""
    tau: float = BilevelConfig.tau
    """Growth of alpha per outer iteration (1: constant)."""
    tau_every: int = BilevelConfig.tau_every
    """Steps per outer iteration for tau."""
    alpha_max: float = BilevelConfig.alpha_max
    """Upper bound on alpha when tau > 1."""
    lr_u: float | None = None
    """Learning rate of the follower u (default: learning_rate, as w's)."""
    lr_lam: float = BilevelConfig.lr_lam
    """Learning rate of the logits λ."""
    lam_optimizer: str = BilevelConfig.lam_optimizer
    """Optimizer of λ: 'adamw' or 'sgd'."""
    clip_norm: float | None = None
    """Max gradient norm of u and w (None: alpha, the paper's). The Trainer's max_grad_norm
    stays 0: ScaleBiO's step clips."""
    estimator: str = TrainConfig.estimator
    """Per-source divisor of L2: 'auto', 'expected', 'realized' (docs/config.md)."""
    sampler: str = TrainConfig.sampler
    """'balanced' (every batch holds every source) or 'union'."""
    target_batch_size: int | None = None
    """Target-set samples per step over every process (default: the training batch)."""
    max_length: int | str = TrainConfig.max_length
    """Tokens per sample, or 'auto' (the 95th percentile of the records' lengths)."""
    lisa_active: int = 0
    """Decoder blocks trained at a time (0: LISA off)."""
    lisa_interval: int = TrainConfig.lisa_interval
    """Steps between LISA redraws."""
    lisa_share: bool = False
    """u and w use the same LISA draw."""
    lisa_layers_path: str | None = None
    """Dotted path of the decoder blocks where they cannot be found generically."""
    lisa_train_embeddings: bool = TrainConfig.lisa_train_embeddings
    """Embeddings, head and final norm train under LISA."""
    lora_base: str = TrainConfig.lora_base
    """With a LoRA config: 'shared' (u and w two adapters on one base) or 'copies'."""
    source_column: str = "source"
    """The column naming each row's source when train_dataset is one Dataset."""
    lr_scheduler_type: str = field(default="cosine")
    max_grad_norm: float = 0.0
    report_to: Any = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        schedule = getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
        optim = getattr(self.optim, "value", self.optim)
        problems = [
            (
                schedule in SCHEDULES,
                f"lr_scheduler_type must be one of {sorted(SCHEDULES)} (ScaleBiO's schedules "
                f"of u, w and λ), not {schedule!r}",
            ),
            (optim in OPTIMS, f"optim must be one of {sorted(OPTIMS)}, not {optim!r}"),
            (
                not self.max_grad_norm,
                "max_grad_norm must stay 0: ScaleBiO's step clips u and w itself; set clip_norm "
                "(default: alpha)",
            ),
            (
                self.max_steps > 0 or self.num_train_epochs > 0,
                "set max_steps (ScaleBiO's steps) or num_train_epochs",
            ),
        ]
        bad = [msg for ok, msg in problems if not ok]
        if bad:
            raise ConfigError("ScaleBiOConfig: " + "; ".join(bad) + ".")


# ------------------------------------------------------------------ records


def records_of(rows: Any, tokenizer: Any, where: str) -> list[dict]:
    """Rows of a Dataset (or a list of dicts) as {"prompt", "response"} records: the formats the
    command line reads (alpaca, sharegpt, prompt/response, text) and TRL's: conversational
    (`messages`: the chat template up to the last assistant turn is the prompt, that turn the
    response, so the loss is on the last assistant turn) and prompt-completion (strings, or
    lists of messages through the chat template)."""
    out = []
    for i, row in enumerate(rows):
        at = f"{where}, row {i}"
        row = dict(row)
        if "messages" in row:
            out.append(_conversation(at, row["messages"], tokenizer))
        elif "prompt" in row and "completion" in row:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, list):
                prompt = _chat(at, prompt, tokenizer)
                completion = "".join(_content(at, m) for m in completion)
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise DataError(f"{at}: prompt and completion must be strings or message lists.")
            out.append({"prompt": prompt, "response": completion})
        else:
            out.append(normalise_record(at, row))
    if not out:
        raise DataError(f"{where} is empty: give it records, or leave the source out.")
    return out


def _content(where: str, message: Any) -> str:
    if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
        raise DataError(f"{where}: a message must be {{'role': …, 'content': str}}.")
    return message["content"]


def _chat(where: str, messages: list, tokenizer: Any) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: conversational rows need the tokenizer's chat template, and this "
            "tokenizer has none: set tokenizer.chat_template, or give prompt/completion strings."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _conversation(where: str, messages: Any, tokenizer: Any) -> dict:
    roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages or []]
    if "assistant" not in roles:
        raise DataError(f"{where}: 'messages' has no assistant turn (roles: {roles}).")
    last = len(roles) - 1 - roles[::-1].index("assistant")
    return {
        "prompt": _chat(where, list(messages[:last]), tokenizer),
        "response": _content(where, messages[last]),
    }


def sources_of(train_dataset: Any, column: str, tokenizer: Any) -> dict[str, list[dict]]:
    """{source: records} from `{name: Dataset}` or one Dataset with a `column` of names."""
    if isinstance(train_dataset, Mapping):
        return {str(n): records_of(d, tokenizer, f"source {n!r}") for n, d in train_dataset.items()}
    names = getattr(train_dataset, "column_names", None) or []
    if column not in names:
        raise DataError(
            f"train_dataset has no {column!r} column ({names}): give {{name: Dataset}} per "
            "source, or one Dataset with a column naming each row's source "
            "(ScaleBiOConfig.source_column)."
        )
    by: dict[str, list] = {}
    for row in train_dataset:
        by.setdefault(str(row[column]), []).append(row)
    return {n: records_of(rows, tokenizer, f"source {n!r}") for n, rows in sorted(by.items())}


# ------------------------------------------------------------------ the run config


def run_config(
    args: ScaleBiOConfig, world: int, model: str, lora: Any, n_records: int
) -> TrainConfig:
    """The run config of the package that the Trainer's arguments mean (`world` processes)."""
    batch = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
    steps = args.max_steps
    if steps <= 0:
        steps = max(1, math.ceil(args.num_train_epochs * n_records / batch))
    warm = args.warmup_steps
    ratio = warm if warm < 1 else (warm - 0.5) / steps  # ceil(ratio · steps) = warm steps
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    flat: dict[str, Any] = {
        "model": model,
        "tokenizer": "given",
        "method": "scalebio",
        "steps": steps,
        "batch_size": batch,
        "val_batch_size": args.target_batch_size or batch,
        "grad_accum": args.gradient_accumulation_steps,
        "sampler": args.sampler,
        "estimator": args.estimator,
        "max_length": args.max_length,
        "precision": "bf16" if args.bf16 else "fp32",
        "gradient_checkpointing": bool(args.activation_checkpointing),
        "seed": args.seed,
        "out_dir": args.output_dir,
        "alpha": args.alpha,
        "tau": args.tau,
        "tau_every": args.tau_every,
        "alpha_max": args.alpha_max,
        "lr_w": args.learning_rate,
        "lr_u": args.lr_u or args.learning_rate,
        "lr_lam": args.lr_lam,
        "optimizer": OPTIMS[getattr(args.optim, "value", args.optim)],
        "lam_optimizer": args.lam_optimizer,
        "weight_decay": args.weight_decay,
        "betas": [args.adam_beta1, args.adam_beta2],
        "schedule": schedule,
        "lam_schedule": schedule,
        "warmup_ratio": ratio,
        "clip_norm": args.clip_norm,
        "lisa_active": args.lisa_active,
        "lisa_interval": args.lisa_interval,
        "lisa_share": args.lisa_share,
        "lisa_layers_path": args.lisa_layers_path,
        "lisa_train_embeddings": args.lisa_train_embeddings,
    }
    if lora is not None:
        flat.update(lora_fields(lora), lora_base=args.lora_base)
    return TrainConfig(**flat)


def lora_fields(lora: Any) -> dict[str, Any]:
    """lora_rank, lora_alpha and lora_targets of a PEFT LoraConfig; what the package's LoRA
    does not carry over is refused rather than dropped."""
    extra = {
        "lora_dropout": getattr(lora, "lora_dropout", 0.0) not in (0, 0.0),
        "use_dora": bool(getattr(lora, "use_dora", False)),
        "bias": getattr(lora, "bias", "none") != "none",
        "modules_to_save": bool(getattr(lora, "modules_to_save", None)),
    }
    if any(extra.values()):
        raise ConfigError(
            "the LoRA config sets " + ", ".join(k for k, v in extra.items() if v) + ", which "
            "ScaleBiO's two adapters do not carry over: leave them at their defaults (rank, "
            "lora_alpha and target_modules are used)."
        )
    targets = getattr(lora, "target_modules", None)
    return {
        "lora_rank": int(lora.r),
        "lora_alpha": float(lora.lora_alpha),
        "lora_targets": sorted(targets) if isinstance(targets, set | list | tuple) else None,
    }


def refuse_sharded_launch(args: TrainingArguments) -> None:
    """FSDP and DeepSpeed are the command line's (their engines build both models)."""
    env = {
        k: os.environ.get(k, "").lower()
        for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    }
    if args.fsdp or args.deepspeed or "true" in env.values():
        raise ConfigError(
            "ScaleBiOTrainer runs on one process or on several with whole copies of u and w; "
            "FSDP and DeepSpeed are not wired into the Trainer path. Launch the same run with "
            "`accelerate launch --config_file configs/accelerate/fsdp.yaml -m scalebio_core "
            "train …` (or deepspeed_zero3.yaml), or drop fsdp/deepspeed from the arguments."
        )


# ------------------------------------------------------------------ the Trainer's pieces


class _StepOwned:
    """The Trainer's optimizer slot: ScaleBiO's step has stepped u, w and λ already, so stepping
    here does nothing; `param_groups` are w's (the logged learning_rate is lr_w)."""

    def __init__(self, s: Setup):
        self.s = s

    @property
    def param_groups(self) -> list[dict]:
        return self.s.state.opt_w.param_groups

    def step(self, closure: Any = None) -> None:
        """Nothing: the step owns the update."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: the step zeroes its own gradients."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        """Nothing: u, w and λ's optimizers resume from the package's checkpoint."""


class _StepSchedule:
    """The Trainer's scheduler slot: the step sets its learning rates; this reports w's."""

    def __init__(self, opt: _StepOwned):
        self.opt = opt

    def step(self) -> None:
        """Nothing: the step sets its learning rates."""

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.opt.param_groups]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        """Nothing (as `_StepOwned`)."""


class _Steps(torch.utils.data.Dataset):
    """One item per micro-batch of each step: the Trainer's epoch is the run."""

    def __init__(self, steps: int, accum: int):
        self.steps, self.accum = steps, accum

    def __len__(self) -> int:
        return self.steps * self.accum

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"scalebio_step": i // self.accum, "micro": i % self.accum}


def _only(items: list[dict]) -> dict:
    return items[0]


def _flat_metrics(row: dict) -> dict[str, float]:
    """A step's row as the flat numbers trackers take."""
    keys = ("L1", "L2_w", "L2_u", "gap", "alpha", "lr_u", "lr_lam", "grad_norm_u")
    out = {k: row[k] for k in keys}
    for key in ("p", "loss_w", "loss_u"):
        out.update({f"{key}/{n}": v for n, v in row[key].items()})
    return out


class ScaleBiOTrainer(Trainer):
    """transformers' Trainer running ScaleBiO (module docstring).

    `model`: a causal LM or its name (the package's names: a folder, a hub name, `embedded:…`);
    `train_dataset`: `{source: Dataset}` or one Dataset with `args.source_column`;
    `target_dataset`: the target set (L1); `processing_class`: the tokenizer (needed with a model
    object); `peft_config`: a LoraConfig (u and w get LoRA adapters). After `train()`,
    `trainer.weights` are the learned data weights, written to `output_dir/weights.json` and to
    every checkpoint folder; `trainer.history` holds each step's row (p, L1, L2_w, L2_u, …).
    """

    def __init__(
        self,
        model: nn.Module | str,
        args: ScaleBiOConfig,
        train_dataset: Any,
        target_dataset: Any,
        processing_class: Any = None,
        peft_config: Any = None,
        eval_dataset: Any = None,
        callbacks: list | None = None,
        **kwargs: Any,
    ):
        if not isinstance(args, ScaleBiOConfig):
            raise ConfigError(
                "ScaleBiOTrainer takes ScaleBiOConfig (TrainingArguments with ScaleBiO's fields: "
                "alpha, lr_lam, …), not TrainingArguments."
            )
        refuse_sharded_launch(args)
        tokenizer = processing_class
        label = model if isinstance(model, str) else model_label(model)
        if isinstance(model, str):
            tokenizer = tokenizer or load_tokenizer(
                model if not model.startswith(("embedded", "random:")) else "embedded"
            )
            model = load_model(model, vocab_size=len(tokenizer), seed=args.seed)
        if tokenizer is None:
            raise ConfigError(
                "give the tokenizer (processing_class=…) with a model object: ScaleBiO "
                "tokenizes the sources and the target set itself."
            )
        if target_dataset is None:
            raise ConfigError(
                "target_dataset is required: the records whose loss ScaleBiO lowers (L1). "
                "eval_dataset stays for the Trainer's evaluate()."
            )
        sources = sources_of(train_dataset, args.source_column, tokenizer)
        target = records_of(target_dataset, tokenizer, "target_dataset")
        self._sources = sources
        self.history: list[dict] = []
        self._last: dict | None = None
        n_records = sum(len(r) for r in sources.values())
        super().__init__(
            model=model,
            args=args,
            train_dataset=_Steps(1, 1),
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            **kwargs,
        )
        ended_at_exit()  # a launched rank's process group ends before the interpreter does
        world = self.accelerator.num_processes
        cfg = run_config(args, world, label, peft_config, n_records)
        self.setup = setup(cfg, self.accelerator, 2, Given(model, tokenizer, sources, target))
        self.fns = lm_fns(self.setup)
        self.model = self.model_wrapped = self.setup.state.w
        self.args.max_steps = self.setup.cfg.steps  # num_train_epochs became steps

    # -- the product
    @property
    def weights(self) -> dict[str, float]:
        """The learned data weights p = softmax(λ), by source."""
        return self.setup.state.weights()

    def mixture(self, n: int, seed: int = 0) -> Any:
        """The learned mixture: `n` records of the training sources drawn by `weights`, as a
        `datasets.Dataset` in TRL's prompt-completion format (`pipeline.mixture`: exact counts,
        a source's records reused, with a warning, only once it runs out)."""
        return prompt_completion(resample(self.weights, self._sources, n, seed=seed))

    def _write_weights(self, folder: str | Path) -> None:
        if self.setup.dist.is_main:
            files.write_json(Path(folder) / runs.WEIGHTS, self.weights)

    # -- the data: the step's batches come from the package's samplers
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        steps = _Steps(self.setup.cfg.steps, self.setup.cfg.grad_accum)
        # batches of one item (a resume skips batches with accelerate's batch-sampler wrapper)
        return torch.utils.data.DataLoader(steps, batch_size=1, shuffle=False, collate_fn=_only)

    # -- no second optimizer, no wrapper: the step owns u, w, λ and the processes
    def _prepare_for_training(
        self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None
    ) -> tuple[nn.Module, Any]:
        self.optimizer = _StepOwned(self.setup)
        self.lr_scheduler = _StepSchedule(self.optimizer)
        self.model_wrapped = self.model
        if resume_from_checkpoint is not None:
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return self.model, train_dataloader

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        s = self.setup
        t, micro = int(inputs["scalebio_step"]), int(inputs["micro"])
        if micro < s.cfg.grad_accum - 1:  # the step runs at the last micro-batch, on all of them
            return torch.zeros((), device=self.args.device)
        if t != s.state.step:
            raise RuntimeError(
                f"the Trainer is at step {t} and ScaleBiO's state at {s.state.step}: the "
                "checkpoint and the Trainer's state disagree. Resume from one checkpoint folder."
            )
        m, active, batch, val_batch = run_step(s, t, self.fns)
        row = scalebio_row(s, t, m, active, count_tokens(s, batch, val_batch))
        row.update(grad_norm_w=m["grad_norm_w"], grad_norm_u=m["grad_norm_u"])
        self.history.append(row)
        self._last = row
        return torch.tensor(m["L1"], device=self.args.device)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> float | None:
        """w's gradient norm before the step clipped it (the Trainer would measure the clipped
        gradient left behind)."""
        return None if self._last is None else self._last["grad_norm_w"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._last is not None and "loss" in logs:
            logs = {**logs, **_flat_metrics(self._last)}
        super().log(logs, start_time)

    # -- checkpoints: the package's state beside the Trainer's, written first
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        checkpoint.save(self.setup, folder, self.weights)
        super()._save_checkpoint(model, trial)
        self._write_weights(self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Nothing here: w, u, λ and their optimizers load together in
        `_load_optimizer_and_scheduler`, from the package's checkpoint in the folder."""

    def _load_optimizer_and_scheduler(self, folder: str | None) -> None:
        if folder is None:
            return
        if not (Path(folder) / runs.CHECKPOINT).is_file():
            raise ConfigError(
                f"cannot resume: {folder} has no {runs.CHECKPOINT} (ScaleBiO's state of u, w "
                "and λ). Resume from a checkpoint folder that ScaleBiOTrainer wrote."
            )
        step, _ = checkpoint.load(self.setup, Path(folder))
        if step != self.state.global_step:
            raise ConfigError(
                f"cannot resume: {folder} holds ScaleBiO's step {step} and the Trainer's step "
                f"{self.state.global_step}; the folder was changed after it was written."
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """`save_model`: w, as a transformers model (a full or LISA run) or as its LoRA adapter
        in PEFT's layout (with a LoRA config; on a shared base, the adapter named "w")."""
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        w = self.setup.state.w
        if isinstance(w, AdapterView):
            w.activate().save_pretrained(str(out), selected_adapters=["w"])
        else:
            w.save_pretrained(str(out))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(out))
        torch.save(self.args, out / "training_args.bin")

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """Run (or resume) ScaleBiO in the Trainer's loop; weights.json is written at the end."""
        with _recompute_is_ours(self.args):
            out = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self._write_weights(self.args.output_dir)
        return out


@contextlib.contextmanager
def _recompute_is_ours(args: TrainingArguments) -> Iterator[None]:
    """activation_checkpointing is applied to u and w by the package (recompute.py) as they are
    built; the Trainer would apply transformers' own to w alone a second time."""
    names = ("activation_checkpointing", "gradient_checkpointing")  # v5 keeps both in step
    was = {n: getattr(args, n) for n in names}
    for n in names:
        object.__setattr__(args, n, False)
    try:
        yield
    finally:
        for n, v in was.items():
            object.__setattr__(args, n, v)
