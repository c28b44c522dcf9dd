"""DDP's gradient all-reduce (issue 31): one call per gradient tensor, as the DDP engine did,
against `engines.all_reduce_grads` (what it does now: the small gradients in flat buckets, the
large ones in place, one call each), on 2 gloo processes.

    .venv/bin/python benchmarks/allreduce.py --out benchmarks/RESULTS.md   # both models, ~1 min
    .venv/bin/python benchmarks/allreduce.py --tiny                        # the small one, seconds

Gradients: the parameter shapes of a GPT-2 of the embedded `tiny` size (28 tensors, 0.2M
parameters) and of GPT-2 small (148 tensors, 124M parameters), fp32, filled with random numbers
that differ by rank. Each
round reduces the same gradients both ways, in an order that alternates by round, after
`--warmup` untimed rounds; every rank times its calls and the table takes rank 0's medians and
IQR, and the ratio of the medians. Both ways must give the same sums to the bit (checked every
round). Both processes run on this machine, so the all-reduce moves memory, not network traffic:
on GPUs over NCCL the per-call latency the buckets save is larger.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_lines, write_section  # noqa: E402

from scalebio_core.core.distributed import free_port  # noqa: E402
from scalebio_core.parallel.engines import (  # noqa: E402
    BUCKET_BYTES,
    LARGE_BYTES,
    all_reduce_grads,
)


def shapes(tiny: bool) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2 (small, or the embedded tiny model's size)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if tiny:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=2048, n_positions=128)
    else:
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    return [tuple(p.shape) for p in model.parameters()]


class _Param:
    def __init__(self, grad: torch.Tensor):
        self.grad = grad


def per_tensor(params: list[_Param]) -> int:
    for p in params:
        dist.all_reduce(p.grad)
    return len(params)


def _worker(rank: int, port: int, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(rank)
        base = [torch.randn(s, generator=g) for s in shapes(args.tiny)]
        times: dict[str, list[float]] = {"per tensor": [], "buckets": []}
        calls = {}
        for r in range(args.warmup + args.rounds):
            sums = {}
            order = ["per tensor", "buckets"] if r % 2 == 0 else ["buckets", "per tensor"]
            for way in order:
                params = [_Param(t.clone()) for t in base]
                dist.barrier()
                start = time.perf_counter()
                fn = per_tensor if way == "per tensor" else all_reduce_grads
                calls[way] = fn(params)
                took = time.perf_counter() - start
                sums[way] = params
                if r >= args.warmup:
                    times[way].append(took)
            same = all(
                torch.equal(a.grad, b.grad)
                for a, b in zip(sums["per tensor"], sums["buckets"], strict=True)
            )
            if not same:
                raise AssertionError("the buckets' sums differ from the per-tensor sums")
        if rank == 0:
            queue.put({"times": times, "calls": calls, "numel": sum(t.numel() for t in base)})
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the embedded tiny model's shapes")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the section into this RESULTS.md")
    args = ap.parse_args()
    if args.tiny:
        args.rounds, args.warmup = min(args.rounds, 5), 1
    ctx = mp.get_context("spawn")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    def iqr(v: list[float]) -> str:
        q = statistics.quantiles(v, n=4)
        return f"{q[0] * 1e3:.1f}–{q[2] * 1e3:.1f}"

    rows = []
    for tiny in (True,) if args.tiny else (True, False):
        queue = ctx.Queue()
        run = argparse.Namespace(**{**vars(args), "tiny": tiny})
        mp.start_processes(_worker, args=(free_port(), run, queue), nprocs=2, start_method="spawn")
        res = queue.get(timeout=60)
        med = {k: statistics.median(v) for k, v in res["times"].items()}
        model = f"{'embedded tiny' if tiny else 'GPT-2 small'} ({res['numel'] / 1e6:.1f}M)"
        for way in ("per tensor", "buckets"):
            rows.append(
                f"| {model} | {way} | {res['calls'][way]} | {med[way] * 1e3:.1f} | "
                f"{iqr(res['times'][way])} | {med[way] / med['per tensor']:.2f} |"
            )
    lines = [
        *machine_lines(),
        f"- gradients: the parameter shapes of each model, fp32; 2 gloo processes on this "
        f"machine; {args.rounds} rounds after {args.warmup} untimed; gradients under "
        f"{LARGE_BYTES >> 20} MiB in buckets of {BUCKET_BYTES >> 20} MiB, larger ones in place; "
        "the two ways' sums equal to the bit in every round",
        "",
        "| gradients of | all-reduce | calls | median ms | IQR ms | ratio to per tensor |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(lines))
    if args.out:
        write_section(args.out, "DDP gradient all-reduce: per tensor against buckets", lines)


if __name__ == "__main__":
    main()
