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
timed steps (on a CPU: not measured). The prediction is `scalebio_core.plan.memory.predict` for one
GPU, no sharding, with the mode's checkpointing, at the precision the trainer runs with
`precision: bf16` (fp32 weights, gradients and AdamW state, bf16 autocast; on a CPU: fp32 without
autocast) or `bf16-weights`. Prints a markdown table; `--out FILE` replaces its section of FILE
(e.g. benchmarks/RESULTS.md) with it, the command, date and device.

    python benchmarks/gpu_check.py --paper-scale    # the paper's models on one GPU, ~6 minutes
    python benchmarks/gpu_check.py --paper-scale --device cpu --tiny   # the same path, scaled down

`--paper-scale` measures the paper's largest models at their real shapes (`PAPER`: Yi-34B with
LoRA r=16 on one shared base, gradient checkpointing and bf16-weights, on a GPU the size of an
80 GB one; Llama-3-8B with LISA 2 blocks and bf16-weights, without and with checkpointing, on
one 141 GB H200; GPT-NeoX-20B when time is left) through the trainer's own set-up
(`build.setup` of the run config `memory` predicts, with the model `random:<name>`: the
architecture shipped in configs/models/ with random weights made directly on the GPU in the
run's precision, no weights read, no whole copy in host memory) and its own step
(`trainer.run_step`) on micro-batches of 1 × 1024 random tokens. Per configuration: the peak
over the timed steps (torch.cuda.max_memory_allocated and _reserved) beside the memory model's
prediction (`memory.plan`, what `python -m scalebio_core memory` prints) and its error, seconds
per step, training tokens/s, the set-up's time and its host-memory peak. A configuration that
runs out of GPU memory is a "does not fit" row, and the next one runs; `--budget S` skips the
configurations left once S seconds have passed. `--tiny` scales each architecture down (2
blocks, width 64) and runs the same code on a CPU.

    python benchmarks/gpu_check.py --packing        # packed against padded batches, ~2 minutes

`--packing` times a ScaleBiO step on packed and on right-padded batches (`benchmarks/packing.py`:
the Alpaca-like lengths, median 126 and 90th percentile 305, cut at 512; its random-init GPT-2
of 4 blocks and width 256, the model of the CPU table, here under bf16 autocast) at batches 4,
16 and 32, with sdpa and, where the flash-attn package is installed, `flash_attention_2`
(packed rows then run flash-attn's variable-length kernel). Real tokens per second and the
packed/padded ratio; `--out` writes the section "GPU check: packed batches".
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, machine_lines, peak_kib, reset_peak, write_section  # noqa: E402

from scalebio_core.core.baselines import plain_step  # noqa: E402
from scalebio_core.core.bilevel import BilevelConfig, init_state, scalebio_step  # noqa: E402
from scalebio_core.core.lisa import make_lisa_pair  # noqa: E402
from scalebio_core.plan.memory import GIB, MemorySetup, model_shape, predict  # noqa: E402
from scalebio_core.train.lora import add_lora, add_shared_lora, shared_views  # noqa: E402
from scalebio_core.train.losses import LMFns  # noqa: E402
from scalebio_core.train.models import clone_model  # noqa: E402
from scalebio_core.train.recompute import checkpoint_blocks  # noqa: E402

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


# ------------------------------------------------------------------ --paper-scale

PAPER = (
    (
        "01-ai/Yi-34B",
        80,
        "LoRA r=16, one shared base, ckpt",
        {"lora_rank": 16, "precision": "bf16-weights", "gradient_checkpointing": True},
    ),
    (
        "meta-llama/Meta-Llama-3-8B",
        141,
        "LISA 2 blocks",
        {"lisa_active": 2, "precision": "bf16-weights"},
    ),
    (
        "meta-llama/Meta-Llama-3-8B",
        141,
        "LISA 2 blocks, ckpt",
        {"lisa_active": 2, "precision": "bf16-weights", "gradient_checkpointing": True},
    ),
    (
        "EleutherAI/gpt-neox-20b",
        80,
        "LoRA r=16, one shared base, ckpt",
        {"lora_rank": 16, "precision": "bf16-weights", "gradient_checkpointing": True},
    ),
)
"""(model, GPU GiB the memory model is asked about, label, run-config fields): the one-GPU
configurations of docs/scaling.md, in the order they run."""
PAPER_SEQ = 1024


def tiny_architecture(name: str, folder: Path) -> str:
    """The shipped architecture of `name` scaled down (2 blocks, width 64, vocabulary 1024),
    written as a config.json in `folder`: its path, for `random:<path>`."""
    from scalebio_core.train.models import MODEL_CONFIGS

    d = json.loads((MODEL_CONFIGS / f"{name.replace('/', '__')}.json").read_text())
    kv = d.get("num_key_value_heads")
    if kv is not None:  # grouped-query attention stays grouped: 4 heads share 2 key/value heads
        d["num_key_value_heads"] = 2 if kv < d["num_attention_heads"] else 4
    d.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=1024)
    d["num_attention_heads"] = 4
    path = folder / f"{name.replace('/', '__')}-tiny" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d))
    return str(path)


def paper_case(name: str, gpu_gib: float, fields: dict, a: argparse.Namespace, tmp: Path) -> dict:
    """One configuration of `PAPER`: predicted by the memory model, then set up and stepped."""
    from scalebio_core.plan.memory import plan
    from scalebio_core.plan.scaleout import plan_config
    from scalebio_core.train.build import setup
    from scalebio_core.train.config import TrainConfig
    from scalebio_core.train.trainer import lm_fns, run_step

    arch = tiny_architecture(name, tmp) if a.tiny else name
    steps = a.warmup + a.steps
    seq = 64 if a.tiny else PAPER_SEQ
    # the batches are given (random tokens), so the sampler only has to accept batch 1
    planned = {"model": arch, "max_length": seq, "steps": steps, "sampler": "union", **fields}
    cfg = plan_config(None, planned, gpus=1)  # the run config `memory` predicts
    predicted = plan(cfg, 1, gpu_gib)
    row = {
        "predicted_gib": predicted.prediction["total"] / GIB,
        "fits_predicted": predicted.fits,
        "params": predicted.shape.params,
    }
    run = {**cfg.to_dict(), "model": f"random:{arch}", "tokenizer": "embedded"}
    run["out_dir"] = str(tmp / "run")
    cfg = TrainConfig.from_dict(run)
    cuda = a.device == "cuda"
    stage = "set-up"
    s = None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        reset = reset_peak()  # the set-up's peak resident set (else the process's so far)
        s = setup(cfg)
        row["setup_s"] = time.perf_counter() - t0
        row["host_gib"] = peak_kib(reset) * 1024 / GIB
        where = {p.device.type for p in s.state.w.parameters()}
        row["on"] = "/".join(sorted(where))
        g = torch.Generator().manual_seed(0)
        k, vocab = len(s.names), len(s.tokenizer)
        data = [tuple(batch(vocab, 1, seq, n, a.device, g) for n in (k, 1)) for _ in range(steps)]
        fns = lm_fns(s)
        stage = "warm-up"
        for i in range(a.warmup):
            run_step(s, i, fns, data[i])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        stage = "steps"
        t0 = time.perf_counter()
        for i in range(a.warmup, steps):
            m, *_ = run_step(s, i, fns, data[i])
        if cuda:
            torch.cuda.synchronize()
        row["s_per_step"] = (time.perf_counter() - t0) / a.steps
        row["tokens_per_s"] = seq / row["s_per_step"]
        row["finite"] = bool(torch.isfinite(torch.tensor(m["L1"])))
        if cuda:
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    except torch.OutOfMemoryError:
        row["oom"] = stage  # the exception (and its frames' tensors) is dropped here
    finally:
        del s
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def paper_table(rows: list[dict]) -> str:
    lines = [
        "| model | params | configuration | predicted GiB | peak GiB (reserved) | error | "
        "s/step | tokens/s | set-up s | host peak GiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n = r["params"]
        size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
        head = f"| {r['model']} | {size} | {r['label']} | "
        digits = 1 if r["predicted_gib"] >= 1 else 4  # the tiny shapes' few MiB
        pred = f"{r['predicted_gib']:.{digits}f}"
        if "skipped" in r:
            lines.append(head + f"{pred} | skipped: {r['skipped']} | | | | | |")
        elif "oom" in r:
            lines.append(
                head + f"{pred} | **does not fit** (out of memory in {r['oom']}) | | | | | |"
            )
        else:
            if "peak_gib" in r:
                peak = r["peak_gib"]
                err = f"{(r['predicted_gib'] - peak) / peak:+.0%}"
                measured = f"{peak:.{digits}f} ({r['reserved_gib']:.{digits}f})"
            else:
                err, measured = "", "not measured (CPU)"
            lines.append(
                head + f"{pred} | {measured} | {err} | {r['s_per_step']:.2f} | "
                f"{r['tokens_per_s']:.0f} | {r['setup_s']:.0f} | {r['host_gib']:.1f} |"
            )
    return "\n".join(lines)


def paper_scale(a: argparse.Namespace) -> int:
    # the embedded corpus's validation set shares records with its sources: no matter here
    warnings.filterwarnings("ignore", message="the validation set also holds")
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="paper-scale-") as tmp:
        for name, gpu_gib, label, fields in PAPER:
            row = {"model": name.split("/")[-1], "label": f"{label}, on 1 × {gpu_gib} GiB"}
            if time.perf_counter() - start > a.budget:
                row.update(skipped=f"time budget of {a.budget:.0f} s spent", params=0)
                row["predicted_gib"] = float("nan")
            else:
                row.update(paper_case(name, gpu_gib, fields, a, Path(tmp)))
                if row.get("finite") is False:
                    print(f"error: {name} {label}: the loss is not finite", file=sys.stderr)
                    return 1
            rows.append(row)
            print(paper_table(rows).splitlines()[-1], flush=True)
    table = paper_table(rows)
    print(table)
    if a.out:
        dev = torch.cuda.get_device_name() if a.device == "cuda" else cpu_name()
        write_section(
            Path(a.out),
            "Paper scale on one GPU",
            [
                *machine_lines(),
                f"- device: {dev}",
                f"- micro-batch 1 × {64 if a.tiny else PAPER_SEQ} random tokens, {a.steps} timed "
                f"steps after {a.warmup} warm-up; random weights of the real shapes "
                "(`random:<model>`), made by the trainer's set-up on the device",
                "- predicted: `python -m scalebio_core memory --model M --gpus 1 --gpu-mem G` "
                "with the configuration's flags; error = (predicted − peak allocated) / peak",
                "",
                table,
            ],
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: checks the code path")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="timed steps (10; paper scale 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (3; 2)")
    p.add_argument("--paper-scale", action="store_true", help="the paper's models, one GPU")
    p.add_argument("--budget", type=float, default=420, help="paper scale: seconds to spend")
    p.add_argument("--packing", action="store_true", help="packed against padded batches")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.packing:
        return packing_check(a)
    if a.paper_scale:
        a.steps = 3 if a.steps is None else a.steps
        a.warmup = 2 if a.warmup is None else a.warmup
        if a.tiny:
            a.steps = min(a.steps, 2)
        return paper_scale(a)
    a.steps = 10 if a.steps is None else a.steps
    a.warmup = 3 if a.warmup is None else a.warmup
    if a.tiny:
        a.seq, a.steps = min(a.seq, 64), min(a.steps, 3)
    rows = []
    for name, (kind, kw) in (TINY if a.tiny else SHAPES).items():
        for mode in MODES:
            rows.append(run(name, kind, kw, mode, a))
            r = rows[-1]  # as it comes: a run stopped early keeps what it measured
            print(
                f"{r['model']} {r['mode']}: {r['s_per_step']:.3f} s/step, peak "
                f"{r['peak_gib']:.2f} GiB, predicted {r['predicted_gib']:.2f} GiB",
                flush=True,
            )
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


def packing_check(a: argparse.Namespace) -> int:
    """`--packing`: packed against padded ScaleBiO steps (module docstring)."""
    import importlib.util

    import packing

    attns = ["sdpa"]
    if a.device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        attns.append("flash_attention_2")
    shape = packing.TINY_SHAPE if a.tiny else packing.SHAPE
    batches = (4,) if a.tiny else (4, 16, 32)
    steps, warmup = (2, 1) if a.tiny else (a.steps or 5, a.warmup or 2)
    lines = [
        "| attention | batch | padded tok/s | packed tok/s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for attn in attns:
        for b in batches:
            got = {
                layout: packing.row("alpaca", b, layout, steps, warmup, shape, a.device, attn)
                for layout in ("padded", "packed")
            }
            tok = {k: v["tokens"] / v["seconds"] for k, v in got.items()}
            lines.append(
                f"| {attn} | {b} | {tok['padded']:.0f} | {tok['packed']:.0f} | "
                f"{tok['packed'] / tok['padded']:.2f}× |"
            )
            print(lines[-1], flush=True)
    if a.out:
        dev = torch.cuda.get_device_name() if a.device == "cuda" else cpu_name()
        write_section(
            Path(a.out),
            "GPU check: packed batches",
            [*machine_lines(), f"- device: {dev}", "", *lines],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
