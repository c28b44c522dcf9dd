"""A run built from its config (`Setup`): tokenizer, data, the model copies, LoRA, LISA, the
distribution and the batch samplers; and the batches of each step.

`setup(cfg)` is what every language-model method starts from (ScaleBiO and DoReMi hold two
copies, w and u; plain fine-tuning one, `copies=1`, with u = w). Nothing here runs a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import messages
from ..core.bilevel import BilevelState, MicroBatches, init_state
from ..core.distributed import RunDistribution
from ..core.lisa import Lisa, make_lisa_pair
from ..errors import ConfigError
from ..parallel.engines import choose, make_accelerator
from ..parallel.sharding import resharded
from ..sources.corpora import build_corpus
from ..sources.data import (
    SourceSpec,
    TokenizedData,
    auto_max_length,
    held_out_files,
    leaks,
    load_records,
    load_sources,
    say_dropped,
    source_table,
    specs_from_dir,
    tokenize,
)
from ..sources.sampling import BatchSampler, collate, pack, pack_rows, real_tokens
from ..sources.tokenizer import cache_root
from . import nullband
from .config import TrainConfig
from .identity import data_fingerprint, run_identity, tokenized_sha
from .lora import add_lora, add_shared_lora, shared_views
from .malloc import keep_freed_memory
from .models import (
    RANDOM_PREFIX,
    check_compatible,
    check_context,
    context_limit,
    empty_model,
    load_model,
    load_tokenizer,
)
from .packing import packing_check
from .recompute import checkpoint_blocks


@dataclass
class Setup:
    """Everything a method's steps read: the config, the distribution, the data and samplers,
    the state (w, u, lam and their optimizers) and LISA of (w, u)."""

    cfg: TrainConfig
    dist: RunDistribution
    tokenizer: Any
    train: TokenizedData
    val: TokenizedData
    sampler: BatchSampler
    val_sampler: BatchSampler
    divisor: torch.Tensor | None
    """Per-source divisor of L2 on the device: the expected counts, or None (realized)."""
    state: BilevelState
    lisa: tuple[Lisa, Lisa] | None
    table: str = ""
    """The sources and held-out sets read (`data.source_table`), printed as a run starts."""
    fingerprint: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The data's fingerprint (`Data.fingerprint`), part of the run's identity."""
    halves: bool = False
    """Whether the training sources are split into halves for the null band (`nullband`):
    `names` are then the halves."""
    packed: bool = False
    """Whether micro-batches are packed rows (`sampling.pack`) rather than padded ones."""

    def identity(self) -> dict[str, Any]:
        """The run's identity (`identity.run_identity`): what its checkpoints carry."""
        return run_identity(self.cfg.to_dict(), self.state.w, self.fingerprint)

    @property
    def names(self) -> tuple[str, ...]:
        return self.train.names

    @property
    def device(self) -> torch.device:
        return self.dist.device


@dataclass(frozen=True)
class Given:
    """What a caller hands over as objects instead of names in the config (the Trainer path,
    `hf_trainer.ScaleBiOTrainer`): a model, a tokenizer, and the records of the training sources
    and of the target (validation) set, already normalised to {"prompt", "response"}. The config
    still holds every other field; its `model` is then a label of the given model."""

    model: nn.Module | None = None
    tokenizer: Any = None
    sources: dict[str, list[dict]] | None = None
    target: list[dict] | None = None


# ------------------------------------------------------------------ data


def data_specs(cfg: TrainConfig, given: Given | None = None) -> tuple[list[SourceSpec], SourceSpec]:
    """The training sources' SourceSpecs and the validation set's, as the config gives them
    (each with the config's max_record_bytes, unless a source of `sources` sets its own), or as
    records a caller handed over (`Given`)."""
    most = {"max_record_bytes": cfg.max_record_bytes}
    if given is not None and given.sources is not None:
        if not given.target:
            raise ConfigError("no target set: give the records that define the target (L1).")
        specs = [SourceSpec(name=n, records=tuple(r), **most) for n, r in given.sources.items()]
        return specs, SourceSpec(name="validation", records=tuple(given.target), **most)
    if cfg.sources:
        if not cfg.validation:
            raise ConfigError(
                "sources are given without a validation set: add validation: "
                "{name: validation, path: …} (or hf_name: …)."
            )
        specs = [SourceSpec(**{**most, **d}) for d in cfg.sources]
        return specs, SourceSpec(**{"name": "validation", **most, **cfg.validation})
    if cfg.data_dir:
        specs = [dataclasses.replace(s, **most) for s in specs_from_dir(cfg.data_dir)]
        found = held_out_files(cfg.data_dir).get("validation")
        if cfg.val_path is None and found is None:
            raise ConfigError(
                f"{cfg.data_dir} has no validation set: add validation.jsonl (or val.jsonl, "
                "dev.jsonl) beside the sources, or set val_path."
            )
        val_path = Path(cfg.val_path or found)
        return specs, SourceSpec(name="validation", path=str(val_path), **most)
    corpus = build_corpus(cfg.corpus, **cfg.corpus_args)
    specs = [SourceSpec(name=n, records=tuple(r), **most) for n, r in corpus.sources.items()]
    return specs, SourceSpec(name="validation", records=tuple(corpus.validation), **most)


def heldout_spec(cfg: TrainConfig) -> SourceSpec | None:
    """The held-out test set: the config's `test`, else a data folder's test file, else None."""
    most = {"max_record_bytes": cfg.max_record_bytes}
    if cfg.test:
        return SourceSpec(**{"name": "test", **most, **cfg.test})
    found = held_out_files(cfg.data_dir).get("test") if cfg.data_dir else None
    return SourceSpec(name="test", path=str(found), **most) if found else None


def data_rules(cfg: TrainConfig) -> dict[str, Any]:
    """How records without response tokens are handled (`data.tokenize`'s keywords)."""
    return {
        "strict": cfg.strict_data,
        "max_drop_share": cfg.max_drop_share,
        "truncate_prompts": cfg.truncate_prompts,
    }


@dataclass
class Data:
    """A run's tokenized data: the training sources (sorted by name), the validation set, and
    the start table (with the test set's row, when there is one)."""

    cfg: TrainConfig
    """The config with max_length resolved (a number where it was 'auto')."""
    train: TokenizedData
    val: TokenizedData
    table: str
    fingerprint: dict[str, Any]
    """What the run reads (`identity`): {"files": SHA-256 per data file (or per source without
    files), "tokenized": SHA-256 of the tokenized training and validation sets}."""
    halves: bool = False
    """Whether each training source is split into two halves (`nullband`)."""


def build_data(cfg: TrainConfig, tokenizer: Any, given: Given | None = None) -> Data:
    """Read, check and tokenize the sources and the validation set (cached); max_length 'auto'
    is chosen from their token lengths (`data.auto_max_length`)."""
    cache = cache_root() / "tokenized"
    specs, val_spec = data_specs(cfg, given)
    model = model_ref(cfg, given)
    records = load_sources(specs)
    val_records = load_records(val_spec)
    held = {"validation": val_records}
    tests = heldout_spec(cfg) if (cfg.data_dir or cfg.sources) else None
    if tests is not None:
        held["test"] = load_records(tests)
    files_of = {s.name: Path(s.path).name for s in specs if s.path}
    for line in leaks(records, held, files_of):
        messages.warn(line, stacklevel=2)
    how = ""
    if cfg.max_length == "auto":
        n, how = auto_max_length({**records, **held}, tokenizer, context_limit(model))
        cfg = cfg.replace(max_length=n)
    check_context(model, cfg.max_length)
    rules = data_rules(cfg)
    train = tokenize(records, tokenizer, cfg.max_length, cache_dir=cache, **rules)
    val = tokenize({"validation": val_records}, tokenizer, cfg.max_length, cache_dir=cache, **rules)
    shown = [train, val]
    if "test" in held:  # only for the table: its rows, never a batch
        shown.append(tokenize({"test": held["test"]}, tokenizer, cfg.max_length, **rules))
    for data in (train, val):
        say_dropped(data, cfg.max_length)
    table = source_table([*specs, val_spec, *([tests] if tests else [])], shown, cfg.max_length)
    halves, band_note = False, ""
    if nullband.wanted(cfg):
        why = nullband.infeasible(cfg, dict(zip(train.names, train.counts().tolist())))
        if why and cfg.null_band == "halves":
            raise ConfigError(f"null_band=halves cannot run: {why}.")
        halves = why is None
        band_note = (
            "null band: each source is split into two random halves, weighed apart; their "
            "differences measure how far weights move by chance (null_band=off: one weight per "
            "source, no band)"
            if halves
            else f"null band off: {why}"
        )
        if halves:
            train = nullband.split(train, cfg.seed)
    fingerprint = {
        "files": {
            **data_fingerprint(specs, records),
            **data_fingerprint([val_spec], {val_spec.name: val_records}),
        },
        "tokenized": {"train": tokenized_sha(train), "validation": tokenized_sha(val)},
    }
    notes = "".join(f"\n{x}" for x in (band_note, how) if x)
    return Data(cfg, train, val, table + notes, fingerprint, halves)


def model_ref(cfg: TrainConfig, given: Given | None = None) -> str | nn.Module:
    """The model a run trains: the one a caller handed over, else the config's name."""
    return given.model if given is not None and given.model is not None else cfg.model


def tokenizer_name(cfg: TrainConfig) -> str:
    """The tokenizer to load: the config's, or the model's own for a model from a folder or the
    hub (an embedded or `random:` model has none of its own: the embedded tokenizer)."""
    if cfg.tokenizer != "embedded" or cfg.model.startswith(("embedded", RANDOM_PREFIX)):
        return cfg.tokenizer
    return cfg.model


# ------------------------------------------------------------------ models


def _whole_models(accelerator: Any) -> contextlib.AbstractContextManager:
    """Under a GPU DeepSpeed launch with zero3_init_flag, transformers would build models already
    partitioned (deepspeed.zero.Init), which cannot be copied into u; build them whole."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is None:
        return contextlib.nullcontext()
    return plugin.zero3_init_context_manager(enable=False)


def build_state(
    cfg: TrainConfig,
    dist: RunDistribution,
    tokenizer: Any,
    names: tuple[str, ...],
    copies: int,
    given_model: nn.Module | None = None,
) -> BilevelState:
    """w (LoRA when asked) and u = a copy of w (or w itself), in the run's dtype, with
    recomputing blocks when asked, built and placed by the distribution (`build_models`), then
    their optimizers, prepared for the distribution. With LoRA on a shared base (lora_base:
    shared) one model holding both adapters is built, and w and u are its two views.
    `given_model`: w is that model object (a caller's), not one loaded by the config's name."""
    dtype = "bfloat16" if cfg.precision == "bf16-weights" else "float32"
    shared = copies == 2 and cfg.lora_rank > 0 and cfg.lora_base == "shared"

    def lora(model: nn.Module) -> nn.Module:
        if cfg.lora_rank > 0:
            add = add_shared_lora if shared else add_lora
            return add(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lisa_layers_path)
        return model

    def whole(device: torch.device | None) -> nn.Module:
        if given_model is not None:
            check_compatible(given_model, tokenizer)
            return lora(given_model)
        with _whole_models(dist.accelerator):  # each copy built whole; its engine partitions it
            model = load_model(
                cfg.model,
                vocab_size=len(tokenizer),
                seed=cfg.seed,
                dtype=dtype,
                attn_implementation=cfg.attn_implementation,
                device=device,
            )
        check_compatible(model, tokenizer)
        return lora(model)

    def empty() -> nn.Module:
        if given_model is not None:
            raise ConfigError(
                "a model object cannot be sharded from rank 0 (FSDP): give the model's name or "
                "folder instead."
            )
        model = empty_model(cfg.model, len(tokenizer), dtype, cfg.attn_implementation)
        check_compatible(model, tokenizer)  # on every rank, before rank 0 broadcasts
        return lora(model)

    def finish(model: nn.Module) -> None:
        if cfg.gradient_checkpointing:
            checkpoint_blocks(model, cfg.lisa_layers_path)

    models = dist.build_models(whole, empty, 1 if shared else copies, finish)
    if shared:
        models = list(shared_views(models[0]))
    state = init_state(models[0], models[-1], names, cfg.bilevel)
    micro = cfg.batch_size // (dist.world * cfg.grad_accum)
    dist.prepare_state(state, micro)  # DeepSpeed: the engines take the optimizers over
    return state


def _check_tracker(cfg: TrainConfig) -> None:
    if cfg.tracker == "none":
        return
    if importlib.util.find_spec(cfg.tracker) is None:  # the package is named as the tracker
        raise ConfigError(
            f"tracker={cfg.tracker!r} needs the {cfg.tracker} package: "
            f"pip install {cfg.tracker} (or tracker=none)."
        )


def setup(
    cfg: TrainConfig, accelerator: Any = None, copies: int = 2, given: Given | None = None
) -> Setup:
    """Data, samplers, the models and their state; `copies=1` (plain fine-tuning): u is w.
    `given`: a model, tokenizer and records handed over as objects (`Given`)."""
    _check_tracker(cfg)
    accelerator = accelerator or make_accelerator(cfg)
    dist = choose(cfg, accelerator, copies)
    if dist.device.type == "cpu" and cfg.cpu_malloc == "keep":
        keep_freed_memory()  # once per process; see malloc.py (time only, no result changes)
    if cfg.max_length != "auto":  # before the tokenizer is trained or loaded
        check_context(model_ref(cfg, given), cfg.max_length)
    tokenizer = given.tokenizer if given is not None and given.tokenizer is not None else None
    tokenizer = tokenizer or load_tokenizer(tokenizer_name(cfg), vocab_size=cfg.vocab_size)
    data = build_data(cfg, tokenizer, given)
    cfg, train, val = data.cfg, data.train, data.val
    longest = max(len(x) for x in [*train.input_ids, *val.input_ids])
    if cfg.micro_tokens is not None and cfg.micro_tokens < longest:
        raise ConfigError(
            f"micro_tokens={cfg.micro_tokens} is below the longest record ({longest} tokens, "
            f"max_length {cfg.max_length}): one record must fit a micro-batch. Set micro_tokens "
            f"to at least {longest}, or lower max_length."
        )
    given_model = given.model if given is not None else None
    state = build_state(cfg, dist, tokenizer, train.names, copies, given_model)
    lisa = None
    if cfg.lisa_active > 0:
        lisa = make_lisa_pair(
            state.w,
            state.u,
            n_active=cfg.lisa_active,
            interval=cfg.lisa_interval,
            seed=cfg.seed,
            share=cfg.lisa_share,
            path=cfg.lisa_layers_path,
            train_embeddings=cfg.lisa_train_embeddings,
            drop_frozen_state=not cfg.lisa_keep_state,
        )
    packed = decide_packing(cfg, dist, state.w, train, tokenizer.pad_token_id)
    sampler = BatchSampler(
        train.source_ids, len(train.names), cfg.batch_size, cfg.sampler, seed=cfg.seed
    )
    val_sampler = BatchSampler(val.source_ids, 1, cfg.val_batch_size, "union", seed=cfg.seed + 1)
    expected = cfg.divisor_kind == "expected"
    return Setup(
        cfg=cfg,
        dist=dist,
        tokenizer=tokenizer,
        train=train,
        val=val,
        sampler=sampler,
        val_sampler=val_sampler,
        divisor=sampler.expected_counts().to(dist.device) if expected else None,
        state=state,
        lisa=lisa,
        table=data.table,
        fingerprint=data.fingerprint,
        halves=data.halves,
        packed=packed,
    )


def decide_packing(
    cfg: TrainConfig, dist: RunDistribution, model: nn.Module, data: TokenizedData, pad_id: int
) -> bool:
    """Whether the run packs its micro-batches (`TrainConfig.packing`): 'off' never; 'on' and
    'auto' when the model passes `packing_check` ('on' refuses otherwise, 'auto' pads and says
    why, once)."""
    if cfg.packing == "off":
        return False
    reason = packing_check(model, data, pad_id, dist.device)
    resharded(model)  # FSDP2 keeps its root unit gathered after a forward without a backward
    if reason is None:
        return True
    if cfg.packing == "on":
        raise ConfigError(
            f"packing=on, but model {cfg.model!r} cannot take packed batches: {reason}. "
            "Set packing=off (right-padded batches) or packing=auto."
        )
    if dist.rank == 0:
        messages.warn(
            f"batches are right-padded, not packed: model {cfg.model!r}: {reason} "
            "(packing=off says nothing)."
        )
    return False


# ------------------------------------------------------------------ batches


def batches(s: Setup, data: TokenizedData, idx: list[int], n: int) -> MicroBatches:
    """This rank's share of a global batch (every world-th sample), in n micro-batches, each
    split further where it would hold more than `micro_tokens` tokens (`token_groups`)."""
    lay_out = pack if s.packed else collate
    parts = split_parts(s, data, idx, n)
    out = MicroBatches()
    for part in parts:
        b = lay_out(data, part, s.tokenizer.pad_token_id)
        out.append({k: v.to(s.device) for k, v in b.items()})
    return out


def laid_out_tokens(lengths: list[int], packed: bool) -> int:
    """Tokens of a micro-batch of records of these lengths, padding and fill included."""
    if not lengths:
        return 0
    rows = len(pack_rows(lengths)) if packed else len(lengths)
    return rows * max(lengths)


def token_groups(
    lengths: list[int], budget: int, packed: bool, at_least: int = 1
) -> list[list[int]]:
    """Records (positions in `lengths`) in groups whose laid-out tokens (`laid_out_tokens`) stay
    within `budget`, at least `at_least` groups (as many as records allow). Records are taken
    longest first and a group closes when the next record would overflow it: packing in
    decreasing length adds to the rows a group had, so a group within the budget stays within
    it as records are added up to the one that overflows, and a group losing its last
    (shortest) record is the group it was before that record came."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    groups: list[list[int]] = []
    for j in order:
        group = groups[-1] if groups else None
        if group is None or laid_out_tokens([lengths[i] for i in group + [j]], packed) > budget:
            groups.append([j])
        else:
            group.append(j)
    while len(groups) < min(at_least, len(lengths)):
        largest = max(groups, key=len)
        groups.append([largest.pop()])
    return groups


def split_parts(s: Setup, data: TokenizedData, idx: list[int], n: int) -> list[list[int]]:
    """This rank's micro-batches of the global batch `idx` (sample indices). Under
    `micro_tokens` every rank computes every rank's groups (it knows the global batch), so all
    ranks run the same number of micro-batches: sharded models (FSDP, DeepSpeed) gather their
    weights in every forward, collectively."""
    world, size = s.dist.world, len(idx) // (s.dist.world * n)
    shares = [idx[r::world] for r in range(world)]
    parts = [[share[i * size : (i + 1) * size] for i in range(n)] for share in shares]
    budget = s.cfg.micro_tokens
    if budget is None:
        return parts[s.dist.rank]
    out = []
    for i in range(n):
        lengths = [[len(data.input_ids[k]) for k in p[i]] for p in parts]
        count = max(len(token_groups(x, budget, s.packed)) for x in lengths)
        mine = parts[s.dist.rank][i]
        groups = token_groups(lengths[s.dist.rank], budget, s.packed, at_least=count)
        out += [[mine[j] for j in sorted(g)] for g in groups]
    return out


def train_batch(s: Setup, step: int) -> MicroBatches:
    """The training batch of `step` (this rank's share)."""
    return batches(s, s.train, s.sampler.indices(step), s.cfg.grad_accum)


def step_batches(s: Setup, step: int) -> tuple[MicroBatches, MicroBatches]:
    """The training and validation batches of `step` (this rank's share)."""
    val = batches(s, s.val, s.val_sampler.indices(step), s.cfg.grad_accum)
    return train_batch(s, step), val


def count_tokens(s: Setup, *micro: MicroBatches) -> int:
    """Tokens (attention mask) of the batches, over every process."""
    tokens = int(sum(real_tokens(b) for mbs in micro for b in mbs))
    return int(s.dist.reduce(torch.tensor(float(tokens))))
