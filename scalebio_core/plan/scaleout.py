"""Launch configs for accelerate: DDP, FSDP (decoder block class resolved generically), ZeRO-3.

    python -m scalebio_core.plan.scaleout fsdp --model meta-llama/Meta-Llama-3-8B --gpus 8

prints an accelerate config whose `fsdp_transformer_layer_cls_to_wrap` is the class of the
model's decoder blocks, found by `blocks.find_blocks` on the model built from its config on the meta
device (no download of weights, any architecture). The FSDP config is FSDP version 2 (torch's
fully_shard, per-parameter sharding): LISA mixes frozen and trainable parameters inside one FSDP
unit, which FSDP1's flat parameters cannot hold. The trainer shards u and w itself
(`sharding.py`). Under the DeepSpeed config u and w become two DeepSpeed engines (`zero.py`;
ZeRO-1/2/3, LoRA but not LISA).

`plan_run` is the one planner behind `python -m scalebio_core memory` and notebook 06's widget;
`emit` writes what runs a plan (its paths absolute, this environment's Python), and
`rehearsal.rehearse_plan` runs the written plan at smoke size on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM

from ..core.blocks import find_blocks
from ..errors import ConfigError
from ..train.config import CONFIG_DIR, TrainConfig, merge
from ..train.models import RANDOM_PREFIX
from .memory import (
    HEADROOM,
    PLAN_FIELDS,
    ModelShape,
    Plan,
    check_machine,
    load_config,
    model_shape,
    plan,
)

KINDS = ("ddp", "fsdp", "deepspeed_zero3")
GPUS = 8
GPU_GIB = 48.0
"""The planner's default machine (the CLI's and the widget's): eight 48 GiB GPUs (the paper's
A40s). Host memory per node: not limited unless given; `memory.HEADROOM` of each kept free."""


def block_class(name_or_path: str) -> str:
    """Class name of the decoder blocks of a model (built from its config on the meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(name_or_path))
    _, blocks = find_blocks(model)
    return type(blocks[0]).__name__


def accelerate_config(
    kind: str,
    model: str | None = None,
    gpus: int = 8,
    offload: bool = True,
    zero_stage: int = 3,
    mixed_precision: str = "bf16",
) -> dict:
    """The shipped config of `kind`, with the process count, offload, wrap class, ZeRO stage and
    accelerate's mixed precision filled in."""
    if kind not in KINDS:
        raise ConfigError(f"unknown launch kind {kind!r}; known: {KINDS}.")
    cfg = yaml.safe_load((CONFIG_DIR / "accelerate" / f"{kind}.yaml").read_text())
    cfg["num_processes"] = gpus
    cfg["mixed_precision"] = mixed_precision
    if kind == "fsdp":
        cfg["fsdp_config"]["fsdp_offload_params"] = offload
        if model is not None:
            cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = block_class(model)
    if kind == "deepspeed_zero3":
        device = "cpu" if offload else "none"
        cfg["deepspeed_config"]["offload_optimizer_device"] = device
        cfg["deepspeed_config"]["offload_param_device"] = device if zero_stage == 3 else "none"
        cfg["deepspeed_config"]["zero_stage"] = zero_stage
    return cfg


def launch_command(config_path: str | Path, train_config: str, preset: str | None = None) -> str:
    """The command that launches the trainer under accelerate config `config_path`: with this
    environment's Python (`sys.executable -m accelerate.commands.launch`), so it runs without an
    activated environment, from any directory when the paths given are absolute."""
    preset_arg = f" --preset {shlex.quote(preset)}" if preset else ""
    return (
        f"{shlex.quote(sys.executable)} -m accelerate.commands.launch --config_file "
        f"{shlex.quote(str(config_path))} -m scalebio_core train "
        f"--config {shlex.quote(str(train_config))}{preset_arg}"
    )


PLAN_BASE = {"max_length": 1024, "precision": "bf16"}
"""The planner's base run config without a preset: a 1024-token context in bf16 (the paper's)."""


def plan_config(
    base: Mapping[str, Any] | None, fields: Mapping[str, Any], gpus: int
) -> TrainConfig:
    """The run config a plan predicts and launches: `base` (a preset's dict; default PLAN_BASE)
    with `fields` over it; micro-batch 1 per GPU unless the batch sizes are given; a model
    chosen in `fields` brings its own tokenizer."""
    fields = dict(fields)
    if "model" in fields and not str(fields["model"]).startswith(("embedded", RANDOM_PREFIX)):
        fields.setdefault("tokenizer", fields["model"])
    d = merge(dict(PLAN_BASE) if base is None else dict(base), fields)
    per_step = max(gpus, 1) * d.get("grad_accum", 1)
    d.setdefault("batch_size", per_step)
    d.setdefault("val_batch_size", per_step)
    return TrainConfig.from_dict(d)


SEARCHED = {
    "offload": (False, True),
    "gradient_checkpointing": (False, True),
    "sharding": ("ddp", "zero1", "zero2", "fsdp", "zero3"),
    "precision": ("bf16-weights", "bf16", "fp32"),
}
"""What `cheapest` chooses when not given, each in order of cost: CPU offload costs the most
time (every step moves state over PCIe), then recomputation (about one more forward per
backward), then communication (sharding gathers the weights), then the precision (fp32 runs at a
fraction of bf16's speed on GPUs; autocast over fp32 weights casts them on every use)."""


def _sharding_fields(sharding: str, offload: bool) -> dict[str, Any]:
    zero = int(sharding[-1]) if sharding.startswith("zero") else 0
    return {
        "fsdp": sharding == "fsdp",
        "fsdp_offload": sharding == "fsdp" and offload,
        "zero_stage": zero,
        "zero_offload": bool(zero) and offload,
    }


def cheapest(
    base: Mapping[str, Any] | None,
    fields: Mapping[str, Any],
    gpus: int,
    gpu_gib: float,
    host_gib: float | None = None,
    headroom: float = HEADROOM,
    shape: ModelShape | None = None,
) -> tuple[Plan | None, int, int]:
    """The cheapest configuration (order of `SEARCHED`) that the trainer runs and that fits,
    `headroom` of each GPU (and of `host_gib` per node, when given) kept free: (its plan or
    None, configurations that fit, configurations the trainer accepts). Fields given in
    `fields` stay fixed; `fields` may not set the sharding fields themselves."""
    fixed = dict(fields)
    shardings = SEARCHED["sharding"]
    if {"fsdp", "zero_stage", "fsdp_offload", "zero_offload"} & set(fixed):
        raise ConfigError("cheapest searches the sharding and offload: do not fix them.")
    choices = {k: (fixed.pop(k),) if k in fixed else v for k, v in SEARCHED.items()}
    found: Plan | None = None
    fits = accepted = 0
    for offload in choices["offload"]:
        for ckpt in choices["gradient_checkpointing"]:
            for sharding in shardings:
                if offload and sharding == "ddp":
                    continue  # the trainer offloads sharded state only
                for precision in choices["precision"]:
                    trial = {
                        **fixed,
                        **_sharding_fields(sharding, offload),
                        "gradient_checkpointing": ckpt,
                        "precision": precision,
                    }
                    try:
                        cfg = plan_config(base, trial, gpus)
                        shape = shape or model_shape(cfg.model)
                        p = plan(cfg, gpus, gpu_gib, shape, host_gib, headroom)
                    except ConfigError:
                        continue
                    accepted += 1
                    fits += p.fits
                    if p.fits and found is None:
                        found = p
    return found, fits, accepted


def launch_kind(cfg: TrainConfig) -> str:
    """The accelerate config that runs `cfg` on several processes."""
    return "fsdp" if cfg.fsdp else "deepspeed_zero3" if cfg.zero_stage else "ddp"


NO_DATA = (
    "no data given: this plan would train on the embedded demo corpus {corpus!r} (synthetic "
    "records built into the package, not your data). Give the data: --config with a preset "
    "that names it (e.g. --config noisy --preset paper), or data_dir=FOLDER, or "
    "sources=[…] with validation={{…}}; or pass --demo-data to emit the demo corpus anyway."
)


def has_data(cfg: TrainConfig) -> bool:
    """Whether a run config names its data (a data folder or sources), not the embedded corpus."""
    return bool(cfg.data_dir or cfg.sources)


def data_summary(cfg: TrainConfig) -> str:
    """What run config `cfg` trains on, in one line (emit prints it and writes it in launch.sh)."""
    if cfg.sources:
        where = sorted({str(s.get("path") or s.get("hf_name") or "records") for s in cfg.sources})
        return f"{len(cfg.sources)} sources from {', '.join(where)}"
    if cfg.data_dir:
        return f"the files of data_dir {cfg.data_dir}"
    return (
        f"the EMBEDDED DEMO CORPUS {cfg.corpus!r} (synthetic records built into the package, "
        "not real data)"
    )


def _absolute(path: str, base: Path) -> str:
    return os.path.normpath(base / os.path.expanduser(path))


def _spec_paths(spec: Any, base: Path) -> Any:
    """A source spec (SourceSpec fields) with its file paths absolute against `base`."""
    if not isinstance(spec, Mapping):
        return spec
    out = dict(spec)
    if out.get("path"):
        out["path"] = _absolute(out["path"], base)
    name = out.get("hf_name")
    if isinstance(name, str) and (base / os.path.expanduser(name)).exists():
        out["hf_name"] = _absolute(name, base)  # a save_to_disk folder, not a hub name
    return out


def absolute_paths(d: Mapping[str, Any], base: str | Path | None = None) -> dict[str, Any]:
    """Flat run config `d` with its file-system paths absolute against `base` (default: the
    working directory): out_dir, data_dir, val_path, the sources' paths, and model, tokenizer
    or hf_name where they name a local folder (as the loaders read them). A command that reads
    it then runs the same from any directory."""
    base = Path(os.path.abspath(base or os.getcwd()))
    out = dict(d)
    for key in ("out_dir", "data_dir", "val_path"):
        if isinstance(out.get(key), str) and out[key]:
            out[key] = _absolute(out[key], base)
    for key in ("model", "tokenizer"):
        v = out.get(key)
        if isinstance(v, str) and not v.startswith("embedded"):
            if (base / os.path.expanduser(v)).is_dir():
                out[key] = _absolute(v, base)
    for key in ("validation", "test"):
        out[key] = _spec_paths(out.get(key), base)
    if isinstance(out.get("sources"), list):
        out["sources"] = [_spec_paths(s, base) for s in out["sources"]]
    return out


EMITTED = {"config": "config.yaml", "accelerate": "accelerate.yaml", "launch": "launch.sh"}
"""The files `emit` writes into its folder."""


def emit(
    p: Plan, folder: str | Path, demo_data: bool = False, overwrite: bool = False
) -> dict[str, Path]:
    """Write what runs plan `p` into `folder`: `config.yaml` (the run config, flat, its paths
    absolute), `accelerate.yaml` (on several GPUs) and `launch.sh` (`plan_command`, which runs
    as written from any directory). Returns the absolute paths.

    A plan without data (no data_dir, no sources: the embedded demo corpus) is refused unless
    `demo_data`. Files of these names already in `folder` with other contents are refused,
    before anything is written, unless `overwrite`; the same contents are written again."""
    if not has_data(p.cfg) and not demo_data:
        raise ConfigError(NO_DATA.format(corpus=p.cfg.corpus))
    folder = Path(os.path.abspath(folder))
    cfg = absolute_paths(p.cfg.to_dict())
    texts = {"config": yaml.safe_dump(cfg, sort_keys=False)}
    if p.gpus > 1:
        texts["accelerate"] = yaml.safe_dump(plan_accelerate_config(p), sort_keys=False)
    head = p.text().splitlines()[0]
    texts["launch"] = (
        "#!/bin/sh\n"
        f"# {head}\n"
        f"# trains on {data_summary(TrainConfig.from_dict(cfg))}\n"
        f"# written by `python -m scalebio_core memory --emit`; runs from any directory\n"
        f"{plan_command(p, folder)}\n"
    )
    out = {k: folder / EMITTED[k] for k in texts}
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--emit {folder} is a file, not a folder: choose another folder.")
    clash = [
        path.name
        for k, path in out.items()
        if path.exists() and (not path.is_file() or path.read_text() != texts[k])
    ]
    stale = folder / EMITTED["accelerate"]  # of a plan for several GPUs: not this one's
    if "accelerate" not in out and stale.exists():
        clash.append(stale.name)
    if clash and not overwrite:
        raise ConfigError(
            f"{folder} already holds {', '.join(clash)} with other contents (another plan, or "
            "files of yours); nothing was written. Choose a new --emit folder, or pass "
            "--overwrite to replace them."
        )
    folder.mkdir(parents=True, exist_ok=True)
    if "accelerate" not in out and stale.is_file():
        stale.unlink()  # `memory --rehearse` would read it
    for k, path in out.items():
        path.write_text(texts[k])
    out["launch"].chmod(0o755)
    return out


def plan_accelerate_config(p: Plan) -> dict:
    """The accelerate config of plan `p` (several GPUs)."""
    c = p.cfg
    return accelerate_config(
        launch_kind(c),
        c.model,
        p.gpus,
        offload=c.fsdp_offload or c.zero_offload,
        zero_stage=c.zero_stage or 3,
        mixed_precision="bf16" if c.precision == "bf16" else "no",
    )


def plan_command(p: Plan, folder: str | Path) -> str:
    """The command that runs plan `p` from the files `emit` writes into `folder`: absolute
    paths and this environment's Python, so it runs as printed from any directory."""
    folder = Path(os.path.abspath(folder))
    if p.gpus == 1:
        config = shlex.quote(str(folder / EMITTED["config"]))
        return f"{shlex.quote(sys.executable)} -m scalebio_core train --config {config}"
    return launch_command(folder / EMITTED["accelerate"], str(folder / EMITTED["config"]))


@dataclass(frozen=True)
class Planned:
    """The planner's answer for one model on one machine: its plan (None when a search finds
    nothing that fits) and, after a search, (configurations that fit, configurations the trainer
    accepts)."""

    model: str
    plan: Plan | None
    gpus: int
    gpu_gib: float
    host_gib: float | None
    headroom: float
    searched: tuple[int, int] | None = None

    def text(self) -> str:
        """What `python -m scalebio_core memory` prints (and the planner widget shows)."""
        rows = []
        if self.searched is not None:
            fit, accepted = self.searched
            host = (
                f" and {self.host_gib:g} GiB of host memory per node"
                if self.host_gib is not None
                else " (host memory not limited)"
            )
            rows.append(
                f"{self.model}: {fit} of the {accepted} configurations the trainer accepts fit "
                f"on {self.gpus} × {self.gpu_gib:g} GiB{host}, keeping {self.headroom:.0%} free; "
                "the cheapest"
                + (
                    ":"
                    if self.plan
                    else ": none (fewer blocks, LoRA, more or larger GPUs, more host memory)"
                )
            )
        if self.plan is not None:
            rows.append(self.plan.text())
        return "\n".join(rows)


def plan_run(
    model: str | None,
    gpus: int = GPUS,
    gpu_gib: float = GPU_GIB,
    base: Mapping[str, Any] | None = None,
    fields: Mapping[str, Any] | None = None,
    search: bool = False,
    host_gib: float | None = None,
    headroom: float = HEADROOM,
    shape: ModelShape | None = None,
) -> Planned:
    """The one planner behind `python -m scalebio_core memory` and `widgets.scaling_planner`:
    run config `base` (a preset's dict; default `PLAN_BASE`) with `fields` and `model` over it
    (`plan_config`), predicted on `gpus` × `gpu_gib` GiB with `host_gib` GiB per node (None:
    not limited), `headroom` of each kept free; with `search`, the cheapest configuration that
    fits (`cheapest`). `shape`: the model's, when known (saves building it again).
    ConfigError: a configuration the trainer refuses (without `search`: that configuration;
    with it: every configuration searched)."""
    check_machine(gpus, gpu_gib, host_gib, headroom)
    fields = dict(fields or {})
    if model:
        fields["model"] = model
    name = str(fields.get("model") or (base or {}).get("model") or TrainConfig().model)
    if search:
        found, fit, accepted = cheapest(base, fields, gpus, gpu_gib, host_gib, headroom, shape)
        if not accepted:  # the trainer's own reason, from the first configuration searched
            plan(plan_config(base, fields, gpus), gpus, gpu_gib, shape, host_gib, headroom)
        return Planned(name, found, gpus, gpu_gib, host_gib, headroom, (fit, accepted))
    cfg = plan_config(base, fields, gpus)
    p = plan(cfg, gpus, gpu_gib, shape, host_gib, headroom)
    return Planned(name, p, gpus, gpu_gib, host_gib, headroom)


def memory_argv(
    model: str | None,
    gpus: int = GPUS,
    gpu_gib: float = GPU_GIB,
    config: str | None = None,
    preset: str | None = None,
    fields: Mapping[str, Any] | None = None,
    search: bool = False,
    host_gib: float | None = None,
    headroom: float = HEADROOM,
) -> list[str]:
    """The arguments of `python -m scalebio_core memory` that ask `plan_run` the same question
    (run-config fields as their options, any other field as key=value)."""
    argv = ["--config", str(config)] if config else []
    argv += ["--preset", str(preset)] if preset else []
    argv += ["--model", model] if model else []
    argv += ["--gpus", str(gpus), "--gpu-mem", f"{gpu_gib:g}"]
    if host_gib is not None:
        argv += ["--host-mem", f"{host_gib:g}"]
    if headroom != HEADROOM:
        argv += ["--headroom", f"{headroom:g}"]
    if search:
        argv.append("--search")
    other = []
    for k, v in (fields or {}).items():
        flag = "--" + k.replace("_", "-")
        if k == "model":
            continue  # --model above
        if k not in PLAN_FIELDS:
            other.append(f"{k}={json.dumps(v)}")  # key=value reads YAML, which JSON is
        elif isinstance(v, bool):
            argv.append(flag if v else "--no-" + flag[2:])
        else:
            argv += [flag, str(v)]
    return argv + other


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scalebio_core.plan.scaleout")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--model")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--no-offload", action="store_true")
    a = p.parse_args(argv)
    try:
        print(
            yaml.safe_dump(
                accelerate_config(a.kind, a.model, a.gpus, not a.no_offload), sort_keys=False
            ),
            end="",
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
