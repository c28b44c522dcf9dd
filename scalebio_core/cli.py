"""Command line: `python -m scalebio_core train --config FILE --preset quick key=value …`."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .core.distributed import end_processes, terminate_raises
from .errors import ConfigError, DataError, Interrupted, NonFiniteLossError, TrainingStopped
from .files import DiskFullError
from .lab.rehearsal import rehearse_plan
from .plan.memory import HEADROOM, PAPER_MODELS, PLAN_FIELDS, check_machine
from .plan.scaleout import (
    GPU_GIB,
    GPUS,
    Planned,
    absolute_paths,
    data_summary,
    emit,
    plan_command,
    plan_config,
    plan_run,
)
from .train import runs
from .train.config import (
    ATTENTION,
    LORA_BASES,
    PRECISIONS,
    TrainConfig,
    load_preset,
    parse_overrides,
)
from .train.pipeline import read_weights, resample_run, sft
from .train.trainer import train

COMMON_KEYS = {
    "data_dir": "your data: a folder of one .jsonl/.json/.txt file per source, validation.jsonl "
    "and test.jsonl",
    "out_dir": "the run folder to write (config.yaml, weights.json, verdict.json, …)",
    "steps": "training steps",
    "model": "embedded:tiny (random init, offline: it tells sources apart by form, not by "
    "correctness), a hub name (gpt2) or a model folder",
    "exact_match": "accuracy of the test answers: on, off, auto (on where they are short)",
    "grader": "how an answer is checked: exact, or math-verify (\\boxed{}, LaTeX)",
    "seed": "seed of the model initialisation and the batches",
}
"""The keys `train --help` lists, with their meaning (docs/config.md lists every key)."""
SFT_KEYS = {
    "data_dir": "the run's data folder: its validation and test sets score the model (or give "
    "--config RUN/config.yaml)",
    "model": COMMON_KEYS["model"],
    "steps": "fine-tuning steps (--token-budget sets them from a token count instead)",
    "lr_w": "learning rate of the fine-tuning (default: by the model, 2e-3 for an embedded one, "
    "1e-5 for a pretrained one)",
    "exact_match": COMMON_KEYS["exact_match"],
    "grader": COMMON_KEYS["grader"],
    "seed": "seed of the model initialisation and the batches",
}


def keys_help(keys: dict[str, str]) -> str:
    """The epilog of a command's --help: each key, its default and meaning; where all are."""
    default = TrainConfig().to_dict()  # the flat keys: a key that is none fails here
    width = max(map(len, keys)) + 4
    lines = ["common keys (key=value; values are YAML: steps=400, exact_match=on):"]
    for key, meaning in keys.items():
        value = default[key]
        if value is not None and "default:" not in meaning:
            meaning += f" (default: {value})"
        lines += textwrap.wrap(
            meaning, 96, initial_indent=f"  {key:<{width - 2}}", subsequent_indent=" " * width
        )
    lines += textwrap.wrap(
        "every key, with its default and meaning: docs/config.md (the fields of TrainConfig, "
        "scalebio_core/train/config.py); the commands and their options: docs/cli.md",
        96,
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: train, resample, sft, memory."""
    parser = argparse.ArgumentParser(prog="python -m scalebio_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Intermixed)
    t = sub.add_parser(
        "train",
        help="run ScaleBiO and write a run directory",
        description="Learn data weights (ScaleBiO, or a baseline: method=…) into out_dir.",
        epilog=keys_help(COMMON_KEYS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--config", help="YAML config (a run's config.yaml, or a preset file)")
    t.add_argument("--preset", help="preset section of the config file: smoke, quick, paper")
    t.add_argument("--resume", action="store_true", help="continue the run in out_dir")
    t.add_argument(
        "--accept-changed-data",
        action="store_true",
        help="with --resume: go on although data files changed since the checkpoint (else "
        "refused, naming them); the change is recorded in changes.jsonl",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100")
    r = sub.add_parser("resample", help="draw N examples from a run's sources by its weights")
    r.add_argument("--run", required=True, help="run directory (config.yaml, weights.json)")
    r.add_argument("--n", type=_positive(int), required=True, help="examples to draw")
    r.add_argument("--weights", help="weights.json to use instead of the run's")
    r.add_argument("--add-validation", action="store_true", help="append the validation set")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--out",
        help="JSON Lines file (default: <run>/resampled.jsonl). An existing file is never "
        "replaced, unless --overwrite is given and it is an earlier output of resample (every "
        "line a record of exactly prompt, response and source)",
    )
    r.add_argument(
        "--overwrite", action="store_true", help="replace resample's own earlier --out file"
    )
    f = sub.add_parser(
        "sft",
        help="fine-tune a fresh model on resampled data and evaluate it",
        description="Fine-tune a fresh model on a resampled file, then score it on the held-out "
        "test set (eval.json).",
        epilog=keys_help(SFT_KEYS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("--config", help="YAML config of the sources, model and hyperparameters")
    f.add_argument("--preset", help="preset section of the config file")
    f.add_argument("--data", required=True, help="resampled JSON Lines file")
    f.add_argument(
        "--out",
        required=True,
        help="output folder (config.yaml, trajectory.jsonl, timing.jsonl, data/validation.jsonl, "
        "eval.json): new or empty (the --data file may lie in it), or, with --overwrite, an "
        "earlier output of sft; a folder of other files is refused",
    )
    f.add_argument(
        "--overwrite",
        action="store_true",
        help="replace sft's own earlier output in --out (its other files are kept)",
    )
    f.add_argument(
        "--token-budget", type=_positive(int), help="train for this many tokens (sets steps)"
    )
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr_w=1e-3 seed=1")
    _memory_parser(sub)
    return parser


def _memory_parser(sub: Any) -> None:
    """The `memory` subcommand's options: the machine, what it writes or rehearses, and the
    run-config fields the memory model reads (`memory.PLAN_FIELDS`)."""
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
    m.add_argument("--gpus", type=int, default=GPUS, help="GPUs (processes) of the launch")
    m.add_argument("--gpu-mem", type=float, default=GPU_GIB, help="GiB per GPU")
    m.add_argument(
        "--host-mem",
        type=float,
        help="GiB of host (CPU) memory per node; default: not limited (the verdict says so). "
        "Building the copies and CPU offload need host memory: give it to have it checked",
    )
    m.add_argument(
        "--headroom",
        type=float,
        default=HEADROOM,
        help=f"share of each GPU's and each node's memory kept free (default {HEADROOM:g}): "
        "what the model does not count (CUDA context, allocator slack, other processes)",
    )
    m.add_argument(
        "--emit",
        metavar="DIR",
        help="write config.yaml (absolute paths), accelerate.yaml and launch.sh (this "
        "environment's python; runs from any directory) into this folder",
    )
    m.add_argument(
        "--demo-data",
        action="store_true",
        help="with --emit: allow a plan without data (no --config, data_dir or sources), which "
        "trains on the embedded demo corpus",
    )
    m.add_argument(
        "--overwrite",
        action="store_true",
        help="with --emit: replace files in the folder that differ from the plan's",
    )
    m.add_argument(
        "--rehearse",
        metavar="DIR",
        help="run the plan emitted in DIR at smoke size on this CPU: a tiny random model of "
        "the same architecture, 2 gloo processes (1 for a one-GPU plan), stand-ins for hub "
        "data; key=value overrides the rehearsal's run config (steps=6, out_dir=…)",
    )
    m.add_argument(
        "--search",
        action="store_true",
        help="the cheapest configuration the trainer runs that fits within the headroom (GPU, "
        "and host with --host-mem): searches sharding, offload and, unless given, precision "
        "and gradient checkpointing",
    )
    for name in PLAN_FIELDS[1:]:
        _field_option(m, name)
    m.add_argument("overrides", nargs="*", help="key=value for any other run-config field")


def main(argv: list[str] | None = None) -> int:
    """The command line; its status: 0, 2 for an error (its message says the fix), 128 + N for
    signal N (SIGINT: 130, SIGTERM: 143). On every path the process group (of a launched rank)
    ends before the interpreter does."""
    try:
        with terminate_raises():  # SIGTERM: a message and status 143, not silence
            return _command(argv)
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: stopped by SIGINT (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        end_processes()


def _command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "memory":
        return _memory(args)
    if args.command in ("resample", "sft"):
        return _pipeline(args)
    try:
        cfg = TrainConfig.from_dict(_train_config(args))
        weights = train(
            cfg,
            resume=args.resume,
            progress=not args.no_progress,
            accept_data_change=args.accept_changed_data,
        )
    except Interrupted:
        raise
    except (ConfigError, TrainingStopped, ValueError, DiskFullError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # a launch's ranks hold the same weights
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
    return read_weights(
        path, "a weights.json is written by a run; give a complete one, or leave out --weights."
    )


class _Intermixed(argparse.ArgumentParser):
    """A subcommand's parser whose key=value overrides may stand before, between and after its
    options (`train steps=3 --resume out_dir=X`): argparse's intermixed parsing."""

    _inner = False  # parse_known_intermixed_args calls parse_known_args twice itself

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        if self._inner:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


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
                args.run,
                args.n,
                args.out,
                args.seed,
                args.add_validation,
                weights=weights,
                overwrite=args.overwrite,
            )
            counts: dict[str, int] = {}
            for line in out.read_text().splitlines():
                src = json.loads(line)["source"]
                counts[src] = counts.get(src, 0) + 1
            print(json.dumps({"out": str(out), "counts": dict(sorted(counts.items()))}, indent=2))
            return 0
        cfg = TrainConfig.from_dict(load_preset(args.config, args.preset, args.overrides))
        result = sft(
            cfg,
            args.data,
            args.out,
            args.token_budget,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
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
    kind = int if name in ("max_length", "micro_tokens") else type(default)  # 'auto', None
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


def _search(args: argparse.Namespace, model: str) -> Planned:
    """The answer of `memory` for one model: `scaleout.plan_run`, which the planner widget
    calls too (a search with --search, else the prediction of the run config)."""
    base = load_preset(args.config, args.preset) if args.config else None
    fields = _memory_fields(args, model)
    return plan_run(
        model, args.gpus, args.gpu_mem, base, fields, args.search, args.host_mem, args.headroom
    )


def _rehearse(args: argparse.Namespace) -> int:
    """`memory --rehearse DIR`: the plan emitted in DIR at smoke size on this CPU."""
    given = {"--emit": args.emit, "--search": args.search, "--model": args.model}
    given["--config"] = args.config
    used = [flag for flag, value in given.items() if value]
    if used:
        raise ConfigError(
            f"--rehearse DIR runs the plan already emitted in DIR: leave out {', '.join(used)} "
            "(emit first with memory … --emit DIR; key=value here overrides the rehearsal's run "
            "config, e.g. steps=6 out_dir=/tmp/rehearsal)."
        )
    rehearse_plan(args.rehearse, parse_overrides(args.overrides))
    return 0


def _memory(args: argparse.Namespace) -> int:
    try:
        if args.rehearse:
            return _rehearse(args)
        check_machine(args.gpus, args.gpu_mem, args.host_mem, args.headroom)
        base_model = load_preset(args.config, args.preset).get("model") if args.config else None
        models = args.model or ([base_model] if base_model else list(PAPER_MODELS))
        if args.emit and len(models) != 1:
            raise ConfigError("--emit writes one run: pass exactly one --model.")
        for name in models:
            planned = _search(args, name)
            print(planned.text())
            p = planned.plan
            if p is None or not args.emit:
                continue
            # a config names its data, even the embedded corpus (its smoke presets)
            named = args.config is not None or "corpus" in parse_overrides(args.overrides)
            files = emit(p, args.emit, args.demo_data or named, args.overwrite)
            print("\n".join(f"  wrote {f}" for f in files.values()))
            data = data_summary(TrainConfig.from_dict(absolute_paths(p.cfg.to_dict())))
            print(f"  data: trains on {data}")
            if not p.fits:
                print("  note: this plan does NOT fit (verdict above); written as asked")
            print(f"  launch: {plan_command(p, args.emit)}")
            folder = str(files["launch"].parent)
            rehearse = shlex.join([sys.executable, "-m", "scalebio_core", "memory"])
            print(f"  rehearse on this CPU first: {rehearse} --rehearse {shlex.quote(folder)}")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
