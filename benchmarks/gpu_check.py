"""GPU check (issue 5): ScaleBiO step cost and peak memory on a GPT-2-small shape and a ~1B Llama
shape (random init, bf16 autocast), against a plain fine-tuning step, beside the memory model's
prediction.

    python benchmarks/gpu_check.py                  # on a CUDA machine, about 3-5 minutes
    python benchmarks/gpu_check.py --device cpu --tiny   # checks the code path on a CPU (seconds)

For each model and mode (plain fine-tuning; ScaleBiO full, and with gradient checkpointing;
ScaleBiO with LISA 2 blocks, with 16-bit weights (`bf16-weights`: bf16 weights and gradients,
fp32 masters of the trainable parameters), and with both; ScaleBiO with LoRA on two copies of
the base and on one shared base; issue 13) it runs a few warm-up steps,
then times `--steps` steps; tokens/s counts the training tokens of the batch (ScaleBiO also reads
a validation batch of the same size). Peak memory is torch.cuda.max_memory_allocated over the
timed steps (on a CPU: not measured). The prediction is `scalebio_core.memory.predict` for one
GPU, no sharding, with the mode's checkpointing, at the precision the trainer runs with
`precision: bf16` (fp32 weights, gradients and AdamW state, bf16 autocast; on a CPU: fp32 without
autocast) or `bf16-weights`. Prints a markdown table; `--out FILE` replaces its section of FILE
(e.g. benchmarks/RESULTS.md) with it, the command, date and device.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_lines, write_section  # noqa: E402

from scalebio_core.baselines import plain_step  # noqa: E402
from scalebio_core.bilevel import BilevelConfig, init_state, scalebio_step  # noqa: E402
from scalebio_core.lisa import make_lisa_pair  # noqa: E402
from scalebio_core.lora import add_lora, add_shared_lora, shared_views  # noqa: E402
from scalebio_core.losses import LMFns  # noqa: E402
from scalebio_core.memory import GIB, MemorySetup, model_shape, predict  # noqa: E402
from scalebio_core.models import clone_model  # noqa: E402
from scalebio_core.recompute import checkpoint_blocks  # noqa: E402

SHAPES = {
    "gpt2-small": (
        "gpt2",
        {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
    ),
    "llama-1b": (
        "llama",
        {
            "num_hidden_layers": 16,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32000,
        },
    ),
}
TINY = {
    "gpt2-small": (
        "gpt2",
        {"n_layer": 4, "n_embd": 64, "n_head": 4, "vocab_size": 512, "n_positions": 128},
    ),
    "llama-1b": (
        "llama",
        {
            "num_hidden_layers": 4,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 512,
        },
    ),
}


def build(kind: str, kw: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[kind](**kw))
    return model.to(device=device, dtype=dtype).train()


def batch(vocab: int, b: int, t: int, k: int, device: str, g: torch.Generator) -> dict:
    ids = torch.randint(0, vocab, (b, t), generator=g).to(device)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "source_ids": torch.randint(0, k, (b,), generator=g).to(device),
    }


MODES = (
    "plain",
    "full",
    "full ckpt",
    "lisa",
    "lisa bf16w",
    "lisa bf16w ckpt",
    "lora copies",
    "lora shared",
)
"""plain fine-tuning, then ScaleBiO: full, LISA 2 blocks or LoRA (rank `LORA_RANK`, on two
copies of the base or on one shared base); ckpt: gradient checkpointing
(`recompute.checkpoint_blocks`, the head's loss in chunks); bf16w: precision bf16-weights."""
LORA_RANK = 16


def run(name: str, kind: str, kw: dict, mode: str, a: argparse.Namespace) -> dict:
    base, ckpt, bf16w = mode.split()[0], mode.endswith("ckpt"), "bf16w" in mode
    # the trainer's weights: fp32 (bf16 autocast on a GPU), or bf16 with fp32 masters
    w = build(kind, kw, a.device, torch.bfloat16 if bf16w else torch.float32)
    vocab = w.config.get_text_config().vocab_size
    shape = model_shape(model=w)  # of the base, before any adapter
    g = torch.Generator().manual_seed(0)
    batches = [batch(vocab, a.batch, a.seq, 4, a.device, g) for _ in range(a.steps + a.warmup)]
    val = [batch(vocab, a.batch, a.seq, 1, a.device, g) for _ in range(a.steps + a.warmup)]
    cfg = BilevelConfig(alpha=100.0, lr_w=2e-6, lr_u=2e-6, total_steps=a.steps + a.warmup)
    fns = LMFns(chunked_head=ckpt)
    if ckpt:
        checkpoint_blocks(w)
    if mode == "plain":  # the project's plain fine-tuning step (uniform mixture of the 4 sources)
        opt = torch.optim.AdamW(w.parameters(), lr=cfg.lr_w)
        p = torch.full((4,), 0.25, device=a.device)

        def step(i: int) -> None:
            plain_step(w, opt, batches[i], fns, p, cfg, i)
    else:
        if mode == "lora shared":  # u and w: two adapters on one base (lora_base: shared)
            w, u = shared_views(add_shared_lora(w, LORA_RANK, 16.0))
        else:
            w = add_lora(w, LORA_RANK, 16.0) if base == "lora" else w
            u = clone_model(w)  # a deep copy keeps the recomputing blocks' class
        state = init_state(w, u, [f"s{i}" for i in range(4)], cfg)  # bf16: MasterOptimizer
        lisa = make_lisa_pair(w, u, n_active=2, interval=20, seed=0) if base == "lisa" else None

        def step(i: int) -> None:
            if lisa:
                for lz, opt in zip(lisa, (state.opt_w, state.opt_u)):
                    lz.apply(i, opt)
            scalebio_step(state, batches[i], val[i], fns)

    amp = a.device == "cuda" and not bf16w  # the trainer's precision: bf16 (autocast)
    with torch.autocast(a.device, dtype=torch.bfloat16, enabled=amp):
        for i in range(a.warmup):
            step(i)
        if a.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(a.warmup, a.warmup + a.steps):
            step(i)
        if a.device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / a.steps
    peak = torch.cuda.max_memory_allocated() / GIB if a.device == "cuda" else float("nan")
    setup = MemorySetup(
        gpus=1,
        sharding="ddp",
        mode="full" if mode == "plain" else base,
        lisa_active=2,
        lora_rank=LORA_RANK,
        lora_shared=mode == "lora shared",
        batch=a.batch,
        seq=a.seq,
        checkpointing=ckpt,
        param_dtype="bf16-weights" if bf16w else "bf16" if amp else "fp32",
    )
    pred = predict(shape, setup)
    if mode == "plain":  # one copy, no follower: halve the copy-proportional terms
        pred = {
            k: v / 2 if k in ("weights", "gradients", "optimizer") else v for k, v in pred.items()
        }
        pred["total"] = sum(v for k, v in pred.items() if k != "total")
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": name,
        "params": shape.params,
        "mode": mode,
        "s_per_step": seconds,
        "tokens_per_s": a.batch * a.seq / seconds,
        "peak_gib": peak,
        "predicted_gib": pred["total"] / GIB,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: checks the code path")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.tiny:
        a.seq, a.steps = min(a.seq, 64), min(a.steps, 3)
    rows = []
    for name, (kind, kw) in (TINY if a.tiny else SHAPES).items():
        for mode in MODES:
            rows.append(run(name, kind, kw, mode, a))
    lines = [
        "| model | params | mode | s/step | tokens/s | × plain | peak GiB | predicted GiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        plain = next(x for x in rows if x["model"] == r["model"] and x["mode"] == "plain")
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['mode']} | "
            f"{r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['s_per_step'] / plain['s_per_step']:.2f} | {r['peak_gib']:.2f} | "
            f"{r['predicted_gib']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if a.out:
        dev = torch.cuda.get_device_name() if a.device == "cuda" else platform.processor()
        write_section(
            Path(a.out),
            "GPU check",
            [
                *machine_lines(),
                f"- device: {dev}",
                f"- batch {a.batch} × {a.seq} tokens, {a.steps} timed steps after {a.warmup} "
                "warm-up",
                "",
                table,
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
