"""Packed against padded batches: real tokens per second of a ScaleBiO step.

    .venv/bin/python benchmarks/packing.py --out benchmarks/RESULTS.md   # about 10 min, 2 cores
    .venv/bin/python benchmarks/packing.py --tiny                        # code path, seconds

A real token is a token of a record (prompt or response), neither padding nor the fill at a
packed row's end. One step is what the trainer runs per step: both batches laid out
(`sampling.collate`, right-padded to the longest record; or `sampling.pack`, records in rows of
the longest record's length, positions restarting per record), then `bilevel.scalebio_step`
(three forward-backward passes: u on the training batch, w on the validation batch, w on the
training batch, and two AdamW steps) with `losses.LMFns`.

Lengths (prompt + response, in tokens), two distributions:

* ``alpaca``: a log-normal with median 126 and 90th percentile 305 (σ = ln(305/126)/1.2816),
  cut to [16, 512]: the lengths of the Alpaca instruction data (9,000 records, embedded
  tokenizer: median 126, 90th percentile 305, mean 158) with the cut at 512 of a max_length of
  512. The script prints the median and 90th percentile of the lengths it drew.
* ``uniform``: every record 158 tokens (the control: nothing to pack, one record per row).

The response is the second half of a record. Tokens are random ids of a 2,048-token vocabulary.
Model: a random-init GPT-2 of 4 blocks, 256 hidden, 4 heads, 512 positions (3.8M parameters,
sdpa attention, fp32, dropout off), the same weights in every row; on the CPU glibc keeps freed
memory, as the trainer does by default (`cpu_malloc: keep`).

Timing: every row (a distribution, a batch size, a layout) runs in a fresh process: `--warmup`
untimed steps, then `--steps` timed steps on the same batches for both layouts (drawn from a
seeded generator per step). Rows run in pairs (padded, packed) with the order alternated, for
`--rounds` rounds; the table gives the median seconds per step, real tokens per second and the
packed/padded ratio of the medians, beside the real-token share of each layout (real tokens
over the tokens laid out, padding and fill included). Each process also returns its weights p
after its steps: the table gives the largest difference between the two layouts' p (float
rounding only).
Target: packed ≥ 1.8× padded real tokens per second at batch 16 on the alpaca lengths, and no
slower on the uniform control.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_lines, write_section  # noqa: E402

SECTION = "Packed batches"
MEDIAN, P90, LOW, HIGH = 126, 305, 16, 512
UNIFORM = 158
VOCAB = 2048
SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": HIGH}
TINY_SHAPE = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": HIGH}
SOURCES = 4
TARGET = 1.8
NOTE = (
    "The uniform control lays out the same batches either way (no two records share a row, so "
    "`pack` keeps the padded layout): its ratio is the run-to-run noise of this machine. On the "
    "varied lengths the ratio follows the real-token shares: packed rows hold fewer tokens that "
    "are not a record's."
)


def lengths(kind: str, n: int, gen: np.random.Generator) -> np.ndarray:
    """`n` record lengths of distribution `kind` (module docstring)."""
    if kind == "uniform":
        return np.full(n, UNIFORM)
    sigma = math.log(P90 / MEDIAN) / 1.2816
    return np.clip(np.round(gen.lognormal(math.log(MEDIAN), sigma, n)), LOW, HIGH).astype(int)


def make_data(kind: str, batch: int, steps: int, seed: int):
    """The records of `steps` training and validation batches: batch i uses records
    [i·batch, (i+1)·batch) of each."""
    from scalebio_core.sources.data import TokenizedData
    from scalebio_core.sources.sampling import IGNORE

    gen = np.random.default_rng(seed)
    out = []
    for part in range(2):
        lens = lengths(kind, batch * steps, gen)
        ids = [torch.as_tensor(gen.integers(1, VOCAB, n)) for n in lens]
        labels = []
        for x in ids:
            y = x.clone()
            y[: len(x) // 2] = IGNORE
            labels.append(y)
        sources = torch.as_tensor(np.arange(len(ids)) % (SOURCES if part == 0 else 1))
        names = tuple(f"s{k}" for k in range(SOURCES)) if part == 0 else ("val",)
        out.append(TokenizedData(names, ids, labels, sources))
    return out


def row(
    kind: str,
    batch: int,
    layout: str,
    steps: int,
    warmup: int,
    shape: dict,
    device: str = "cpu",
    attn: str = "sdpa",
) -> dict:
    """One row, in this process: seconds per step and real tokens per step. On a GPU the step
    runs under bf16 autocast (the trainer's `precision: bf16`), with `attn` attention
    (`flash_attention_2`: flash-attn's variable-length kernel for packed rows)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from scalebio_core.core.bilevel import BilevelConfig, MicroBatches, init_state, scalebio_step
    from scalebio_core.sources.sampling import collate, pack, real_tokens
    from scalebio_core.train.losses import LMFns
    from scalebio_core.train.malloc import keep_freed_memory

    if device == "cpu":
        keep_freed_memory()  # the trainer's CPU default (cpu_malloc: keep)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape)
    config._attn_implementation = attn
    w = GPT2LMHeadModel(config).to(device)
    u = GPT2LMHeadModel(config).to(device)
    u.load_state_dict(w.state_dict())
    gpu = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    cfg = BilevelConfig(lr_w=1e-4, lr_u=1e-4, lr_lam=0.05, total_steps=warmup + steps)
    state = init_state(w, u, [f"s{k}" for k in range(SOURCES)], cfg)
    train, val = make_data(kind, batch, warmup + steps, seed=1)
    lay_out = pack if layout == "packed" else collate
    fns = LMFns()
    seconds, tokens, laid = [], [], []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        idx = list(range(i * batch, (i + 1) * batch))
        b, v = ({k: x.to(device) for k, x in lay_out(d, idx, 0).items()} for d in (train, val))
        with autocast:
            scalebio_step(state, MicroBatches([b]), MicroBatches([v]), fns)
        sync()
        if i >= warmup:
            seconds.append(time.perf_counter() - t0)
            tokens.append(int(real_tokens(b)) + int(real_tokens(v)))
            laid.append(b["input_ids"].numel() + v["input_ids"].numel())
    p = torch.softmax(state.lam.detach(), 0).tolist()
    return {
        "seconds": float(np.median(seconds)),
        "tokens": float(np.mean(tokens)),
        "laid": float(np.mean(laid)),
        "p": p,
    }


def run_row(args: list[str]) -> dict:
    """`row` in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"row {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def length_lines() -> list[str]:
    x = lengths("alpaca", 100_000, np.random.default_rng(0))
    med, p90, p99 = np.percentile(x, [50, 90, 99])
    shares = []
    for b in (4, 16, 32):
        draws = x[: (len(x) // b) * b].reshape(-1, b)
        shares.append(f"{draws.sum() / (draws.max(1).sum() * b):.2f} at batch {b}")
    return [
        f"- alpaca lengths (100,000 draws): median {med:.0f}, 90th percentile {p90:.0f}, 99th "
        f"{p99:.0f}, mean {x.mean():.0f}; real-token share of a right-padded batch: "
        + ", ".join(shares)
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a tiny model, batch 4: the code path")
    ap.add_argument("--out", type=Path, help="write/replace the section in this markdown file")
    ap.add_argument("--row", nargs=4, metavar=("KIND", "BATCH", "LAYOUT", "TINY"))
    a = ap.parse_args(argv)
    if a.row:
        kind, batch, layout, tiny = a.row
        shape = TINY_SHAPE if tiny == "1" else SHAPE
        print(json.dumps(row(kind, int(batch), layout, a.steps, a.warmup, shape)))
        return 0
    batches = [4] if a.tiny else a.batches
    table = [
        "| lengths | batch | real share padded / packed | padded s/step | packed s/step | "
        "padded tok/s | packed tok/s | ratio | max abs Δp |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = {}
    for kind in ("alpaca", "uniform"):
        for b in batches:
            got: dict[str, list[dict]] = {"padded": [], "packed": []}
            for r in range(a.rounds):
                order = ("padded", "packed") if r % 2 == 0 else ("packed", "padded")
                for layout in order:
                    args = [kind, str(b), layout, "1" if a.tiny else "0"]
                    args += ["--steps", str(a.steps), "--warmup", str(a.warmup)]
                    got[layout].append(run_row(args))
            sec = {k: float(np.median([g["seconds"] for g in v])) for k, v in got.items()}
            tok = got["padded"][0]["tokens"]
            assert all(g["tokens"] == tok for v in got.values() for g in v)
            dp = max(
                abs(x - y)
                for g, h in zip(got["padded"], got["packed"])
                for x, y in zip(g["p"], h["p"])
            )
            ratio = sec["padded"] / sec["packed"]
            ratios[(kind, b)] = ratio
            share = {k: tok / v[0]["laid"] for k, v in got.items()}
            table.append(
                f"| {kind} | {b} | {share['padded']:.2f} / {share['packed']:.2f} | "
                f"{sec['padded']:.3f} | {sec['packed']:.3f} | "
                f"{tok / sec['padded']:.0f} | {tok / sec['packed']:.0f} | {ratio:.2f}× | "
                f"{dp:.1e} |"
            )
            print(table[-1], flush=True)
    lines = [*machine_lines(), *length_lines(), ""]
    lines += [
        f"Model: random-init GPT-2, {SHAPE['n_layer']} blocks, {SHAPE['n_embd']} hidden, "
        f"{SHAPE['n_head']} heads, {HIGH} positions, sdpa, fp32"
        + (" (--tiny: 2 blocks, 32 hidden)" if a.tiny else "")
        + f"; {a.steps} timed steps after {a.warmup} untimed per process, {a.rounds} rounds; "
        "real tokens of the training and validation batches per second of a ScaleBiO step.",
        "",
        *table,
    ]
    lines += ["", NOTE]
    if ("alpaca", 16) in ratios:
        met = ratios[("alpaca", 16)] >= TARGET
        lines += ["", f"Target ≥ {TARGET}× at batch 16 (alpaca): {'met' if met else 'NOT met'}."]
    if ("alpaca", 16) in ratios:
        print(lines[-1])
    if a.out:
        write_section(a.out, SECTION, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
