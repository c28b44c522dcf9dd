"""The LLM recipe: data, two model copies, LISA, the ScaleBiO step, logging, checkpoints, resume.

The recipe owns orchestration and I/O; the maths is `bilevel.scalebio_step`. A run writes the
directory of DESIGN §5 and `train(cfg, resume=True)` continues it on the identical trajectory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import runs
from .baselines import METHODS
from .bilevel import BilevelConfig, ConfigError, MicroBatches, NonFiniteLossError, init_state
from .sharding import is_sharded
from .sharding import launch_settings as fsdp_settings
from .zero import check_supported as check_zero
from .zero import is_engine
from .zero import launch_settings as zero_settings

TRACKERS = ("none", "tensorboard", "wandb")
SAMPLERS, ESTIMATORS, PRECISIONS = (
    ("balanced", "union"),
    ("auto", "expected", "realized"),
    ("fp32", "bf16"),
)


class TrainingStopped(RuntimeError):
    """Training stopped on a problem (e.g. a NaN loss); the run directory says where it stopped."""


@dataclass(frozen=True)
class TrainConfig:
    """One ScaleBiO run on a language model (presets: configs/*.yaml; CLI: key=value)."""

    # -- data
    corpus: str = "noisy"
    """Embedded corpus (scalebio_core.corpora.CORPORA); ignored when data_dir is set."""
    corpus_args: dict = field(default_factory=dict)
    """Keyword arguments of the embedded corpus (sizes, noise rates, seed)."""
    data_dir: str | None = None
    """Folder with one training file per source (.json/.jsonl/.txt) and validation.jsonl."""
    sources: list | None = None
    """Explicit sources: a list of SourceSpec fields (name, path | hf_name, shard, corrupt, …)."""
    validation: dict | None = None
    """The validation set as SourceSpec fields (with `sources`)."""
    val_path: str | None = None
    """Validation file; default: <data_dir>/validation.jsonl."""
    test: dict | None = None
    """Held-out target set to evaluate fine-tuned models (SourceSpec fields); embedded corpora
    default to a fresh draw of the validation distribution."""
    exact_match: str = "auto"
    """Exact-match accuracy of the test answers: 'on', 'off', 'auto' (templated corpora)."""
    max_length: int = 64
    """Tokens per sample (prompt + response), truncated from the right."""
    sampler: str = "balanced"
    """'balanced' (every batch holds every source) or 'union' (uniform over all samples, paper)."""
    estimator: str = "auto"
    """Per-source divisor of L2: 'realized' counts (paper), 'expected' counts; auto = unbiased."""
    batch_size: int = 16
    """Training samples per step (all sources, all ranks)."""
    val_batch_size: int = 16
    """Validation samples per step."""
    grad_accum: int = 1
    """Micro-batches per step (batch_size and val_batch_size must divide by it)."""
    # -- model
    model: str = "embedded:tiny"
    """'embedded:<size>' (random-init GPT-2, offline), a local folder or a hub name."""
    tokenizer: str = "embedded"
    """'embedded' (offline BPE) or a local folder / hub name; default: the model's."""
    vocab_size: int = 2048
    """Vocabulary of the embedded tokenizer."""
    precision: str = "fp32"
    """'fp32' or 'bf16' (autocast)."""
    fsdp: bool = False
    """Shard u and w over the processes with FSDP2 (implied by an accelerate FSDP config)."""
    fsdp_offload: bool = False
    """With fsdp: keep parameters, gradients and optimizer states in CPU memory."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 1–3 for u and w (0 = off; implied by an accelerate DeepSpeed config)."""
    zero_offload: bool = False
    """With zero_stage: optimizer states (ZeRO-3: parameters too) in CPU memory (GPUs only)."""
    cpu_malloc: str = "keep"
    """On CPU: 'keep' freed memory in glibc's heap for the next step (faster), or 'system'."""
    val_dropout: bool = False
    """Compute L1 with dropout on (the reference code did, silently); default off."""
    # -- ScaleBiO (BilevelConfig)
    steps: int = 200
    alpha: float = 10.0
    tau: float = 1.0
    tau_every: int = 1
    lr_w: float = 1e-5
    lr_u: float = 1e-5
    lr_lam: float = 1e-2
    optimizer: str = "adamw"
    lam_optimizer: str = "adamw"
    """Optimizer of lam: 'adamw' (paper) or 'sgd' (saturated weights stop moving)."""
    weight_decay: float = 5e-4
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    lam_schedule: str = "cosine"
    clip_norm: float | None = None
    # -- LISA
    lisa_active: int = 0
    """Decoder blocks trained at a time (0 = LISA off, every block trains)."""
    lisa_interval: int = 20
    """Steps between LISA redraws."""
    lisa_share: bool = False
    """u and w use the same draw (the paper: independent)."""
    lisa_layers_path: str | None = None
    """Dotted path of the decoder blocks when they cannot be found generically."""
    lisa_train_embeddings: bool = True
    """Embeddings, head and final norm train under LISA (the paper)."""
    lisa_keep_state: bool = False
    """Keep optimizer state of frozen blocks (the reference code); default: free it."""
    # -- LoRA (PEFT), the alternative to LISA
    lora_rank: int = 0
    """LoRA rank for both copies (0 = off); only the LoRA matrices train."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha."""
    lora_targets: list | None = None
    """Module names to adapt; default: every linear layer inside the decoder blocks."""
    # -- the method (baselines: scalebio_core.baselines)
    method: str = "scalebio"
    """'scalebio', or a baseline: 'uniform', 'natural', 'validation' (only), 'doremi'."""
    doremi_ref_steps: int = 0
    """DoReMi: steps of the reference model on the uniform mixture (0: as many as steps)."""
    doremi_eta: float = 1.0
    """DoReMi: step size of the exponentiated-gradient weight update."""
    doremi_smoothing: float = 1e-3
    """DoReMi: mixing of the weights with uniform after each update."""
    # -- run
    seed: int = 0
    out_dir: str = "runs/scalebio"
    checkpoint_every: int = 50
    """Steps between checkpoints (and weights.json refreshes)."""
    tracker: str = "none"
    """'none', 'tensorboard' or 'wandb' (accelerate trackers)."""

    def __post_init__(self) -> None:
        self._check_types()
        checks = [
            (self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}"),
            (self.estimator in ESTIMATORS, f"estimator must be one of {ESTIMATORS}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.cpu_malloc in ("keep", "system"), "cpu_malloc must be 'keep' or 'system'"),
            (self.zero_stage in (0, 1, 2, 3), "zero_stage must be 0 (off), 1, 2 or 3"),
            (
                self.steps >= 1 and self.batch_size >= 1 and self.val_batch_size >= 1,
                "steps, batch_size and val_batch_size must be >= 1",
            ),
            (
                self.grad_accum >= 1
                and self.batch_size % self.grad_accum == 0
                and self.val_batch_size % self.grad_accum == 0,
                "batch_size and val_batch_size must be multiples of grad_accum",
            ),
            (self.max_length >= 2, "max_length must be >= 2"),
            (
                self.lisa_active >= 0 and self.lisa_interval >= 1,
                "lisa_active must be >= 0 and lisa_interval >= 1",
            ),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.lora_rank >= 0, "lora_rank must be >= 0"),
            (self.tracker in TRACKERS, f"tracker must be one of {TRACKERS}"),
            (self.method in METHODS, f"method must be one of {METHODS}"),
            (self.exact_match in ("auto", "on", "off"), "exact_match must be auto, on or off"),
            (self.doremi_ref_steps >= 0, "doremi_ref_steps must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"TrainConfig: {message}.")
        self.bilevel()  # validates the ScaleBiO fields
        self.doremi()

    def _check_types(self) -> None:
        """Numbers, flags and names of the type of their defaults (a YAML typo gives text)."""
        kinds = {bool: bool, int: numbers.Integral, float: numbers.Real, str: str}
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if kind not in kinds:  # None defaults (optional fields), lists, dicts
                continue
            if not isinstance(value, kinds[kind]) or (kind is not bool and type(value) is bool):
                raise ConfigError(
                    f"TrainConfig: {f.name} must be of type {kind.__name__} (like "
                    f"{f.default!r}); got {value!r}."
                )

    def doremi(self):
        from .baselines import DoReMiConfig

        return DoReMiConfig(eta=self.doremi_eta, smoothing=self.doremi_smoothing)

    def bilevel(self) -> BilevelConfig:
        names = {f.name for f in dataclasses.fields(BilevelConfig)}
        kw = {k: v for k, v in asdict(self).items() if k in names}
        return BilevelConfig(**kw, total_steps=self.steps)

    @property
    def divisor_kind(self) -> str:
        if self.estimator != "auto":
            return self.estimator
        return "expected" if self.sampler == "union" else "realized"

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON types (tuples become lists), as config.yaml holds them."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}.")
        return cls(**d)


# ------------------------------------------------------------------ the language-model losses


def per_sample_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over each sample's response tokens (labels != -100): shape [B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100, reduction="none"
    )
    mask = (labels != -100).to(ce.dtype)
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1)


def response_only_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`per_sample_loss` computing the LM head only where a label exists (responses are short).

    Uses the model's decoder (`base_model`) and output embeddings; valid only when the model's
    logits are exactly head(hidden state), which `LMFns` checks once against the full forward.
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


def _fast_path_matches(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
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


def _all_reduce_grads(model: torch.nn.Module) -> None:
    """Sum the gradients over ranks (every rank's loss is its share of the global loss)."""
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)


class LMFns:
    """StepFns for causal LMs; L1 is computed with dropout off unless `val_dropout`.

    The LM head runs only at labelled positions when that is checked to equal the full forward.
    """

    def __init__(self, val_dropout: bool = False, val_scale: float = 1.0):
        self.val_dropout = val_dropout
        self.val_scale = val_scale  # 1/world: each rank's mean is its share of the global mean
        self.fast: bool | None = None  # decided on the first batch

    def loss(self, model, batch) -> torch.Tensor:
        if self.fast is None:  # sharded: the head's weight is gathered only inside forward()
            sharded = is_sharded(model) or is_engine(model)
            self.fast = not sharded and _fast_path_matches(model, batch)
        return (response_only_loss if self.fast else per_sample_loss)(model, batch)

    def source_ids(self, batch: dict) -> torch.Tensor:
        return batch["source_ids"]

    def source_losses(self, model, batch):
        return self.loss(model, batch), batch["source_ids"]

    def val_loss(self, model, batch):
        if self.val_dropout:
            return self.loss(model, batch).mean() * self.val_scale
        model.eval()
        try:
            return self.loss(model, batch).mean() * self.val_scale
        finally:
            model.train()


# ------------------------------------------------------------------ building the run


@dataclass
class Setup:
    cfg: TrainConfig
    names: tuple[str, ...]
    train: Any
    val: Any
    sampler: Any
    val_sampler: Any
    divisor: torch.Tensor | None
    pad_id: int
    state: Any
    lisa: tuple | None
    device: torch.device
    accelerator: Any
    tokenizer: Any = None
    sharded: bool = False
    """u and w are sharded, by FSDP2 (sharding.py) or DeepSpeed (zero.py): the engine reduces
    the gradients, checkpoints are written per rank."""
    zero: Any = None
    """The DeepSpeed `zero.ZeroEngines` when u and w are DeepSpeed engines."""

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity on one process)."""
        if self.accelerator.num_processes == 1:
            return t
        return self.accelerator.reduce(t.to(self.device), "sum")


def data_specs(cfg: TrainConfig) -> tuple[list, Any]:
    """The training sources' SourceSpecs and the validation set's, as the config gives them."""
    from .corpora import build_corpus
    from .data import SourceSpec, specs_from_dir

    if cfg.sources:
        if not cfg.validation:
            raise ConfigError(
                "sources are given without a validation set: add validation: "
                "{name: validation, path: …} (or hf_name: …)."
            )
        specs = [SourceSpec(**d) for d in cfg.sources]
        return specs, SourceSpec(**{"name": "validation", **cfg.validation})
    if cfg.data_dir:
        val_path = Path(cfg.val_path or Path(cfg.data_dir) / "validation.jsonl")
        return specs_from_dir(cfg.data_dir), SourceSpec(name="validation", path=str(val_path))
    corpus = build_corpus(cfg.corpus, **cfg.corpus_args)
    specs = [SourceSpec(name=n, records=tuple(r)) for n, r in corpus.sources.items()]
    return specs, SourceSpec(name="validation", records=tuple(corpus.validation))


def build_data(cfg: TrainConfig, tokenizer) -> tuple[Any, Any]:
    """Tokenized training sources (sorted by name) and the tokenized validation set."""
    from .data import load_records, load_sources, tokenize
    from .tokenizer import cache_root

    cache = cache_root() / "tokenized"
    specs, val_spec = data_specs(cfg)
    records = load_sources(specs)
    val_records = load_records(val_spec)
    train = tokenize(records, tokenizer, cfg.max_length, cache_dir=cache)
    val = tokenize({"validation": val_records}, tokenizer, cfg.max_length, cache_dir=cache)
    return train, val


def lora_targets(model: torch.nn.Module, path: str | None = None) -> list[str]:
    """Names of the linear layers inside the decoder blocks (found generically)."""
    from .lisa import find_blocks

    _, blocks = find_blocks(model, path)
    names = {
        n.rsplit(".", 1)[-1]
        for n, m in blocks.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    }
    if not names:
        raise ConfigError("no linear layers in the decoder blocks for LoRA: pass lora_targets.")
    return sorted(names)


def add_lora(model, rank: int, alpha: float, targets: list | None = None, path: str | None = None):
    """Wrap a causal LM with PEFT LoRA adapters (rank, alpha, targets)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    targets = list(targets) if targets else lora_targets(model, path)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():  # GPT-2's Conv1D: PEFT notes fan_in_fan_out, then sets it
        warnings.simplefilter("ignore", UserWarning)
        return get_peft_model(model, config)


def make_accelerator(cfg: TrainConfig):
    """The accelerate object: devices, processes (gloo on CPU, NCCL on GPUs), bf16, trackers."""
    from accelerate import Accelerator

    kwargs = dict(
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        log_with=None if cfg.tracker == "none" else cfg.tracker,
        project_dir=cfg.out_dir,
        cpu=not torch.cuda.is_available(),
    )
    try:
        return Accelerator(**kwargs)
    except ValueError:  # an earlier run in this process (a notebook) chose another precision
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        return Accelerator(**kwargs)


def _whole_models(accelerator):
    """Under a GPU DeepSpeed launch with zero3_init_flag, transformers would build models already
    partitioned (deepspeed.zero.Init), which cannot be copied into u; build them whole."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is None:
        return contextlib.nullcontext()
    return plugin.zero3_init_context_manager(enable=False)


def _offload_on_gpus(kind: str, offload: bool, device: torch.device) -> bool:
    """Offload moves shards from GPU to CPU memory: on a CPU it is ignored, with a warning."""
    if offload and device.type == "cpu":
        warnings.warn(
            f"{kind} offload ignored: it moves the shards from the GPUs to CPU memory, and this "
            "run is on the CPU already.",
            stacklevel=3,
        )
        return False
    return offload


def setup(cfg: TrainConfig, accelerator=None, copies: int = 2) -> Setup:
    """Data, samplers, the models and their state; `copies=1` (plain fine-tuning): u is w."""
    from .data import BatchSampler
    from .lisa import make_lisa_pair
    from .models import check_compatible, clone_model, load_model, load_tokenizer

    if cfg.tracker != "none":
        import importlib.util

        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[cfg.tracker]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"tracker={cfg.tracker!r} needs the {module} package: "
                f"pip install {module} (or tracker=none)."
            )
    accelerator = accelerator or make_accelerator(cfg)
    # the config's sharding, or an accelerate launch's: FSDP2 (sharding.py) or ZeRO (zero.py)
    distributed = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    fsdp, offload = fsdp_settings(cfg.fsdp, cfg.fsdp_offload, distributed)
    stage, zero_offload = zero_settings(cfg.zero_stage, cfg.zero_offload)
    if stage:
        check_zero(cfg, copies, fsdp)
    offload = fsdp and _offload_on_gpus("fsdp", offload, accelerator.device)
    zero_offload = bool(stage) and _offload_on_gpus("zero", zero_offload, accelerator.device)
    if fsdp and (copies != 2 or cfg.method not in ("scalebio", "doremi")):
        raise ConfigError(
            "fsdp shards the two models of ScaleBiO and DoReMi; plain fine-tuning (sft) is not "
            "sharded: run it with fsdp: false."
        )
    if accelerator.device.type == "cpu" and cfg.cpu_malloc == "keep":
        from .malloc import keep_freed_memory

        keep_freed_memory()  # once per process; see malloc.py (time only, no result changes)
    world = accelerator.num_processes
    if cfg.batch_size % (world * cfg.grad_accum) or cfg.val_batch_size % (world * cfg.grad_accum):
        raise ConfigError(
            f"batch_size ({cfg.batch_size}) and val_batch_size ({cfg.val_batch_size}) must be "
            f"multiples of processes × grad_accum = {world} × {cfg.grad_accum}."
        )
    tok_name = (
        cfg.tokenizer
        if cfg.tokenizer != "embedded" or cfg.model.startswith("embedded")
        else cfg.model
    )
    tokenizer = load_tokenizer(tok_name, vocab_size=cfg.vocab_size)
    train, val = build_data(cfg, tokenizer)
    with _whole_models(accelerator):  # each copy built whole; its engine partitions it
        w = load_model(cfg.model, vocab_size=len(tokenizer), seed=cfg.seed)
    check_compatible(w, tokenizer)
    if cfg.lora_rank > 0:
        w = add_lora(w, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lisa_layers_path)
    u = clone_model(w) if copies == 2 else w
    w.to(accelerator.device).train()
    u.to(accelerator.device).train()
    if fsdp:  # before the optimizers are built: they hold the sharded parameters
        from .sharding import shard_model

        for model in (w, u):
            shard_model(model, offload=offload, layers_path=cfg.lisa_layers_path)
    state = init_state(w, u, train.names, cfg.bilevel())
    zero = None
    if stage:  # after the optimizers are built: the engines take them over
        from .zero import make_engines

        micro = cfg.batch_size // (world * cfg.grad_accum)
        zero = make_engines(state, stage, zero_offload, micro, world, accelerator.device)
    lisa = None
    if cfg.lisa_active > 0:
        lisa = make_lisa_pair(
            w,
            u,
            n_active=cfg.lisa_active,
            interval=cfg.lisa_interval,
            seed=cfg.seed,
            share=cfg.lisa_share,
            path=cfg.lisa_layers_path,
            train_embeddings=cfg.lisa_train_embeddings,
            drop_frozen_state=not cfg.lisa_keep_state,
        )
    sampler = BatchSampler(
        train.source_ids, len(train.names), cfg.batch_size, cfg.sampler, seed=cfg.seed
    )
    val_sampler = BatchSampler(val.source_ids, 1, cfg.val_batch_size, "union", seed=cfg.seed + 1)
    divisor = sampler.expected_counts() if cfg.divisor_kind == "expected" else None
    return Setup(
        cfg,
        train.names,
        train,
        val,
        sampler,
        val_sampler,
        divisor,
        tokenizer.pad_token_id,
        state,
        lisa,
        accelerator.device,
        accelerator,
        tokenizer,
        sharded=fsdp or zero is not None,
        zero=zero,
    )


def _batches(s: Setup, data, idx: list[int], n: int) -> MicroBatches:
    """This rank's share of a global batch (every world-th sample), in n micro-batches."""
    from .data import collate

    idx = idx[s.accelerator.process_index :: s.accelerator.num_processes]
    size = len(idx) // n
    out = MicroBatches()
    for i in range(n):
        b = collate(data, idx[i * size : (i + 1) * size], s.pad_id)
        out.append({k: v.to(s.device) for k, v in b.items()})
    return out


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(s: Setup, run_dir: Path, weights: dict | None = None) -> None:
    """Rank 0 writes (the state is replicated); every rank waits for it. `weights` replaces the
    current p in weights.json (DoReMi's product is the average over its steps). Sharded runs:
    every rank first writes its shard of u and w (sharding.py), rank 0 then the rest."""
    acc = s.accelerator
    acc.wait_for_everyone()
    if s.zero is not None:  # DeepSpeed: both engines write (collective), then rank 0
        from . import zero

        zero.save(s.state, run_dir)
        acc.wait_for_everyone()
        if acc.is_main_process:
            _save_main(s, run_dir, weights)
            zero.drop_old(run_dir, s.state.step)
        acc.wait_for_everyone()
    elif s.sharded:
        from .sharding import drop_old_shards, save_shards

        save_shards(s.state, run_dir, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            _save_main(s, run_dir, weights)
        acc.wait_for_everyone()  # checkpoint.pt names the new shards: the old ones can go
        drop_old_shards(run_dir, s.state.step, acc.process_index)
    elif acc.is_main_process:
        _save_main(s, run_dir, weights)


def _save_main(s: Setup, run_dir: Path, weights: dict | None) -> None:
    sd = s.state.state_dict(models=not s.sharded)
    if s.sharded:
        sd["shards"] = {"world": s.accelerator.num_processes, "engine": _engine_name(s)}
        if s.zero is not None:
            sd["shards"]["stage"] = s.zero.stage
    sd["rng"] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        sd["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    runs.save_torch(run_dir / runs.CHECKPOINT, sd)
    runs.write_json(run_dir / runs.WEIGHTS, s.state.weights() if weights is None else weights)


def _engine_name(s: Setup) -> str:
    if s.zero is not None:
        return "deepspeed"
    return "fsdp" if s.sharded else "replicated"


def load_checkpoint(s: Setup, run_dir: Path) -> int:
    where = "cpu" if s.device.type == "cpu" else s.device  # gloo ranks are 'cpu:<rank>'
    sd = torch.load(run_dir / runs.CHECKPOINT, map_location=where, weights_only=False)
    saved = sd["shards"].get("engine", "fsdp") if "shards" in sd else "replicated"
    if saved != _engine_name(s):
        raise ConfigError(
            f"{run_dir / runs.CHECKPOINT} was written by a {saved} run and this one is "
            f"{_engine_name(s)}: resume it the way it was launched."
        )
    s.state.load_state_dict(sd)
    if s.zero is not None:
        from . import zero

        acc = s.accelerator
        zero.load(s.state, run_dir, int(sd["step"]), acc.num_processes, s.zero.stage, sd["shards"])
    elif s.sharded:
        from .sharding import load_shards

        acc = s.accelerator
        world = acc.num_processes
        load_shards(
            s.state, run_dir, int(sd["step"]), acc.process_index, world, sd["shards"]["world"]
        )
    if s.lisa is not None:  # the flags of the step's period; state of frozen blocks dropped as
        for lisa, opt in zip(s.lisa, (s.state.opt_w, s.state.opt_u)):  # an unbroken run has
            lisa.apply(int(sd["step"]), opt)
    torch.set_rng_state(sd["rng"]["torch"].cpu())
    random.setstate(sd["rng"]["python"])
    np.random.set_state(sd["rng"]["numpy"])
    if "cuda" in sd["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(sd["rng"]["cuda"])
    return int(sd["step"])


# ------------------------------------------------------------------ the loop


def _prepare_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    run_dir = Path(cfg.out_dir)
    has_run = (run_dir / runs.TRAJECTORY).exists() or (run_dir / runs.CHECKPOINT).exists()
    if resume:
        if not (run_dir / runs.CHECKPOINT).exists():
            raise ConfigError(
                f"cannot resume: {run_dir / runs.CHECKPOINT} does not exist. Start "
                "the run without --resume."
            )
        old = TrainConfig.from_dict(runs.load_yaml((run_dir / runs.CONFIG).read_text()))
        same = ("out_dir", "tracker", "cpu_malloc", "fsdp_offload", "zero_offload")  # where
        diff = runs.config_diff(old.to_dict(), cfg.to_dict(), ignore=same)
        if diff:
            raise ConfigError(
                f"cannot resume {run_dir}: the config differs from the run's config.yaml:\n  "
                + "\n  ".join(diff)
                + "\nResume with the run's own config (python -m scalebio_core train --config "
                f"{run_dir / runs.CONFIG} --resume), or start a new out_dir."
            )
    elif has_run:
        raise ConfigError(
            f"{run_dir} already holds a run (trajectory or checkpoint); nothing was "
            "overwritten. Pass --resume to continue it, or choose another out_dir."
        )
    return run_dir


def open_run(cfg: TrainConfig, resume: bool, weights: dict | None = None) -> tuple:
    """The set-up of a run and its folder: a new run writes config.yaml, an empty trajectory and a
    first checkpoint (`weights` for weights.json); a resumed one loads its checkpoint and drops
    the log lines after it. Returns (setup, run folder, first step)."""
    accelerator = make_accelerator(cfg)
    run_dir = _prepare_run_dir(cfg, resume)  # every rank reads the same folder …
    accelerator.wait_for_everyone()  # … before rank 0 writes anything
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    s = setup(cfg, accelerator)
    start = 0
    if resume:
        start = load_checkpoint(s, run_dir)
        accelerator.wait_for_everyone()
        if main:
            for log in (runs.TRAJECTORY, runs.TIMING):
                runs.JsonlLog(run_dir / log).truncate_to(start)
    else:
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            runs.write_yaml(run_dir / runs.CONFIG, cfg.to_dict())
            (run_dir / runs.TRAJECTORY).write_text("")
        save_checkpoint(s, run_dir, weights)
    return s, run_dir, start


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[dict, Any], None] | None = None,
) -> dict[str, float]:
    """Run (or resume) ScaleBiO or a baseline (`cfg.method`); returns the final weights."""
    if cfg.method != "scalebio":
        from .pipeline import run_baseline

        return run_baseline(cfg, resume=resume, progress=progress, callback=callback)
    s, run_dir, start = open_run(cfg, resume)
    accelerator, main = s.accelerator, s.accelerator.is_main_process
    traj, timing = runs.JsonlLog(run_dir / runs.TRAJECTORY), runs.JsonlLog(run_dir / runs.TIMING)
    if cfg.tracker != "none":
        s.accelerator.init_trackers(Path(cfg.out_dir).name, config=cfg.to_dict())
    fns = LMFns(cfg.val_dropout, val_scale=1.0 / accelerator.num_processes)
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        disable=not (progress and main),
        desc="ScaleBiO",
        dynamic_ncols=True,
    )
    for step in bar:
        t0 = time.perf_counter()
        try:
            m, active, batch, val_batch = run_step(s, step, fns)
        except NonFiniteLossError as e:
            save_checkpoint(s, run_dir)  # the state is untouched: the last good one
            raise TrainingStopped(
                f"{e}\nStopped at step {step}. The last good state (before step {step}) is saved "
                f"in {run_dir / runs.CHECKPOINT} and {run_dir / runs.WEIGHTS}; trajectory.jsonl "
                f"holds steps 0..{step - 1}. Resume with --resume after lowering lr_w/lr_u/alpha."
            ) from e
        tokens = int(sum(b["attention_mask"].sum() for b in (*batch, *val_batch)))
        tokens = int(s.reduce(torch.tensor(float(tokens))))
        row = {
            "step": step,
            "p": dict(zip(s.names, m["p"])),
            "L1": m["L1"],
            "L2_w": m["L2_w"],
            "L2_u": m["L2_u"],
            "gap": m["gap"],
            "alpha": m["alpha"],
            "lr_w": m["lr_w"],
            "lr_u": m["lr_u"],
            "lr_lam": m["lr_lam"],
            "lisa_w": active and list(active[0]),
            "lisa_u": active and list(active[1]),
            "tokens": tokens,
            "loss_w": dict(zip(s.names, m["loss_w"])),
            "loss_u": dict(zip(s.names, m["loss_u"])),
        }
        if main:
            traj.append(row)
            timing.append(
                {
                    "step": step,
                    "seconds": time.perf_counter() - t0,
                    "tokens": tokens,
                    "world_size": accelerator.num_processes,
                }
            )
        if cfg.tracker != "none":
            s.accelerator.log(
                {
                    "L1": m["L1"],
                    "L2_w": m["L2_w"],
                    "gap": m["gap"],
                    **{f"p/{n}": v for n, v in zip(s.names, m["p"])},
                },
                step=step,
            )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(s, run_dir)
        if progress:
            top = sorted(zip(m["p"], s.names), reverse=True)[:3]
            bar.set_postfix_str(f"L1={m['L1']:.3f} " + " ".join(f"{n}={v:.2f}" for v, n in top))
        if callback is not None:
            callback(row, s)
    if cfg.tracker != "none":
        s.accelerator.end_training()
    weights = s.state.weights()
    if main:
        runs.write_json(run_dir / runs.WEIGHTS, weights)
    accelerator.wait_for_everyone()
    return weights


def autocast(s: Setup):
    """bf16 autocast when configured. accelerate leaves mixed precision to DeepSpeed under a
    DeepSpeed launch; the engines here keep fp32 weights, so the trainer autocasts itself."""
    if s.zero is not None and s.cfg.precision == "bf16":
        return torch.autocast(s.device.type, dtype=torch.bfloat16)
    return s.accelerator.autocast()


def run_step(s: Setup, step: int, fns: LMFns) -> tuple[dict, list | None, list, list]:
    """LISA draw, this rank's batches, one ScaleBiO step: (metrics, active blocks, batches)."""
    from .bilevel import scalebio_step

    active = (
        [lisa.apply(step, opt) for lisa, opt in zip(s.lisa, (s.state.opt_w, s.state.opt_u))]
        if s.lisa
        else None
    )
    batch = _batches(s, s.train, s.sampler.indices(step), s.cfg.grad_accum)
    val_batch = _batches(s, s.val, s.val_sampler.indices(step), s.cfg.grad_accum)
    multi = s.accelerator.num_processes > 1
    sync = _all_reduce_grads if multi and not s.sharded else None  # FSDP, DeepSpeed: their own
    with autocast(s):
        m = scalebio_step(
            s.state,
            batch,
            val_batch,
            fns,
            divisor=None if s.divisor is None else s.divisor.to(s.device),
            reduce=s.reduce if multi else None,
            sync=sync,
            engine=s.zero,
        )
    return m, active, batch, val_batch
