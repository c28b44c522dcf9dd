"""A memory model of ScaleBiO training: bytes per GPU for two model copies, LISA, LoRA, sharding.

Parameter counts are exact and generic: the model is built from its config on PyTorch's `meta`
device (no memory, any architecture), its decoder blocks found by `lisa.find_blocks`. Per GPU:

    weights      2 copies (u, w) × P × param_bytes / shards      (+ 2 gathered blocks under FSDP)
    gradients    2 × T × grad_bytes / shards                      T = trainable parameters per copy
    optimizer    2 × T × (8 [AdamW m, v in fp32] + 4 [fp32 master, if params are 16-bit]) / shards
                 (0 on the GPU with CPU offload of optimizer state)
    activations  one copy's forward-backward at a time (u's backward ends before w's forward):
                 per block s·b·h·(34 + 5·a·s/h) bytes in 16-bit (Korthikanti et al. 2022), or
                 2·s·b·h per block plus one full block with gradient checkpointing;
                 plus the logits b·s·V·(2 + 4) (16-bit, and fp32 for the loss)

T: all parameters (full); embeddings, head, final norm and n_active blocks (LISA); the LoRA
matrices r·(in + out) of every Linear inside the blocks (LoRA). The activation term is an estimate
from the literature; the other terms are counts. Checked against measured tensors in the tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .bilevel import ConfigError
from .presets import CONFIG_DIR

GIB = 2**30
MODEL_CONFIGS = CONFIG_DIR / "models"
PAPER_MODELS = ("gpt2", "meta-llama/Meta-Llama-3-8B", "EleutherAI/gpt-neox-20b", "01-ai/Yi-34B")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def load_config(name_or_path: str):
    """A model config: a local config.json / folder, or one shipped in configs/models/."""
    from transformers import CONFIG_MAPPING

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

    @property
    def outside_blocks(self) -> int:
        return self.params - sum(self.block_params)


def model_shape(name_or_path: str | None = None, model: nn.Module | None = None) -> ModelShape:
    from transformers import AutoModelForCausalLM

    from .lisa import find_blocks

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
    )


@dataclass(frozen=True)
class MemorySetup:
    """A training configuration whose per-GPU memory is predicted."""

    gpus: int = 1
    mode: str = "full"  # "full", "lisa", "lora"
    lisa_active: int = 2
    lora_rank: int = 128
    param_dtype: str = "bf16"
    batch: int = 1  # micro-batch per GPU
    seq: int = 1024
    sharding: str = "fsdp"  # "fsdp" (full shard) or "ddp"
    offload: bool = False  # optimizer state (and master weights) on the CPU
    checkpointing: bool = False


def predict(shape: ModelShape, s: MemorySetup) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring), and their total."""
    if s.mode not in ("full", "lisa", "lora") or s.sharding not in ("fsdp", "ddp"):
        raise ConfigError("mode must be full, lisa or lora; sharding fsdp or ddp.")
    if s.mode == "lisa" and not 1 <= s.lisa_active <= len(shape.block_params):
        raise ConfigError(f"lisa_active must lie in [1, {len(shape.block_params)}].")
    pb = DTYPE_BYTES[s.param_dtype]
    shards = s.gpus if s.sharding == "fsdp" else 1
    if s.mode == "full":
        trainable = shape.params
    elif s.mode == "lisa":
        trainable = shape.outside_blocks + s.lisa_active * max(shape.block_params)
    else:
        trainable = sum(s.lora_rank * (i + o) for i, o in shape.lora_dims)
    weights = 2 * shape.params * pb / shards
    if s.sharding == "fsdp" and shards > 1:
        weights += 2 * max(shape.block_params) * pb  # the gathered block and the prefetched one
    grads = 2 * trainable * pb / shards
    optim = 0.0 if s.offload else 2 * trainable * (8 + (4 if pb < 4 else 0)) / shards
    h, a, b, t = shape.hidden, shape.heads, s.batch, s.seq
    per_block = t * b * h * (34 + 5 * a * t / h) * pb / 2
    n = len(shape.block_params)
    acts = (n * 2 * t * b * h * pb / 2 + per_block) if s.checkpointing else n * per_block
    logits = b * t * shape.vocab * (pb + 4)
    out = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts + logits}
    out["total"] = sum(out.values())
    return out


def verdict(name: str, setup: MemorySetup, gpu_gib: float) -> str:
    p = predict(model_shape(name), setup)
    rows = [
        f"{name}: {setup.gpus} GPU(s) × {gpu_gib:g} GiB, {setup.mode}"
        + (f" ({setup.lisa_active} blocks)" if setup.mode == "lisa" else "")
        + f", {setup.sharding}{', offload' if setup.offload else ''}, micro-batch "
        f"{setup.batch}×{setup.seq}{', checkpointing' if setup.checkpointing else ''}"
    ]
    rows += [f"  {k:<12}{v / GIB:9.1f} GiB" for k, v in p.items()]
    fits = p["total"] <= gpu_gib * GIB
    rows.append(
        f"  verdict: {'fits' if fits else 'does NOT fit'} "
        f"({p['total'] / (gpu_gib * GIB):.0%} of {gpu_gib:g} GiB per GPU)"
    )
    return "\n".join(rows)


def setup_dict(s: MemorySetup) -> dict:
    return asdict(s)
