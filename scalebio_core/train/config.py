"""The run config (`TrainConfig`) and the one way presets and overrides become a config.

A run config holds the fields of a run (data, model, distribution, LISA, LoRA, method, output)
and composes the configs of the maths it runs: `bilevel.BilevelConfig` (ScaleBiO's step) and
`baselines.DoReMiConfig`. Each field is declared once, with its docstring, where it belongs.
YAML files, `key=value` overrides and `TrainConfig(**kwargs)` all use one flat surface: the run's
own fields, BilevelConfig's by their names (`alpha`, `lr_w`, `betas`, …; its `total_steps` is the
run's `steps`), DoReMiConfig's as `doremi_<field>` and `swarm.SwarmConfig`'s as `swarm_<field>`.
A run's config.yaml is that flat dict.

Presets: `configs/<name>.yaml` holds a `defaults` section and one section per preset (smoke,
quick, paper). `load_preset` merges, by one rule, the defaults, then the preset's section, then
the overrides: mappings merge key by key, every other value replaces. Presets override, never
fork: every preset of a file runs the same code with other numbers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.baselines import FLAT_PREFIX, METHODS, DoReMiConfig
from ..core.bilevel import BilevelConfig
from ..core.swarm import FLAT_PREFIX as SWARM_PREFIX
from ..core.swarm import SwarmConfig
from ..errors import ConfigError, check_all, check_types
from ..files import load_yaml
from ..sources.data import MAX_RECORD_BYTES
from .nullband import NULL_BANDS
from .runs import CONFIG

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
if not CONFIG_DIR.is_dir():  # an installed wheel: configs/ ships inside the package
    CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ("smoke", "quick", "paper")
"""The preset sections a file of configs/ may hold beside `defaults`."""

TRACKERS = ("none", "tensorboard", "wandb")
GRADERS = ("exact", "math-verify")
SAMPLERS = ("balanced", "union")
ESTIMATORS = ("auto", "expected", "realized")
PRECISIONS = {
    "fp32": "fp32 weights, gradients, optimizer state and activations",
    "bf16": "bf16 autocast over fp32 weights, gradients and optimizer state",
    "bf16-weights": "bf16 weights and gradients; fp32 master weights and AdamW state for the "
    "trainable parameters only",
}
"""The precision names of the package: the trainer, the memory model, the CLI and the planner."""
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")
LORA_BASES = ("shared", "copies")
"""lora_base: u and w as two adapters on one frozen base (held once), or two whole PEFT models."""
"""`attn_implementation` values: transformers' names, or 'auto' (its own choice per model: sdpa
where the architecture supports it, else eager); flash needs the flash-attn package."""

EMBEDDED_LR = 2e-3
"""lr_w and lr_u of a randomly initialised embedded model when the config gives none: it learns
from scratch (the embedded presets' rate)."""
PRETRAINED_LR = 1e-5
"""lr_w and lr_u of a pretrained model when the config gives none: it is fine-tuned (the paper's
GPT-2 rate; BilevelConfig's default)."""


def model_defaults(model: Any) -> dict[str, float]:
    """The learning rates of u and w a run of `model` gets when its config gives none."""
    lr = EMBEDDED_LR if str(model).startswith("embedded") else PRETRAINED_LR
    return {"lr_w": lr, "lr_u": lr}


EXACT_MATCH = ("auto", "on", "off")
PACKING = ("auto", "on", "off")
CHOICES = {"exact_match": EXACT_MATCH, "null_band": NULL_BANDS, "packing": PACKING}
SWITCHES = {
    "exact_match": {True: "on", False: "off"},
    "null_band": {False: "off"},
    "packing": {True: "on", False: "off"},
}
"""Text fields whose values include on or off, by the text each boolean stands for: YAML (a
config file, key=value on the command line) reads on, yes and true as True and off, no and false
as False, so `exact_match=on` arrives as True and means 'on'."""
DEFAULT_CORPUS = "noisy"
"""The embedded corpus of a config that names no data (no data_dir, no sources, no corpus)."""

BILEVEL_KEYS = tuple(f.name for f in dataclasses.fields(BilevelConfig) if f.name != "total_steps")
DOREMI_KEYS = {FLAT_PREFIX + f.name: f.name for f in dataclasses.fields(DoReMiConfig)}
SWARM_KEYS = {SWARM_PREFIX + f.name: f.name for f in dataclasses.fields(SwarmConfig)}


@dataclass(frozen=True, init=False)
class TrainConfig:
    """One run on a language model: `TrainConfig(**flat)` with the keys of the module docstring.

    Presets: configs/*.yaml; the command line: key=value. Every field is checked on construction.
    lr_w and lr_u, when not given, follow the model (`model_defaults`).
    """

    # -- data
    corpus: str | None = field(default=DEFAULT_CORPUS, metadata={"kinds": (str, type(None))})
    """Embedded corpus (scalebio_core.sources.corpora.CORPORA); None (null) when data_dir or
    sources give the data (a corpus given with them is not used, and not recorded)."""
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
    default to their test split (multilingual) or a fresh draw of the validation distribution."""
    exact_match: str = "auto"
    """Exact-match accuracy of the test answers: 'on', 'off', 'auto' (the templated corpora, and
    your data where nine in ten held-out answers are short: `pipeline.short_answers`)."""
    grader: str = "exact"
    """How an answer is checked: 'exact' (the text after "The answer is", else the last
    \\boxed{}, else the whole answer, must equal the expected one) or 'math-verify' (the
    `math-verify` package parses both answers, \\boxed{} and LaTeX included, and compares them
    as mathematical expressions)."""
    max_length: int | str = field(default="auto", metadata={"kinds": (int, str)})
    """Tokens per sample (prompt + response), truncated from the right; 'auto': the 95th
    percentile of the sources' token lengths, rounded up to a multiple of 16, at most the model's
    context and AUTO_MAX_LENGTH (`data.auto_max_length`, printed as a run starts)."""
    truncate_prompts: bool = False
    """Cut a prompt that leaves no room for its response from the left (its end stays), so that
    up to max_length // 2 response tokens remain; else such a record is dropped."""
    strict_data: bool = False
    """Refuse any record without response tokens (an empty response, or a prompt that fills
    max_length); by default they are dropped and counted, up to max_drop_share."""
    max_drop_share: float = 0.05
    """The largest share of a source, or of the validation set, that may be dropped."""
    max_record_bytes: int = MAX_RECORD_BYTES
    """The largest record of a data file, in bytes of its text (a JSON Lines line, an element of
    a .json array, a .txt paragraph; default 1 MiB, `data.MAX_RECORD_BYTES`): a longer one is
    refused as it is read, in bounded memory, naming the file and line. Raise it for long texts
    that must stay whole; a source of `sources` may set its own."""
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
    """'fp32', 'bf16' (autocast over fp32 weights) or 'bf16-weights' (bf16 weights, fp32 masters
    of the trainable parameters; `masters.py`)."""
    attn_implementation: str = "auto"
    """Attention kernel: 'auto' (transformers' choice), 'sdpa', 'eager' or 'flash_attention_2'
    (CUDA GPUs, the flash-attn package)."""
    packing: str = "auto"
    """How a micro-batch's records are laid out: 'on' packs them into rows without padding
    (`sampling.pack`: positions restart per record, attention stays within a record, the
    losses are the same per record), 'off' right-pads them to the longest; 'auto': packed when
    the model passes `packing.packing_check` on the first records, else padded, said once."""
    micro_tokens: int | None = None
    """The most tokens a micro-batch holds, padding and packing's fill included (rows × row
    length); a micro-batch of longer records is split into more micro-batches (the same records
    in the step, the same result: gradients accumulate). Bounds activation memory by tokens
    rather than by batch × max_length (`python -m scalebio_core memory --micro-tokens N`);
    at least max_length. None: no bound."""
    gradient_checkpointing: bool = False
    """Recompute each decoder block's activations in backward (non-reentrant; `recompute.py`)."""
    # -- distribution (chosen in distributed.choose)
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
    # -- the method
    steps: int = 200
    """Steps of the run (ScaleBiO's, or the DoReMi proxy's); the schedules span them."""
    bilevel: BilevelConfig = field(default_factory=BilevelConfig)
    """ScaleBiO's step (`bilevel.BilevelConfig`): set its fields by their own names."""
    method: str = "scalebio"
    """'scalebio', or a baseline: 'uniform', 'natural', 'validation' (only), 'doremi', 'swarm'."""
    null_band: str = "auto"
    """How far the weights move by chance (`nullband`): 'halves' splits each source into two
    random halves that the run weighs apart, and reports each weight against the band their
    differences give; 'auto': halves for ScaleBiO on your data (data_dir, sources), off for
    the embedded corpora; 'off'."""
    doremi: DoReMiConfig = field(default_factory=DoReMiConfig)
    """DoReMi's weights (`baselines.DoReMiConfig`): set its fields as doremi_<field>."""
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    """The swarm of proxy runs (`swarm.SwarmConfig`): set its fields as swarm_<field>."""
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
    lora_base: str = "shared"
    """'shared': u and w are two adapters on one frozen base model, held once; 'copies': two
    whole models (the same trajectory, twice the base's memory; the one DeepSpeed runs)."""
    # -- run
    seed: int = 0
    """Seed of the model initialisation, the batches and the LISA draws."""
    out_dir: str = "runs/scalebio"
    """The run directory (config.yaml, trajectory.jsonl, weights.json, checkpoints/)."""
    checkpoint_every: int = 50
    """Steps between checkpoints (and weights.json refreshes)."""
    tracker: str = "none"
    """'none', 'tensorboard' or 'wandb' (accelerate trackers)."""

    def __init__(self, **kwargs: Any) -> None:
        own = {f.name: f for f in dataclasses.fields(self)}
        known = (set(own) - {"bilevel", "doremi", "swarm"}) | set(BILEVEL_KEYS) | set(DOREMI_KEYS)
        known |= set(SWARM_KEYS)
        unknown = sorted(set(kwargs) - known - set(own))
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}.")
        kwargs = {**model_defaults(kwargs.get("model", own["model"].default)), **kwargs}
        kwargs |= _switches(kwargs)
        own_data = kwargs.get("data_dir") or kwargs.get("sources")
        kwargs["corpus"] = None if own_data else kwargs.get("corpus") or DEFAULT_CORPUS
        for name, f in own.items():
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            object.__setattr__(self, name, kwargs.get(name, default))
        check_types(self)
        self._check()
        for name, cls, keys in (
            ("bilevel", BilevelConfig, {k: k for k in BILEVEL_KEYS}),
            ("doremi", DoReMiConfig, DOREMI_KEYS),
            ("swarm", SwarmConfig, SWARM_KEYS),
        ):
            part = getattr(self, name)
            if not isinstance(part, cls):
                raise ConfigError(
                    f"TrainConfig: {name} must be a {cls.__name__}; in YAML and overrides set "
                    f"its fields flat ({', '.join(list(keys)[:3])}, …)."
                )
            flat = {keys[k]: v for k, v in kwargs.items() if k in keys}
            if name == "bilevel":
                flat["total_steps"] = self.steps
            object.__setattr__(self, name, dataclasses.replace(part, **flat))

    def _check(self) -> None:
        check_all(
            "TrainConfig",
            [
                (
                    self.corpus is None or isinstance(self.corpus, str),
                    f"corpus must be the name of an embedded corpus; got {self.corpus!r}",
                ),
                (self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}"),
                (self.estimator in ESTIMATORS, f"estimator must be one of {ESTIMATORS}"),
                (self.precision in PRECISIONS, f"precision must be one of {tuple(PRECISIONS)}"),
                (
                    self.attn_implementation in ATTENTION,
                    f"attn_implementation must be one of {ATTENTION}",
                ),
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
                (
                    self.max_length == "auto"
                    or (isinstance(self.max_length, int) and self.max_length >= 2),
                    "max_length must be a whole number >= 2 or 'auto' (from the data)",
                ),
                (
                    self.micro_tokens is None
                    or (
                        type(self.micro_tokens) is int
                        and self.micro_tokens >= 2
                        and (self.max_length == "auto" or self.micro_tokens >= self.max_length)
                    ),
                    "micro_tokens must be a whole number of at least max_length (one record "
                    f"must fit), or null; got {self.micro_tokens!r}",
                ),
                (0 <= self.max_drop_share < 1, "max_drop_share must lie in [0, 1)"),
                (
                    self.max_record_bytes >= 1,
                    "max_record_bytes must be a whole number >= 1 (bytes per record; default "
                    f"{MAX_RECORD_BYTES})",
                ),
                (
                    self.lisa_active >= 0 and self.lisa_interval >= 1,
                    "lisa_active must be >= 0 and lisa_interval >= 1",
                ),
                (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
                (self.lora_rank >= 0, "lora_rank must be >= 0"),
                (self.lora_base in LORA_BASES, f"lora_base must be one of {LORA_BASES}"),
                (self.tracker in TRACKERS, f"tracker must be one of {TRACKERS}"),
                (self.method in METHODS, f"method must be one of {METHODS}"),
                (self.null_band in NULL_BANDS, f"null_band must be one of {NULL_BANDS}"),
                (self.packing in PACKING, f"packing must be one of {PACKING}"),
                (
                    self.exact_match in EXACT_MATCH,
                    "exact_match must be auto, on or off",
                ),
                (self.grader in GRADERS, f"grader must be one of {GRADERS}"),
            ],
        )

    @property
    def divisor_kind(self) -> str:
        if self.estimator != "auto":
            return self.estimator
        return "expected" if self.sampler == "union" else "realized"

    def replace(self, **flat: Any) -> TrainConfig:
        """A copy with some fields changed (the flat keys of the module docstring)."""
        return TrainConfig(**{**self.to_dict(), **flat})

    def to_dict(self) -> dict[str, Any]:
        """The flat dict of plain YAML/JSON types (tuples become lists), as config.yaml holds it."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "bilevel":
                out.update({k: getattr(self.bilevel, k) for k in BILEVEL_KEYS})
            elif f.name == "doremi":
                out.update({k: getattr(self.doremi, n) for k, n in DOREMI_KEYS.items()})
            elif f.name == "swarm":
                out.update({k: getattr(self.swarm, n) for k, n in SWARM_KEYS.items()})
            else:
                out[f.name] = getattr(self, f.name)
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        return cls(**d)


def _switches(kwargs: Mapping[str, Any]) -> dict[str, str]:
    """The `SWITCHES` fields given as booleans, as their text (True: 'on' for exact_match)."""
    out = {}
    for name, words in SWITCHES.items():
        value = kwargs.get(name)
        if not isinstance(value, bool):
            continue
        if value not in words:
            said = "on, yes or true" if value else "off, no or false"
            raise ConfigError(
                f"TrainConfig: {name} got {said} (YAML reads each as {value}), which {name} "
                f"does not take: give one of {CHOICES[name]}."
            )
        out[name] = words[value]
    return out


# ------------------------------------------------------------------ presets and overrides


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`extra` over `base`: mappings merge key by key, every other value replaces."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, Mapping) else v
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs; values are parsed as YAML (numbers, booleans, lists, null); a dotted
    key sets a field of a mapping (corpus_args.n_per_source=100)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value.")
        key, value = item.split("=", 1)
        target = out
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = load_yaml(value, f"override {item!r}")
    return out


def preset_path(config: str | Path) -> Path:
    """A config file: a path, or the name of a file in configs/ ('noisy': configs/noisy.yaml)."""
    path = Path(config)
    if not path.exists() and path.suffix == "" and path.parent == Path("."):
        path = CONFIG_DIR / f"{path}.yaml"
    if not path.exists():
        raise ConfigError(
            f"config file {path} does not exist (a name without a folder is looked up in "
            f"{CONFIG_DIR}: one of {sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))}; "
            "or give the path of a YAML file)."
        )
    return path


def load_preset(
    config: str | Path | None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
) -> dict[str, Any]:
    """The config as a plain dict: the file's `defaults`, then its `preset` section, then the
    overrides (a mapping, or `key=value` strings); see the module docstring for the merge rule.

    A file without preset sections (a run's config.yaml) is the config itself. `config=None`:
    the overrides alone.
    """
    data: dict[str, Any] = {}
    if config is not None:
        path = preset_path(config)
        data = load_yaml(path.read_text(), path) or {}
        sections = [k for k in (*PRESETS, "defaults") if k in data]
        if sections:
            known = [k for k in sections if k != "defaults"]
            if preset is None:
                raise ConfigError(f"{path} has presets {known}: pass --preset NAME (PRESET=…).")
            if preset not in known:
                raise ConfigError(f"{path} has no preset {preset!r}; known presets: {known}.")
            data = merge(data.get("defaults") or {}, data[preset])
        elif preset is not None:
            raise ConfigError(f"{path} has no preset sections: leave out --preset {preset}.")
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(list(overrides))
    return merge(data, extra)


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The run config a run folder records (its config.yaml): keys added to the config since
    the run take their defaults; ConfigError, naming the file, for one that is damaged."""
    path = Path(run_dir) / CONFIG
    saved = load_yaml(path.read_text(), path)
    if isinstance(saved, dict) and "method" in saved:
        saved.setdefault("null_band", "off")  # a run from before the null band had none
        saved.setdefault("packing", "off")  # nor packed batches
    return TrainConfig.from_dict(saved)
