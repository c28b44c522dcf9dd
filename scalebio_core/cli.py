"""Command line: `python -m scalebio_core train --config FILE --preset quick key=value …`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import runs
from .config import (
    ATTENTION,
    LORA_BASES,
    PRECISIONS,
    TrainConfig,
    load_preset,
    parse_overrides,
)
from .errors import ConfigError, DataError, NonFiniteLossError, TrainingStopped
from .memory import PAPER_MODELS, PLAN_FIELDS, Plan, plan
from .pipeline import resample_run, sft
from .scaleout import cheapest, emit, plan_command, plan_config
from .trainer import train


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: train, resample, sft, memory."""
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
    r.add_argument("--n", type=_positive(int), required=True, help="examples to draw")
    r.add_argument("--weights", help="weights.json to use instead of the run's")
    r.add_argument("--add-validation", action="store_true", help="append the validation set")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", help="JSON Lines file (default: <run>/resampled.jsonl)")
    f = sub.add_parser("sft", help="fine-tune a fresh model on resampled data and evaluate it")
    f.add_argument("--config", help="YAML config of the sources, model and hyperparameters")
    f.add_argument("--preset", help="preset section of the config file")
    f.add_argument("--data", required=True, help="resampled JSON Lines file")
    f.add_argument("--out", required=True, help="output folder (config, trajectory, eval.json)")
    f.add_argument(
        "--token-budget", type=_positive(int), help="train for this many tokens (sets steps)"
    )
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr_w=1e-3 seed=1")
    m = sub.add_parser(
        "memory",
        help="predict per-GPU memory of a run config; --emit writes what launches it",
        description="Options named as run-config fields (--lisa-active is lisa_active); "
        "--config/--preset give a base config, key=value sets any other field.",
    )
    m.add_argument("--config", help="base run config (YAML, or a preset file with --preset)")
    m.add_argument("--preset", help="preset section of the config file")
    m.add_argument(
        "--model",
        action="append",
        help="hub name, local folder or config.json (repeatable; default: the config's, else "
        "the paper's four models, from configs/models/)",
    )
    m.add_argument("--gpus", type=int, default=8, help="GPUs (processes) of the launch")
    m.add_argument("--gpu-mem", type=float, default=48.0, help="GiB per GPU")
    m.add_argument("--emit", help="write config.yaml, accelerate.yaml and launch.sh here")
    m.add_argument(
        "--search",
        action="store_true",
        help="the cheapest configuration the trainer runs that fits: searches sharding, offload "
        "and, unless given, precision and gradient checkpointing",
    )
    for name in PLAN_FIELDS[1:]:
        _field_option(m, name)
    m.add_argument("overrides", nargs="*", help="key=value for any other run-config field")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "memory":
        return _memory(args)
    if args.command in ("resample", "sft"):
        return _pipeline(args)
    try:
        cfg = TrainConfig.from_dict(_train_config(args))
        weights = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, TrainingStopped, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(weights, indent=2))
    return 0


def _train_config(args: argparse.Namespace) -> dict:
    """The run config of `train`. Resuming from a run's config.yaml resumes the folder it was
    read from (a copied run folder names the original one inside), unless out_dir=… is given."""
    overrides = parse_overrides(args.overrides)
    d = load_preset(args.config, args.preset, overrides)
    path = Path(args.config) if args.config else None
    if args.resume and path is not None and path.is_file() and "out_dir" not in overrides:
        folder = path.parent
        if runs.is_run_dir(folder) and Path(d.get("out_dir", "")).resolve() != folder.resolve():
            print(
                f"resuming {folder}, the folder {path.name} was read from (it names "
                f"{d.get('out_dir')}; pass out_dir=… to resume another)",
                file=sys.stderr,
            )
            d["out_dir"] = str(folder)
    return d


def _read_weights(path: str | None) -> dict | None:
    """A weights.json given to resample, or None; its errors name the file."""
    if path is None:
        return None
    try:
        weights = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); a weights.json "
            "is written by a run; give a complete one, or leave out --weights."
        ) from e
    if not isinstance(weights, dict) or not all(
        isinstance(v, int | float) for v in weights.values()
    ):
        raise DataError(f"{path}: a weights.json maps each source name to its weight.")
    return weights


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` above 0."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _pipeline(args: argparse.Namespace) -> int:
    try:
        if args.command == "resample":
            weights = _read_weights(args.weights)
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


def _field_option(parser: argparse.ArgumentParser, name: str) -> None:
    """`--name-with-dashes` for run-config field `name`, typed as the field (default: unset)."""
    default = getattr(TrainConfig(), name)
    flag = "--" + name.replace("_", "-")
    if isinstance(default, bool):
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction)
        return
    choices = {
        "precision": tuple(PRECISIONS),
        "attn_implementation": ATTENTION,
        "lora_base": LORA_BASES,
    }.get(name)
    kind = int if name == "max_length" else type(default)  # its default is 'auto'
    parser.add_argument(flag, dest=name, type=kind, choices=choices)


def _memory_fields(args: argparse.Namespace, model: str | None) -> dict:
    flags = {k: getattr(args, k) for k in PLAN_FIELDS[1:] if getattr(args, k) is not None}
    if model:
        flags["model"] = model
    return {**flags, **parse_overrides(args.overrides)}


def memory_config(args: argparse.Namespace, model: str | None) -> TrainConfig:
    """The run config the memory command predicts: base (--config/--preset), its flags,
    key=value (`scaleout.plan_config`)."""
    base = load_preset(args.config, args.preset) if args.config else None
    return plan_config(base, _memory_fields(args, model), args.gpus)


def _search(args: argparse.Namespace, model: str) -> Plan | None:
    base = load_preset(args.config, args.preset) if args.config else None
    found, fits, accepted = cheapest(base, _memory_fields(args, model), args.gpus, args.gpu_mem)
    print(
        f"{model}: {fits} of the {accepted} configurations the trainer accepts fit on "
        f"{args.gpus} × {args.gpu_mem:g} GiB; the cheapest"
        + (":" if found else ": none (fewer blocks, LoRA, more or larger GPUs)")
    )
    return found


def _memory(args: argparse.Namespace) -> int:
    try:
        if args.gpus < 1 or not args.gpu_mem > 0:
            raise ConfigError(
                f"--gpus must be >= 1 and --gpu-mem > 0 GiB (got {args.gpus}, {args.gpu_mem})."
            )
        base_model = load_preset(args.config, args.preset).get("model") if args.config else None
        models = args.model or ([base_model] if base_model else list(PAPER_MODELS))
        if args.emit and len(models) != 1:
            raise ConfigError("--emit writes one run: pass exactly one --model.")
        for name in models:
            p = (
                _search(args, name)
                if args.search
                else plan(memory_config(args, name), args.gpus, args.gpu_mem)
            )
            if p is None:
                continue
            print(p.text())
            if args.emit:
                files = emit(p, args.emit)
                print("\n".join(f"  wrote {f}" for f in files.values()))
                print(f"  launch: {plan_command(p, args.emit)}")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
