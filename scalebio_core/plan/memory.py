"""A memory model of ScaleBiO training: bytes per GPU for two model copies, LISA, LoRA, sharding.

Parameter counts are exact and generic: the model is built from its config on PyTorch's `meta`
device (no memory, any architecture), its decoder blocks found by `blocks.find_blocks`. Per GPU:

    weights      2 copies (u, w) × P × param_bytes / shards      (+ 2 gathered blocks under FSDP);
                 LoRA on one shared base (lora_base: shared): (P + 2·T) × param_bytes / shards
    gradients    2 × T × grad_bytes / shards                      T = trainable parameters per copy
    optimizer    2 × T × (8 [AdamW m, v in fp32] + 4 [fp32 master, if params are 16-bit]) / shards
                 (0 on the GPU with CPU offload of optimizer state)
    activations  one copy's forward-backward at a time (u's backward ends before w's forward, and
                 w's validation micro-batch before its training one), in one of two variants:

    "gpu16" (default): per block s·b·h·(34 + 5·a·s/h) bytes in 16-bit (Korthikanti et al. 2022),
        or 2·s·b·h per block plus one full block with gradient checkpointing; plus the logits
        N·V·(2 + 4) (16-bit, and fp32 for the loss). An estimate from the literature.
    "eager": eager PyTorch on a CPU (no dropout, SDPA's flash kernel: no s² term) in fp32 or
        bf16-weights, the bytes autograd saves for backward, counted with
        `torch.autograd.graph.saved_tensors_hooks` on GPT-2 blocks (gelu_new MLP of width 4h;
        other block types save other amounts), e = 4 (fp32) or 2 (bf16-weights) bytes:
          trainable block                         e·28·b·s·h + 4·(b·a·s + 4·b·s)
          frozen block that gradients cross       e·22·b·s·h + 4·(b·a·s + 4·b·s)  (no Linear inputs)
          blocks below the lowest trainable one   0 (no graph)
          final norm, head input, log-probs       e·(b·s·h + N·h·[head trains]) + 4·(2·b·s + N·V)
          LoRA: every block is crossed and saves what a trainable block saves (each adapter's
          A needs its Linear's input), plus e·r·b·s per adapted Linear (A's output, for B); the
          head is frozen and runs at every position, N = b·(s − 1) (a PEFT model's loss takes
          the full logits, `losses.LMFns`), and the hooks count no e·b·s·h at the top
        (statistics and log-probabilities are fp32 in either precision), plus the transient at
        the top of the backward, the larger of 2·N·V·4 (the log-probs' gradient and the logits'
        gradient, while the log-probs are still held) and 4·(V·h + N·h) when the head trains (its
        weight gradient is a new V×h tensor that is then added into w's existing gradient: w's
        second micro-batch accumulates); and, instead of the activations after the backward,
        the optimizer's single-tensor CPU step, which holds two fp32 temporaries of the largest
        trainable parameter (sqrt(v) and its quotient; three with bf16-weights, whose gradient is
        read as fp32) — the larger of the two phases counts.
        With gradient checkpointing (`recompute.py`; the head's loss in chunks of
        C = max(64, 2²⁴ / V) positions, `losses.head_chunk`) forward holds only each crossed
        block's input, the final norm's and the head's inputs,
        e·((blocks crossed + 1)·b·s·h + N·h) + 4·2·b·s;
        backward adds the larger of one head chunk (4·C·V recomputed log-probs and the top
        transient above with C for N) and one recomputed block with its two gradients
        (e·(28 + 2)·b·s·h + its statistics). The losses run without a key/value cache
        (`use_cache=False`), which would hold and save 2·b·s·h more per block.

b, s: the micro-batch (records per GPU) and max_length. Under `micro_tokens` T (a micro-batch
of at most T tokens, padding and packing's fill included, `build.split_parts`) b is min(b, T/s)
throughout: activations scale with the tokens of a micro-batch, the attention matrix with rows ×
s², and T/s rows of s tokens bound both.
shards: N GPUs for what the sharding partitions, 1 for what it replicates. FSDP full shard and
DeepSpeed ZeRO-3 partition all three; ZeRO-2 gradients and optimizer state; ZeRO-1 the optimizer
state only; DDP nothing.
param_dtype, one of `config.PRECISIONS` (the trainer's `precision` names, the same meaning):
"bf16" (the default) is the trainer's `precision: bf16`: fp32 weights, gradients and AdamW state
(no master copy), 16-bit activations under autocast. "bf16-weights" holds 16-bit weights and
gradients, with fp32 master weights and AdamW state for the trainable parameters only
(`masters.py`; no master for frozen LISA blocks), "fp32" is fp32 throughout. For full
training "bf16" and "bf16-weights" both give 16 bytes per parameter and copy (FSDP's gathered
blocks come in bf16 for both: "bf16" all-gathers its fp32 shards as bf16); with LISA or LoRA,
where frozen weights dominate, "bf16" needs twice the weight memory of "bf16-weights".
N: positions where the LM head runs. The trainer computes it only at labelled positions
(`losses.response_only_loss`), N = label_tokens of the micro-batch; b·s when unset.
T: all parameters (full); n_active blocks, plus embeddings, head and final norm when
`lisa_train_embeddings` (LISA, as `lisa.Lisa` decides: every parameter outside the blocks, tied
embeddings counted once); the LoRA matrices r·(in + out) of every Linear inside the blocks (LoRA).
Not modelled: the allocator's slack, the framework's own buffers (CUDA context, thread pools), the
per-block weight-gradient transients in the middle of the backward (one block's Linear, small
next to the head); a plan's verdict (`Plan.fits`) keeps a headroom for them, `HEADROOM` of
each GPU (and of the host memory per node, when given) free. The weight,
gradient and optimizer terms are counts checked against measured tensors in the tests; the
eager total is checked against the measured peak resident set of real training steps
(`probe.measure`, `benchmarks/memory.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..core.blocks import find_blocks
from ..errors import ConfigError, ModelError
from ..parallel.engines import check_plan
from ..train.config import TrainConfig
from ..train.losses import head_chunk
from ..train.models import architecture

GIB = 2**30
SHARDINGS = ("fsdp", "zero3", "zero2", "zero1", "ddp")
PAPER_MODELS = ("gpt2", "meta-llama/Meta-Llama-3-8B", "EleutherAI/gpt-neox-20b", "01-ai/Yi-34B")
HEADROOM = 0.1
"""The share of each GPU's and each node's memory a plan keeps free by default: what the model
does not count (the CUDA context, the allocator's slack, the framework's buffers, other processes
of the node)."""
PRECISION_BYTES = {"fp32": (4, 4), "bf16": (4, 2), "bf16-weights": (2, 2)}
"""(weight and gradient bytes, activation bytes) per element of each precision."""


def load_config(name_or_path: str):
    """A model config (`models.architecture`): an embedded model ('embedded:nano', …), a local
    config.json / folder, one shipped in configs/models/, or the hub's cache."""
    try:
        return architecture(name_or_path)
    except ModelError as e:
        raise ConfigError(str(e)) from None


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
    supports_sdpa: bool = True  # transformers' 'auto' attention is sdpa (else eager)

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
        supports_sdpa=bool(getattr(model, "_supports_sdpa", True)),
    )


@dataclass(frozen=True)
class MemorySetup:
    """A training configuration whose per-GPU memory is predicted."""

    gpus: int = 1
    mode: str = "full"  # "full", "lisa", "lora"
    lisa_active: int = 2
    lisa_train_embeddings: bool = True  # embeddings, head, final norm train under LISA
    lisa_lowest: int = 0  # lowest active block of the draw (eager: no graph below it)
    lora_rank: int = 128
    lora_shared: bool = False  # u and w as two adapters on one base (lora_base: shared)
    param_dtype: str = "bf16"  # the trainer's bf16 autocast; "bf16-weights", "fp32" (docstring)
    batch: int = 1  # micro-batch per GPU
    seq: int = 1024
    sharding: str = "fsdp"  # "fsdp" (full shard), "zero3", "zero2", "zero1" or "ddp"
    offload: bool = False  # optimizer state (and master weights) on the CPU
    checkpointing: bool = False
    label_tokens: int | None = None  # positions where the LM head runs per micro-batch (b·s)
    tokens: int | None = None  # the most tokens of a micro-batch (micro_tokens); None: b·s
    activations: str = "gpu16"  # "gpu16" (Korthikanti, 16-bit GPU) or "eager" (fp32 CPU)
    attn_implementation: str = "sdpa"  # "eager" stores the attention matrix (the s² term)

    @property
    def rows(self) -> float:
        """Rows of s tokens that bound a micro-batch's activations: b, or tokens/s when a token
        bound is smaller (a micro-batch of at most `tokens` tokens in rows of at most s)."""
        return self.batch if self.tokens is None else min(self.batch, self.tokens / self.seq)


def predict(shape: ModelShape, s: MemorySetup) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring), and their total."""
    if s.mode not in ("full", "lisa", "lora") or s.sharding not in SHARDINGS:
        raise ConfigError(f"mode must be full, lisa or lora; sharding one of {SHARDINGS}.")
    if s.mode == "lisa" and s.sharding.startswith("zero"):
        raise ConfigError(
            "LISA does not run under DeepSpeed ZeRO (the trainer refuses it, see zero.py): "
            "predict it with sharding fsdp, the launch that runs it."
        )
    if s.activations not in ("gpu16", "eager"):
        raise ConfigError("activations must be gpu16 or eager.")
    n = len(shape.block_params)
    if s.mode == "lisa" and not 1 <= s.lisa_active <= n:
        raise ConfigError(f"lisa_active must lie in [1, {n}].")
    if s.mode == "lisa" and not 0 <= s.lisa_lowest <= n - s.lisa_active:
        raise ConfigError(f"lisa_lowest must lie in [0, {n - s.lisa_active}] (n_blocks - active).")
    if s.param_dtype not in PRECISION_BYTES:
        raise ConfigError(f"param_dtype must be one of {tuple(PRECISION_BYTES)}.")
    if s.param_dtype == "bf16-weights" and s.sharding.startswith("zero"):
        raise ConfigError(
            "bf16-weights does not run under DeepSpeed ZeRO (the trainer refuses it, see zero.py): "
            "predict it with sharding fsdp or ddp, or use bf16."
        )
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
    if s.mode == "lora":  # the base once (shared) or twice, and both copies' adapters
        weights = (base_copies(s) * shape.params + 2 * trainable) * pb / shards
    else:
        weights = 2 * shape.params * pb / shards
    if full_shard and shards > 1:  # the gathered block and the prefetched one, FSDP's in bf16
        gathered = 2 if s.sharding == "fsdp" and s.param_dtype == "bf16" else pb
        weights += 2 * max(shape.block_params) * gathered
    grads = 2 * trainable * pb / grad_shards
    optim = 0.0 if s.offload else 2 * trainable * (8 + (4 if pb < 4 else 0)) / optim_shards
    if s.activations == "eager":
        acts = _eager_activations(shape, s)
    else:
        h, a, b, t = shape.hidden, shape.heads, s.rows, s.seq
        s2 = 5 * a * t / h if s.attn_implementation == "eager" else 0.0  # the attention matrix
        per_block = t * b * h * (34 + s2) * ab / 2
        acts = (n * 2 * t * b * h * ab / 2 + per_block) if s.checkpointing else n * per_block
        labels = b * t if s.label_tokens is None else s.label_tokens
        acts += labels * shape.vocab * (ab + 4)
    out = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts}
    out["total"] = sum(out.values())
    return out


def base_copies(s: MemorySetup) -> int:
    """Whole models the trainer builds: 1 for LoRA on a shared base, else 2 (u and w)."""
    return 1 if s.mode == "lora" and s.lora_shared else 2


def _adapter_bytes(shape: ModelShape, s: MemorySetup, blocks: int) -> float:
    """Eager LoRA: A's output (r per position) of every adapted Linear in `blocks` blocks."""
    if s.mode != "lora":
        return 0.0
    per_block = len(shape.lora_dims) / len(shape.block_params)
    e = 4 if s.param_dtype == "fp32" else 2
    return e * s.lora_rank * s.rows * s.seq * per_block * blocks


def _eager_terms(shape: ModelShape, s: MemorySetup) -> tuple:
    """(element bytes, labelled positions, trainable blocks, frozen blocks crossed, head trains,
    bytes of one block's small fp32 terms)."""
    if s.param_dtype == "bf16":
        raise ConfigError("activations='eager' covers training in fp32 or bf16-weights.")
    if s.attn_implementation not in ("sdpa", "auto"):
        raise ConfigError("activations='eager' counts SDPA attention (no s² term) only.")
    b, t, n = s.rows, s.seq, len(shape.block_params)
    n_lab = b * t if s.label_tokens is None else s.label_tokens
    if s.mode == "lora":  # every block holds adapters; the head runs at every position
        n_lab, n_train, n_frozen = b * (t - 1), n, 0
    elif s.mode == "full" or s.lisa_train_embeddings:  # the embeddings train: all blocks crossed
        n_train, n_frozen = (n, 0) if s.mode == "full" else (s.lisa_active, n - s.lisa_active)
    else:  # no graph below the lowest active block
        n_train, n_frozen = s.lisa_active, n - s.lisa_lowest - s.lisa_active
    head_trains = s.mode == "full" or (s.mode == "lisa" and s.lisa_train_embeddings)
    small = 4 * (b * shape.heads * t + 4 * b * t)  # attention log-sum-exp, norm statistics
    return (4 if s.param_dtype == "fp32" else 2), n_lab, n_train, n_frozen, head_trains, small


def loading(shape: ModelShape, s: MemorySetup) -> dict[str, float]:
    """Bytes of building the copies and of what offload keeps on the host, as the trainer does.

    gpu_load  per GPU while the copies are built. FSDP (`sharding.sharded_copies`): the copies
              are sharded before any weight reaches a GPU, so the training peak covers it (0).
              Otherwise every rank loads w whole, copies it into u and moves both whole onto
              its GPU before DeepSpeed partitions them: 2·P·param_bytes (P·param_bytes for
              LoRA on a shared base: one model).
    host_load per node (all `gpus` ranks of one node) while the copies are built: FSDP holds one
              whole copy, on rank 0; otherwise every rank holds its models whole:
              gpus·copies·P·bytes.
    host      per node in training: what offload keeps in host memory (FSDP's offload: every
              rank's weights, gradients and optimizer shards; ZeRO's: the optimizer state).
    """
    whole = shape.params * PRECISION_BYTES[s.param_dtype][0]
    fsdp = s.sharding == "fsdp" and s.gpus > 1
    copies = base_copies(s)
    kept = predict(shape, dataclasses.replace(s, offload=False))  # the state, were it on the GPU
    if s.offload and fsdp:  # FSDP offloads weights, gradients and optimizer state
        host = copies * whole + s.gpus * (kept["gradients"] + kept["optimizer"])
    elif s.offload:  # ZeRO offloads the optimizer state
        host = s.gpus * kept["optimizer"]
    else:
        host = 0.0
    return {
        "gpu_load": 0.0 if fsdp else copies * whole,
        "host_load": whole if fsdp else s.gpus * copies * whole,
        "host": host,
    }


def eager_saved_bytes(shape: ModelShape, s: MemorySetup) -> float:
    """Bytes autograd saves for one forward of one copy in eager mode without checkpointing (the
    "eager" count): in the weights' dtype (fp32, or bf16 under bf16-weights), but the norm and
    attention statistics and the log-probabilities in fp32."""
    if s.checkpointing:
        raise ConfigError("eager_saved_bytes counts a forward without gradient checkpointing.")
    e, n_lab, n_train, n_frozen, head_trains, small = _eager_terms(shape, s)
    bth, h, v = s.rows * s.seq * shape.hidden, shape.hidden, shape.vocab
    blocks = e * (28 * n_train + 22 * n_frozen) * bth + (n_train + n_frozen) * small
    blocks += _adapter_bytes(shape, s, n_train)
    top = bth * (s.mode != "lora") + n_lab * h * head_trains  # LoRA: measured without the b·s·h
    return blocks + e * top + 4 * (2 * s.rows * s.seq + n_lab * v)


def _eager_activations(shape: ModelShape, s: MemorySetup) -> float:
    """Peak transient bytes of eager training on a CPU (module docstring, "eager")."""
    e, n_lab, n_train, n_frozen, head_trains, small = _eager_terms(shape, s)
    h, v, bth = shape.hidden, shape.vocab, s.rows * s.seq * shape.hidden
    largest = shape.largest_param if head_trains else shape.largest_block_param
    if s.mode == "lora":
        largest = s.lora_rank * max(max(d) for d in shape.lora_dims)
    optimizer_step = 4 * (2 if e == 4 else 3) * largest  # + the fp32 gradient (bf16-weights)
    if not s.checkpointing:
        top = 4 * max(2 * n_lab * v, (v * h + n_lab * h) if head_trains else 0)
        return max(eager_saved_bytes(shape, s) + top, optimizer_step)
    chunk = min(n_lab, head_chunk(v))
    held = e * ((n_train + n_frozen + 1) * bth + n_lab * h) + 4 * 2 * s.rows * s.seq
    head = 4 * chunk * v + 4 * max(2 * chunk * v, (v * h + chunk * h) if head_trains else 0)
    block = e * ((28 if n_train else 22) + 2) * bth + small + _adapter_bytes(shape, s, 1)
    return max(held + max(head, block), optimizer_step)


PLAN_FIELDS = (
    "model",
    "lisa_active",
    "lisa_train_embeddings",
    "lora_rank",
    "lora_base",
    "batch_size",
    "val_batch_size",
    "grad_accum",
    "max_length",
    "micro_tokens",
    "precision",
    "attn_implementation",
    "gradient_checkpointing",
    "fsdp",
    "fsdp_offload",
    "zero_stage",
    "zero_offload",
)
"""The run config's fields the memory model reads: the options of `python -m scalebio_core
memory`, by the same names (beside the machine: --gpus, --gpu-mem)."""


def setup_of(cfg: TrainConfig, gpus: int) -> MemorySetup:
    """The MemorySetup of run config `cfg` launched on `gpus` processes, or ConfigError for a
    run the trainer refuses (`engines.check_plan`) or one the model cannot predict.

    The micro-batch is the larger of the training and validation ones per process. Offload
    (fsdp_offload, zero_offload) is counted as optimizer state off the GPU; FSDP's offload also
    moves weights and gradients, which the model still counts on the GPU (an upper bound).
    """
    check_plan(cfg, gpus)
    if cfg.max_length == "auto":
        raise ConfigError(
            "max_length is 'auto' (chosen from the data as a run starts; its start table says "
            "the number): give max_length (--max-length N) to predict memory."
        )
    if cfg.lisa_active > 0 and cfg.lora_rank > 0:
        raise ConfigError("the memory model predicts LISA (lisa_active) or LoRA, not both.")
    if cfg.fsdp:
        sharding = "fsdp"
    else:
        sharding = f"zero{cfg.zero_stage}" if cfg.zero_stage else "ddp"
    per_rank = gpus * cfg.grad_accum
    return MemorySetup(
        gpus=gpus,
        mode="lisa" if cfg.lisa_active else "lora" if cfg.lora_rank else "full",
        lisa_active=cfg.lisa_active or 2,
        lisa_train_embeddings=cfg.lisa_train_embeddings,
        lora_rank=cfg.lora_rank or 128,
        lora_shared=cfg.lora_base == "shared",
        param_dtype=cfg.precision,
        batch=max(cfg.batch_size, cfg.val_batch_size) // per_rank,
        seq=cfg.max_length,
        sharding=sharding,
        offload=cfg.fsdp_offload or cfg.zero_offload,
        checkpointing=cfg.gradient_checkpointing,
        attn_implementation=cfg.attn_implementation,
        tokens=cfg.micro_tokens,
    )


@dataclass(frozen=True)
class Plan:
    """A run config on a machine (`gpus` × `gpu_gib`, `host_gib` per node), with its predicted
    bytes per GPU and per node, judged with `headroom` (a share of each kept free)."""

    cfg: TrainConfig
    gpus: int
    gpu_gib: float
    setup: MemorySetup
    shape: ModelShape
    prediction: dict
    load: dict
    """`loading`: the GPU peak while the copies are built, host memory per node."""
    host_gib: float | None = None
    """Host memory per node (GiB); None: not limited (the verdict says so)."""
    headroom: float = HEADROOM

    @property
    def peak(self) -> float:
        """Bytes per GPU: training, or building the copies when that needs more."""
        return max(self.prediction["total"], self.load["gpu_load"])

    @property
    def host_peak(self) -> float:
        """Bytes of host memory per node: building the copies, or what offload keeps there."""
        return max(self.load["host_load"], self.load["host"])

    @property
    def gpu_limit(self) -> float:
        """Bytes per GPU the plan may use: `gpu_gib` less the headroom."""
        return self.gpu_gib * GIB * (1 - self.headroom)

    @property
    def host_limit(self) -> float | None:
        """Bytes per node the plan may use (`host_gib` less the headroom), or None."""
        return None if self.host_gib is None else self.host_gib * GIB * (1 - self.headroom)

    @property
    def gpu_fits(self) -> bool:
        return self.peak <= self.gpu_limit

    @property
    def host_fits(self) -> bool:
        return self.host_limit is None or self.host_peak <= self.host_limit

    @property
    def fits(self) -> bool:
        return self.gpu_fits and self.host_fits

    @property
    def share(self) -> float:
        return self.peak / (self.gpu_gib * GIB)

    def text(self) -> str:
        s, c = self.setup, self.cfg
        base = "one shared base" if s.lora_shared else "two copies of the base"
        train = {"lisa": f"LISA {s.lisa_active} blocks", "lora": f"LoRA r={s.lora_rank} ({base})"}
        head = (
            f"{c.model}: {self.gpus} GPU(s) × {self.gpu_gib:g} GiB, "
            f"{train.get(s.mode, 'full')}, {s.sharding}{', offload' if s.offload else ''}, "
            f"{c.precision}, {s.attn_implementation}, micro-batch {s.batch}×{s.seq}"
            f"{f' (at most {s.tokens} tokens)' if s.tokens is not None else ''}"
            f"{', gradient checkpointing' if s.checkpointing else ''}"
        )
        rows = [head, *(f"  {k:<12}{v / GIB:9.1f} GiB" for k, v in self.prediction.items())]
        if self.load["gpu_load"]:
            rows.append(
                f"  {'load':<12}{self.load['gpu_load'] / GIB:9.1f} GiB  (the models whole on "
                "each GPU before they are partitioned)"
            )
        rows.append(
            f"  host memory per node: {self.load['host_load'] / GIB:.1f} GiB while the copies "
            f"are built, {self.load['host'] / GIB:.1f} GiB offloaded in training"
        )
        keep = f"{self.headroom:.0%} headroom"
        host = (
            "host: not limited (give the host memory per node: --host-mem GiB)"
            if self.host_limit is None
            else f"host {self.host_limit / GIB:.1f} GiB per node ({self.host_gib:g} GiB less "
            f"{keep})"
        )
        rows.append(
            f"  limits: GPU {self.gpu_limit / GIB:.1f} GiB ({self.gpu_gib:g} GiB less {keep}); "
            + host
        )
        over = []
        if not self.gpu_fits:
            over.append(f"GPU {self.peak / GIB:.1f} > {self.gpu_limit / GIB:.1f} GiB")
        if not self.host_fits:
            over.append(f"host {self.host_peak / GIB:.1f} > {self.host_limit / GIB:.1f} GiB")
        rows.append(
            f"  verdict: {'fits' if self.fits else 'does NOT fit'} ({self.share:.0%} of "
            f"{self.gpu_gib:g} GiB per GPU, host peak {self.host_peak / GIB:.1f} GiB per node"
            + (f"; over: {', '.join(over)}" if over else "")
            + ")"
        )
        return "\n".join(rows)


def plan(
    cfg: TrainConfig,
    gpus: int,
    gpu_gib: float,
    shape: ModelShape | None = None,
    host_gib: float | None = None,
    headroom: float = HEADROOM,
) -> Plan:
    """Predict run config `cfg` on `gpus` GPUs of `gpu_gib` GiB, with `host_gib` GiB of host
    memory per node (None: not limited) and `headroom` of each kept free (ConfigError: refused)."""
    check_machine(gpus, gpu_gib, host_gib, headroom)
    setup = setup_of(cfg, gpus)
    shape = shape or model_shape(cfg.model)
    if setup.attn_implementation == "auto":  # as transformers resolves it for this model
        attn = "sdpa" if shape.supports_sdpa else "eager"
        setup = dataclasses.replace(setup, attn_implementation=attn)
    return Plan(
        cfg,
        gpus,
        gpu_gib,
        setup,
        shape,
        predict(shape, setup),
        loading(shape, setup),
        host_gib,
        headroom,
    )


def check_machine(gpus: int, gpu_gib: float, host_gib: float | None, headroom: float) -> None:
    """Refuse a machine no plan can describe, naming the option to fix."""
    if gpus < 1 or not gpu_gib > 0:
        raise ConfigError(f"--gpus must be >= 1 and --gpu-mem > 0 GiB (got {gpus}, {gpu_gib}).")
    if host_gib is not None and not host_gib > 0:
        raise ConfigError(
            f"--host-mem must be > 0 GiB per node (got {host_gib}); leave it out for no host limit."
        )
    if not 0 <= headroom < 1:
        raise ConfigError(f"--headroom must lie in [0, 1) (a share kept free), got {headroom}.")
