"""Command line: `python -m scalebio_core train --config FILE --preset quick key=value …`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PRECISIONS, TrainConfig, load_preset
from .errors import ConfigError, DataError, NonFiniteLossError, TrainingStopped
from .memory import PAPER_MODELS, SHARDINGS, MemorySetup, verdict
from .pipeline import resample_run, sft
from .trainer import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalebio_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run ScaleBiO and write a run directory")
    t.add_argument("--config", help="YAML config (a run's config.yaml, or a preset file)")
    t.add_argument("--preset", help="preset section of the config file: smoke, quick, paper")
    t.add_argument("--resume", action="store_true", help="continue the run in out_dir")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100")
    r = sub.add_parser("resample", help="draw N examples from a run's sources by its weights")
    r.add_argument("--run", required=True, help="run directory (config.yaml, weights.json)")
    r.add_argument("--n", type=int, required=True, help="examples to draw")
    r.add_argument("--weights", help="weights.json to use instead of the run's")
    r.add_argument("--add-validation", action="store_true", help="append the validation set")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", help="JSON Lines file (default: <run>/resampled.jsonl)")
    f = sub.add_parser("sft", help="fine-tune a fresh model on resampled data and evaluate it")
    f.add_argument("--config", help="YAML config of the sources, model and hyperparameters")
    f.add_argument("--preset", help="preset section of the config file")
    f.add_argument("--data", required=True, help="resampled JSON Lines file")
    f.add_argument("--out", required=True, help="output folder (config, trajectory, eval.json)")
    f.add_argument("--token-budget", type=int, help="train for this many tokens (sets steps)")
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr_w=1e-3 seed=1")
    m = sub.add_parser("memory", help="predict per-GPU memory of ScaleBiO training")
    m.add_argument(
        "--model",
        action="append",
        help="hub name, local folder or config.json "
        "(repeatable; default: the paper's four models, from configs/models/)",
    )
    m.add_argument("--gpus", type=int, default=8)
    m.add_argument("--gpu-mem", type=float, default=48.0, help="GiB per GPU")
    m.add_argument("--lisa", type=int, default=0, help="active LISA blocks (0: off)")
    m.add_argument("--lora", type=int, default=0, help="LoRA rank (0: off)")
    m.add_argument("--batch", type=int, default=1, help="micro-batch per GPU")
    m.add_argument("--seq", type=int, default=1024)
    m.add_argument("--sharding", choices=SHARDINGS, default="fsdp", help="zero1-3: DeepSpeed")
    m.add_argument("--offload", action="store_true", help="optimizer state on the CPU")
    m.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="bf16",
        help="bf16: the trainer's bf16 autocast over fp32 weights; bf16-weights: 16-bit weights "
        "with an fp32 master (not run by the trainer yet); fp32",
    )
    m.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    args = parser.parse_args(argv)

    if args.command == "memory":
        return _memory(args)
    if args.command in ("resample", "sft"):
        return _pipeline(args)
    try:
        cfg = TrainConfig.from_dict(load_preset(args.config, args.preset, args.overrides))
        weights = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, TrainingStopped, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(weights, indent=2))
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    try:
        if args.command == "resample":
            weights = json.loads(Path(args.weights).read_text()) if args.weights else None
            out = resample_run(
                args.run, args.n, args.out, args.seed, args.add_validation, weights=weights
            )
            counts: dict[str, int] = {}
            for line in out.read_text().splitlines():
                src = json.loads(line)["source"]
                counts[src] = counts.get(src, 0) + 1
            print(json.dumps({"out": str(out), "counts": dict(sorted(counts.items()))}, indent=2))
            return 0
        cfg = TrainConfig.from_dict(load_preset(args.config, args.preset, args.overrides))
        result = sft(cfg, args.data, args.out, args.token_budget, progress=not args.no_progress)
    except (
        ConfigError,
        DataError,
        NonFiniteLossError,
        TrainingStopped,
        OSError,
        json.JSONDecodeError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    return 0


def _memory(args: argparse.Namespace) -> int:
    if args.lisa and args.lora:
        print("error: choose LISA or LoRA, not both.", file=sys.stderr)
        return 2
    mode = "lisa" if args.lisa else "lora" if args.lora else "full"
    setup = MemorySetup(
        gpus=args.gpus,
        mode=mode,
        lisa_active=args.lisa or 2,
        lora_rank=args.lora or 128,
        batch=args.batch,
        seq=args.seq,
        sharding=args.sharding,
        offload=args.offload,
        checkpointing=args.checkpointing,
        param_dtype=args.precision,
    )
    try:
        for name in args.model or PAPER_MODELS:
            print(verdict(name, setup, args.gpu_mem))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
