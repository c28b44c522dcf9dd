"""A memory model of ScaleBiO training: bytes per GPU for two model copies, LISA, LoRA, sharding.

Parameter counts are exact and generic: the model is built from its config on PyTorch's `meta`
device (no memory, any architecture), its decoder blocks found by `lisa.find_blocks`. Per GPU:

    weights      2 copies (u, w) × P × param_bytes / shards      (+ 2 gathered blocks under FSDP)
    gradients    2 × T × grad_bytes / shards                      T = trainable parameters per copy
    optimizer    2 × T × (8 [AdamW m, v in fp32] + 4 [fp32 master, if params are 16-bit]) / shards
                 (0 on the GPU with CPU offload of optimizer state)
    activations  one copy's forward-backward at a time (u's backward ends before w's forward, and
                 w's validation micro-batch before its training one), in one of two variants:

    "gpu16" (default): per block s·b·h·(34 + 5·a·s/h) bytes in 16-bit (Korthikanti et al. 2022),
        or 2·s·b·h per block plus one full block with gradient checkpointing; plus the logits
        N·V·(2 + 4) (16-bit, and fp32 for the loss). An estimate from the literature.
    "eager32": fp32 eager PyTorch on a CPU (no dropout, SDPA's flash kernel: no s² term), the
        bytes autograd saves for backward, counted with `torch.autograd.graph.saved_tensors_hooks`
        on GPT-2 blocks (gelu_new MLP of width 4h; other block types save other amounts):
          trainable block                         4·(30·b·s·h + b·a·s + 4·b·s)
          frozen block that gradients cross       4·(24·b·s·h + b·a·s + 4·b·s)  (no Linear inputs)
          blocks below the lowest trainable one   0 (no graph)
          final norm, head input, log-probs       4·(b·s·h + 2·b·s + N·h·[head trains] + N·V)
        plus the transient at the top of the backward, the larger of 2·N·V·4 (the log-probs'
        gradient and the logits' gradient, while the log-probs are still held) and
        4·(V·h + N·h) when the head trains (its weight gradient is a new V×h tensor that is then
        added into w's existing gradient: w's second micro-batch accumulates); and, instead of the
        activations after the backward, AdamW's single-tensor CPU step, which holds two temporaries
        of the largest trainable parameter (sqrt(v) and its quotient) — the larger of the two
        phases counts.

shards: N GPUs for what the sharding partitions, 1 for what it replicates. FSDP full shard and
DeepSpeed ZeRO-3 partition all three; ZeRO-2 gradients and optimizer state; ZeRO-1 the optimizer
state only; DDP nothing.
param_dtype, one of `config.PRECISIONS` (the trainer's `precision` names, the same meaning):
"bf16" (the default) is the trainer's `precision: bf16`: fp32 weights, gradients and AdamW state
(no master copy), 16-bit activations under autocast. "bf16-weights" holds 16-bit weights and
gradients with an fp32 master copy in the optimizer (the usual mixed-precision recipe; the
trainer does not run it yet), "fp32" is fp32 throughout. For full training "bf16" and
"bf16-weights" both give 16 bytes per parameter and copy (FSDP's gathered blocks come in the
weights' dtype); with LISA or LoRA, where frozen weights dominate, "bf16" needs twice the weight
memory of "bf16-weights".
N: positions where the LM head runs. The trainer computes it only at labelled positions
(`losses.response_only_loss`), N = label_tokens of the micro-batch; b·s when unset.
T: all parameters (full); n_active blocks, plus embeddings, head and final norm when
`lisa_train_embeddings` (LISA, as `lisa.Lisa` decides: every parameter outside the blocks, tied
embeddings counted once); the LoRA matrices r·(in + out) of every Linear inside the blocks (LoRA).
Not modelled: the allocator's slack, the framework's own buffers (CUDA context, thread pools), the
per-block weight-gradient transients in the middle of the backward (one block's Linear, small
next to the head), and LoRA's adapter activations (eager32 covers full and LISA). The weight,
gradient and optimizer terms are counts checked against measured tensors in the tests; the
eager32 total is checked against the measured peak resident set of real training steps
(`experiments.memory_probe`, `benchmarks/memory.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from .config import CONFIG_DIR
from .errors import ConfigError
from .lisa import find_blocks

GIB = 2**30
SHARDINGS = ("fsdp", "zero3", "zero2", "zero1", "ddp")
MODEL_CONFIGS = CONFIG_DIR / "models"
PAPER_MODELS = ("gpt2", "meta-llama/Meta-Llama-3-8B", "EleutherAI/gpt-neox-20b", "01-ai/Yi-34B")
PRECISION_BYTES = {"fp32": (4, 4), "bf16": (4, 2), "bf16-weights": (2, 2)}
"""(weight and gradient bytes, activation bytes) per element of each precision."""


def load_config(name_or_path: str):
    """A model config: a local config.json / folder, or one shipped in configs/models/."""
    path = Path(name_or_path)
    candidates = [
        path / "config.json",
        path,
        MODEL_CONFIGS / f"{name_or_path.replace('/', '__')}.json",
    ]
    for c in candidates:
        if c.is_file():
            d = json.loads(c.read_text())
            kind = d.pop("model_type", None)
            if kind not in CONFIG_MAPPING:
                raise ConfigError(f"{c}: unknown model_type {kind!r}.")
            return CONFIG_MAPPING[kind](**{k: v for k, v in d.items() if k != "architectures"})
    shipped = sorted(p.stem.replace("__", "/") for p in MODEL_CONFIGS.glob("*.json"))
    raise ConfigError(
        f"no config for {name_or_path!r}: pass a folder or config.json, or one of "
        f"the shipped configs {shipped}."
    )


@dataclass(frozen=True)
class ModelShape:
    """Exact counts of a causal LM, from its config on the meta device."""

    params: int
    block_params: tuple[int, ...]
    lora_dims: tuple[tuple[int, int], ...]  # (in, out) of each Linear inside the blocks
    hidden: int
    heads: int
    vocab: int
    largest_param: int = 0  # elements of the largest parameter tensor (tied ones once)
    largest_block_param: int = 0  # elements of the largest parameter tensor inside a block

    @property
    def outside_blocks(self) -> int:
        return self.params - sum(self.block_params)


def model_shape(name_or_path: str | None = None, model: nn.Module | None = None) -> ModelShape:
    """The counts of a model: built from its config on the meta device, or the one given."""
    if model is None:
        config = load_config(name_or_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    config = model.config
    _, blocks = find_blocks(model)
    lin = tuple(
        (m.in_features, m.out_features)
        for b in blocks
        for m in b.modules()
        if isinstance(m, nn.Linear)
    )
    conv = tuple(
        (m.weight.shape[0], m.weight.shape[1])
        for b in blocks
        for m in b.modules()
        if type(m).__name__ == "Conv1D"
    )  # GPT-2's linear layers
    hidden = config.get_text_config().hidden_size
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        block_params=tuple(sum(p.numel() for p in b.parameters()) for b in blocks),
        lora_dims=lin + conv,
        hidden=hidden,
        heads=config.get_text_config().num_attention_heads,
        vocab=config.get_text_config().vocab_size,
        largest_param=max(p.numel() for p in model.parameters()),
        largest_block_param=max(p.numel() for b in blocks for p in b.parameters()),
    )


@dataclass(frozen=True)
class MemorySetup:
    """A training configuration whose per-GPU memory is predicted."""

    gpus: int = 1
    mode: str = "full"  # "full", "lisa", "lora"
    lisa_active: int = 2
    lisa_train_embeddings: bool = True  # embeddings, head, final norm train under LISA
    lisa_lowest: int = 0  # lowest active block of the draw (eager32: no graph below it)
    lora_rank: int = 128
    param_dtype: str = "bf16"  # the trainer's bf16 autocast; "bf16-weights", "fp32" (docstring)
    batch: int = 1  # micro-batch per GPU
    seq: int = 1024
    sharding: str = "fsdp"  # "fsdp" (full shard), "zero3", "zero2", "zero1" or "ddp"
    offload: bool = False  # optimizer state (and master weights) on the CPU
    checkpointing: bool = False
    label_tokens: int | None = None  # positions where the LM head runs per micro-batch (b·s)
    activations: str = "gpu16"  # "gpu16" (Korthikanti, 16-bit GPU) or "eager32" (fp32 CPU)


def predict(shape: ModelShape, s: MemorySetup) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring), and their total."""
    if s.mode not in ("full", "lisa", "lora") or s.sharding not in SHARDINGS:
        raise ConfigError(f"mode must be full, lisa or lora; sharding one of {SHARDINGS}.")
    if s.mode == "lisa" and s.sharding.startswith("zero"):
        raise ConfigError(
            "LISA does not run under DeepSpeed ZeRO (the trainer refuses it, see zero.py): "
            "predict it with sharding fsdp, the launch that runs it."
        )
    if s.activations not in ("gpu16", "eager32"):
        raise ConfigError("activations must be gpu16 or eager32.")
    n = len(shape.block_params)
    if s.mode == "lisa" and not 1 <= s.lisa_active <= n:
        raise ConfigError(f"lisa_active must lie in [1, {n}].")
    if s.mode == "lisa" and not 0 <= s.lisa_lowest <= n - s.lisa_active:
        raise ConfigError(f"lisa_lowest must lie in [0, {n - s.lisa_active}] (n_blocks - active).")
    if s.param_dtype not in PRECISION_BYTES:
        raise ConfigError(f"param_dtype must be one of {tuple(PRECISION_BYTES)}.")
    pb, ab = PRECISION_BYTES[s.param_dtype]  # weights and gradients; activations
    full_shard = s.sharding in ("fsdp", "zero3")
    shards = s.gpus if full_shard else 1  # of the weights
    grad_shards = s.gpus if full_shard or s.sharding == "zero2" else 1
    optim_shards = 1 if s.sharding == "ddp" else s.gpus
    if s.mode == "full":
        trainable = shape.params
    elif s.mode == "lisa":
        trainable = s.lisa_active * max(shape.block_params)
        if s.lisa_train_embeddings:
            trainable += shape.outside_blocks
    else:
        trainable = sum(s.lora_rank * (i + o) for i, o in shape.lora_dims)
    weights = 2 * shape.params * pb / shards
    if full_shard and shards > 1:
        weights += 2 * max(shape.block_params) * pb  # the gathered block and the prefetched one
    grads = 2 * trainable * pb / grad_shards
    optim = 0.0 if s.offload else 2 * trainable * (8 + (4 if pb < 4 else 0)) / optim_shards
    if s.activations == "eager32":
        acts = _eager32_activations(shape, s)
    else:
        h, a, b, t = shape.hidden, shape.heads, s.batch, s.seq
        per_block = t * b * h * (34 + 5 * a * t / h) * ab / 2
        acts = (n * 2 * t * b * h * ab / 2 + per_block) if s.checkpointing else n * per_block
        labels = b * t if s.label_tokens is None else s.label_tokens
        acts += labels * shape.vocab * (ab + 4)
    out = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts}
    out["total"] = sum(out.values())
    return out


def eager32_saved_bytes(shape: ModelShape, s: MemorySetup) -> float:
    """Bytes autograd saves for one forward of one copy in fp32 eager (the "eager32" count)."""
    if s.mode == "lora" or s.checkpointing or s.param_dtype != "fp32":
        raise ConfigError("activations='eager32' covers fp32 full and LISA training only.")
    h, a, b, t, v = shape.hidden, shape.heads, s.batch, s.seq, shape.vocab
    n_lab = b * t if s.label_tokens is None else s.label_tokens
    n = len(shape.block_params)
    small = b * a * t + 4 * b * t  # attention log-sum-exp, layer-norm statistics
    if s.mode == "full" or s.lisa_train_embeddings:  # the embeddings train: every block crossed
        n_train, n_frozen = (n, 0) if s.mode == "full" else (s.lisa_active, n - s.lisa_active)
        head = n_lab * h
    else:  # no graph below the lowest active block
        n_train, n_frozen, head = s.lisa_active, n - s.lisa_lowest - s.lisa_active, 0
    saved = n_train * (30 * b * t * h + small) + n_frozen * (24 * b * t * h + small)
    return 4 * (saved + b * t * h + 2 * b * t + n_lab * v + head)


def _eager32_activations(shape: ModelShape, s: MemorySetup) -> float:
    """Peak transient bytes of fp32 eager training on a CPU (module docstring, "eager32")."""
    h, v = shape.hidden, shape.vocab
    n_lab = s.batch * s.seq if s.label_tokens is None else s.label_tokens
    head_trains = s.mode == "full" or s.lisa_train_embeddings
    top = 4 * max(2 * n_lab * v, (v * h + n_lab * h) if head_trains else 0)
    largest = shape.largest_param if head_trains else shape.largest_block_param
    return max(eager32_saved_bytes(shape, s) + top, 4 * 2 * largest)


def verdict(name: str, setup: MemorySetup, gpu_gib: float) -> str:
    p = predict(model_shape(name), setup)
    rows = [
        f"{name}: {setup.gpus} GPU(s) × {gpu_gib:g} GiB, {setup.mode}"
        + (f" ({setup.lisa_active} blocks)" if setup.mode == "lisa" else "")
        + f", {setup.sharding}{', offload' if setup.offload else ''}, {setup.param_dtype}, "
        f"micro-batch "
        f"{setup.batch}×{setup.seq}{', checkpointing' if setup.checkpointing else ''}"
    ]
    rows += [f"  {k:<12}{v / GIB:9.1f} GiB" for k, v in p.items()]
    fits = p["total"] <= gpu_gib * GIB
    rows.append(
        f"  verdict: {'fits' if fits else 'does NOT fit'} "
        f"({p['total'] / (gpu_gib * GIB):.0%} of {gpu_gib:g} GiB per GPU)"
    )
    return "\n".join(rows)
