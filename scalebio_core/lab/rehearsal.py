"""The rehearsal cache: tiny stand-ins saved under the paper's names in an ordinary Hugging Face
cache, so that the `paper` presets run offline, in seconds, through the same `from_pretrained`
and `load_dataset` code as on a GPU node with the hub.

    home = build(tmp / "hf")          # HF_HOME: hub/ (models) and datasets/ (processed datasets)
    os.environ["HF_HOME"] = str(home) # with HF_HUB_OFFLINE=1: `gpt2`, `tatsu-lab/alpaca`, …

Models: each name of `MODELS` holds a randomly initialised model of the real architecture at a
tiny size, with the real context length (so the presets' max_length passes), and the embedded
tokenizer, in the hub cache layout (`hub/models--org--name/snapshots/<sha>/`, `refs/main`).
Datasets: each name of `DATASETS` holds records with the real columns, in the processed-dataset
layout that `load_dataset` falls back to offline (`datasets/org___name/default/0.0.0/<hash>/`).
Files the presets read from disk (the translations, the math release's sources) are written
under `data_root` with the names the presets give them. The records are drawn from the embedded
instruction corpus; nothing here is the real data.

`rehearse_plan(folder)` (`python -m scalebio_core memory --rehearse DIR`) runs a plan that
`memory --emit DIR` wrote at smoke size on the CPU: its trainer, engine and options through
`accelerate launch` with 2 gloo processes, on a tiny random model of the plan's architecture,
stand-in records for its hub datasets, a few steps; it says what it substitutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import yaml
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

from ..core.distributed import free_port, run_group
from ..errors import ConfigError
from ..plan.memory import load_config
from ..plan.scaleout import block_class
from ..sources.corpora import build_corpus
from ..sources.data import held_out_files, specs_from_dir
from ..train.config import TrainConfig
from ..train.models import TINY_ARCHS, save_tiny_model
from ..train.runs import read_jsonl

MODELS = {
    "gpt2": ("gpt2", {"n_positions": 1024}),
    "meta-llama/Meta-Llama-3-8B": ("llama", {"max_position_embeddings": 8192}),
    "EleutherAI/gpt-neox-20b": ("gpt_neox", {"max_position_embeddings": 2048}),
    "01-ai/Yi-34B": ("llama", {"max_position_embeddings": 4096}),
}
"""The paper's models: (architecture, its context length)."""
ALPACA_COLUMNS = ("instruction", "input", "output", "text")
DATASETS = {"tatsu-lab/alpaca": ALPACA_COLUMNS, "vicgalle/alpaca-gpt4": ALPACA_COLUMNS}
"""The paper's hub datasets and their columns."""
TRANSLATIONS = ("chinese", "french", "german", "italian", "spanish")
MATH_SOURCES = (
    "MathInstruct",
    "GPT4-LLM",
    "GPTeacher",
    "SlimOrca",
    "UltraInteract",
    "WizardLM",
    "ShareGPT",
    "Magicoder",
    "dart-math",
    "orca-math",
)


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def hub_snapshot(home: Path, repo_id: str, kind: str = "model") -> Path:
    """The snapshot folder of `repo_id` in the hub cache of `home`, created with its refs/main."""
    repo = Path(home) / "hub" / f"{kind}s--{repo_id.replace('/', '--')}"
    sha = _sha(f"rehearsal:{kind}:{repo_id}")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def _math_rows(n: int, seed: int) -> list[dict]:
    """`n` word problems with worked answers ending "The answer is N." (the embedded math
    corpus's validation draw), in Alpaca format."""
    return build_corpus("math", n=1, n_val=n, seed=seed).validation


def _alpaca_rows(n: int, seed: int) -> list[dict]:
    """`n` Alpaca-format records (with Alpaca's `text` column) from the embedded corpus."""
    corpus = build_corpus("instruction", n_per_task=max(1, n // 6 + 1), n_val=4, seed=seed)
    seen, recs = set(), []
    for r in (r for rs in corpus.sources.values() for r in rs):
        key = (r["instruction"], r["input"], r["output"])
        if key not in seen:  # a templated corpus repeats records; real datasets rarely do
            seen.add(key)
            recs.append(r)
    rows = []
    for r in recs[:n]:
        prompt = f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"]
        rows.append({**r, "text": f"{prompt}\n\n{r['output']}"})
    return rows


def save_dataset(home: Path, repo_id: str, rows: list[dict]) -> Path:
    """`rows` as the processed cache of hub dataset `repo_id` (split train), the layout that
    `load_dataset(repo_id)` reads offline."""
    cache = Path(home) / "datasets"
    work = cache / "_rehearsal_build"
    name = repo_id.split("/")[-1]
    parquet = work / f"{name}.parquet"
    parquet.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    builder = datasets.load_dataset_builder(
        "parquet", data_files={"train": str(parquet)}, cache_dir=str(work)
    )
    builder.download_and_prepare()
    target = cache / "___".join(repo_id.split("/")) / "default" / "0.0.0" / _sha(repo_id)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for f in Path(builder.cache_dir).iterdir():
        dest = target / (f"{name}-train.arrow" if f.suffix == ".arrow" else f.name)
        shutil.copy(f, dest)
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(config_name="default", dataset_name=name)
    (target / "dataset_info.json").write_text(json.dumps(info))
    shutil.rmtree(work)
    return target


def build(home: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None,
          n: int = 240, seed: int = 0) -> Path:  # fmt: skip
    """Write the rehearsal cache into `home` (use it as HF_HOME) and the presets' local files
    under `data_root` (default: `home`/data_root); returns `home`."""
    home = Path(home)
    for name, (arch, context) in MODELS.items():
        save_tiny_model(arch, hub_snapshot(home, name), config_overrides=context)
    for k, name in enumerate(DATASETS):
        save_dataset(home, name, _alpaca_rows(n, seed + k))
    root = Path(data_root) if data_root is not None else home / "data_root"
    files = {f"data/alpaca_translations/{lang}.json": 40 for lang in TRANSLATIONS}
    files.update({f"data/math_sources/{s}.json": 40 for s in MATH_SOURCES})
    files.update({"data/math_sources/validation.json": 30, "data/math_sources/gsm8k_test.json": 30})
    # GSM8K's converted records and the release's validation set: worked word problems ending
    # "The answer is N.", as the math preset's grader (math-verify) expects of them
    worded = {"data/math_sources/validation.json", "data/math_sources/gsm8k_test.json"}
    for k, (rel, size) in enumerate(sorted(files.items())):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = ("instruction", "input", "output")
        made = _math_rows(size, 100 + k) if rel in worded else _alpaca_rows(size, 100 + k)
        path.write_text(json.dumps([{c: r[c] for c in keep} for r in made]))
    return home


# ------------------------------------------------------------------ rehearsing an emitted plan

REHEARSAL_PROCESSES = 2
"""Processes of a rehearsal (gloo on the CPU) of a plan for several GPUs."""
REHEARSAL_BLOCKS = 4
"""Decoder blocks of the rehearsal's tiny model (LISA draws some of them)."""
REHEARSAL_RUN = {"steps": 4, "max_length": 128, "batch": 24, "rows_per_shard": 24, "limit": 256}
"""Smoke size: steps, tokens per sample (at most), global batch (at most), stand-in records per
shard of a hub dataset, records read from each local source (at most)."""


def _tiny_stand_in(model: str, work: Path, max_length: int) -> tuple[str, str]:
    """A tiny random model of `model`'s architecture (its model_type, hence its block class)
    saved under `work`/model: (its folder, a description)."""
    arch = load_config(model).model_type
    if arch not in TINY_ARCHS:
        raise ConfigError(
            f"no tiny stand-in for {model} (model_type {arch!r}); the rehearsal builds "
            f"{', '.join(TINY_ARCHS)}. Pass model=FOLDER (a small model of that architecture "
            "saved with save_pretrained) to rehearse with it."
        )
    layers = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    context = "n_positions" if arch == "gpt2" else "max_position_embeddings"
    path = save_tiny_model(
        arch,
        work / "model",
        config_overrides={layers: REHEARSAL_BLOCKS, context: max(128, max_length)},
    )
    return str(path), f"a tiny random {arch} ({REHEARSAL_BLOCKS} blocks, width 32)"


def _is_hub(name: Any) -> bool:
    """A hub dataset name (not a local folder, not a packaged builder such as json)."""
    return (
        isinstance(name, str)
        and not Path(name).expanduser().exists()
        and name not in _PACKAGED_DATASETS_MODULES
    )


def _stand_in_data(d: dict, work: Path, say: Callable[[str], None]) -> dict:
    """Run config `d` with hub datasets replaced by stand-in files under `work`/data (Alpaca
    records drawn from the embedded corpus; each hub name one file, so shards stay disjoint)
    and local sources cut to a few records (a data folder's files become sources for that)."""
    folder = d.get("data_dir") if not d.get("sources") else None
    held = held_out_files(folder) if folder else {}
    val = d.get("val_path") or held.get("validation")
    if folder and val:  # else the trainer names what is missing
        with warnings.catch_warnings():  # what it holds out: said by the run's own table
            warnings.simplefilter("ignore")
            sources = [{"name": s.name, "path": s.path} for s in specs_from_dir(folder)]
        validation = {"name": "validation", "path": str(val)}
        d = {**d, "sources": sources, "validation": validation, "data_dir": None, "val_path": None}
        if "test" in held and not d.get("test"):
            d["test"] = {"name": "test", "path": str(held["test"])}
        say(f"  data: the files of {folder}, as sources")
    specs = [("sources", i, s) for i, s in enumerate(d.get("sources") or [])]
    specs += [(k, None, d[k]) for k in ("validation", "test") if isinstance(d.get(k), dict)]
    written: dict[str, Path] = {}
    cut = False
    out = {**d, "sources": list(d["sources"]) if d.get("sources") else d.get("sources")}
    for key, i, spec in specs:
        spec = dict(spec)
        if spec.get("hf_name") and _is_hub(spec["hf_name"]):
            name = spec.pop("hf_name")
            for k in ("hf_split", "hf_config"):
                spec.pop(k, None)
            shards = int(str(spec.get("shard") or "0/1").split("/")[-1])
            rows = REHEARSAL_RUN["rows_per_shard"] * max(shards, 1)
            if name not in written:
                path = work / "data" / f"{name.replace('/', '__')}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                made = _alpaca_rows(rows, len(written))
                keep = ("instruction", "input", "output")
                path.write_text(json.dumps([{c: r[c] for c in keep} for r in made]))
                written[name] = path
                say(
                    f"  data: hub dataset {name} -> {len(made)} stand-in records at {path} "
                    "(Alpaca format from the embedded corpus, not the data)"
                )
            spec.update(path=str(written[name]), format="alpaca")
        elif spec.get("path") or spec.get("hf_name"):  # local: the data itself, cut
            spec["limit"] = min(spec.get("limit") or REHEARSAL_RUN["limit"], REHEARSAL_RUN["limit"])
            cut = True
        if i is None:
            out[key] = spec
        else:
            out["sources"][i] = spec
    if cut:
        say(f"  data: local files read, each cut to {REHEARSAL_RUN['limit']} records")
    return out


def _rehearsal_accelerate(acc: dict, cfg: dict, model: str, say: Callable[[str], None]) -> dict:
    """The plan's accelerate config for 2 gloo processes on the CPU: offload off, the wrap
    class of the tiny model, accelerate's mixed precision as the run config's precision."""
    acc = json.loads(json.dumps(acc))
    say(f"  processes: {acc.get('num_processes')} -> {REHEARSAL_PROCESSES} (gloo on the CPU)")
    acc.update(num_processes=REHEARSAL_PROCESSES, num_machines=1, machine_rank=0)
    acc["mixed_precision"] = "bf16" if cfg["precision"] == "bf16" else "no"
    fsdp = acc.get("fsdp_config")
    if isinstance(fsdp, dict):
        if fsdp.get("fsdp_offload_params"):
            say("  FSDP offload: not rehearsed (the CPU holds everything already): off")
            fsdp["fsdp_offload_params"] = False
        wrap = block_class(model)
        if fsdp.get("fsdp_transformer_layer_cls_to_wrap") not in (None, wrap):
            raise ConfigError(
                f"the plan wraps {fsdp['fsdp_transformer_layer_cls_to_wrap']} but the stand-in's "
                f"blocks are {wrap}: pass model=FOLDER with a model of the plan's architecture."
            )
        fsdp["fsdp_transformer_layer_cls_to_wrap"] = wrap
    ds = acc.get("deepspeed_config")
    if isinstance(ds, dict):
        for k in ("offload_optimizer_device", "offload_param_device"):
            if ds.get(k) not in (None, "none"):
                say(f"  DeepSpeed {k}: not rehearsed on the CPU: none")
                ds[k] = "none"
    return acc


def _smaller(d: dict, processes: int) -> dict[str, Any]:
    """The fields that shrink a run config to smoke size (LISA, LoRA, batch, length, steps)."""
    ga = min(int(d.get("grad_accum", 1)), 2)
    unit = processes * ga

    def batch(n: int) -> int:
        return unit * max(1, -(-min(n, REHEARSAL_RUN["batch"]) // unit))

    length = d.get("max_length")
    steps = REHEARSAL_RUN["steps"]
    out: dict[str, Any] = {
        "steps": steps,
        "grad_accum": ga,
        "batch_size": batch(int(d["batch_size"])),
        "val_batch_size": batch(int(d["val_batch_size"])),
        "max_length": min(length, REHEARSAL_RUN["max_length"])
        if isinstance(length, int)
        else REHEARSAL_RUN["max_length"],
        "truncate_prompts": True,
        "checkpoint_every": min(int(d.get("checkpoint_every", steps)), steps),
        "lisa_interval": min(int(d.get("lisa_interval", 2)), 2),
    }
    if d.get("lisa_active"):
        out["lisa_active"] = min(int(d["lisa_active"]), REHEARSAL_BLOCKS - 1)
    if d.get("lora_rank"):
        out["lora_rank"] = min(int(d["lora_rank"]), 4)
    if d.get("attn_implementation") == "flash_attention_2":
        out["attn_implementation"] = "sdpa"  # flash-attn runs on CUDA GPUs only
    return out


def _read_plan(folder: Path) -> tuple[dict, dict | None]:
    """The run config (checked) and the accelerate config (None: one GPU) `emit` wrote."""
    config = folder / "config.yaml"
    if not config.is_file():
        raise ConfigError(
            f"{folder} holds no emitted plan (config.yaml): write one with python -m "
            f"scalebio_core memory … --emit {folder}."
        )
    d = TrainConfig.from_dict(yaml.safe_load(config.read_text())).to_dict()
    acc = folder / "accelerate.yaml"
    return d, yaml.safe_load(acc.read_text()) if acc.is_file() else None


def _rehearsal_config(
    d: dict, work: Path, processes: int, overrides: dict, say: Callable[[str], None]
) -> dict:
    """Run config `d` at smoke size on the CPU (`_smaller`), on a tiny model of its
    architecture and stand-ins for its hub data, with `overrides` over it; says what changed."""
    small = _smaller(d, processes)
    if "model" in overrides:  # a model of the user's, a local folder
        model = str(overrides.pop("model"))
        model = os.path.abspath(model) if Path(model).expanduser().is_dir() else model
        what = model
    elif str(d["model"]).startswith("embedded"):
        model, what = d["model"], d["model"]
    else:
        model, what = _tiny_stand_in(d["model"], work, small["max_length"])
    say(f"  model: {d['model']} -> {what}")
    tokenizer = model if not model.startswith("embedded") else d["tokenizer"]
    d = _stand_in_data(d, work, say)
    for k in ("fsdp_offload", "zero_offload"):
        if d.get(k):
            say(f"  {k}: not rehearsed (the CPU holds everything already): off")
            small[k] = False
    if d.get("precision") == "bf16":
        say("  precision bf16: bf16 autocast on the CPU (CPU kernels, not the GPU's)")
    out = {**d, **small, "model": model, "tokenizer": tokenizer, "tracker": "none"}
    out = {**out, "out_dir": str(work / "run"), **overrides}
    out["out_dir"] = os.path.abspath(out["out_dir"])
    lisa = f", LISA {out['lisa_active']} of {REHEARSAL_BLOCKS}" if d.get("lisa_active") else ""
    size = ", ".join(f"{k} {out[k]}" for k in ("steps", "batch_size", "max_length"))
    say(f"  size: {size}{lisa}")
    TrainConfig.from_dict(out)  # refuse a bad override before anything starts
    return out


def _rehearsal_command(
    cfg: dict, acc: dict | None, work: Path, say: Callable[[str], None]
) -> list[str]:
    """The command that trains `cfg` (written into `work`): under the plan's accelerate config
    for 2 CPU processes, or in one process for a one-GPU plan."""
    run_config = work / "config.yaml"
    run_config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    train = ["-m", "scalebio_core", "train", "--no-progress", "--config", str(run_config)]
    if acc is None:
        return [sys.executable, *train]
    acc_file = work / "accelerate.yaml"
    acc_file.write_text(yaml.safe_dump(_rehearsal_accelerate(acc, cfg, cfg["model"], say)))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    return [*launch, str(acc_file), "--main_process_port", str(free_port()), *train]


def _checked(folder: Path, out: Path, code: int, processes: int) -> int:
    """The steps of the rehearsal's run in `out`, after checking it ran, on `processes`."""
    if code != 0:
        raise ConfigError(
            f"the rehearsal of {folder} failed (exit code {code}): the trainer's message is "
            f"above; its run folder is {out}. Fix the plan (memory … --emit) and rehearse again."
        )
    timing = read_jsonl(out / "timing.jsonl") if (out / "timing.jsonl").exists() else []
    worlds = {r.get("world_size") for r in timing}
    if worlds != {processes}:  # `accelerate launch --cpu` would run one process, silently
        raise ConfigError(
            f"the rehearsal ran with world sizes {sorted(map(str, worlds))}, not {processes} "
            f"processes: see {out / 'timing.jsonl'}."
        )
    return len(read_jsonl(out / "trajectory.jsonl"))


def rehearse_plan(
    folder: str | os.PathLike[str],
    overrides: dict | None = None,
    timeout: float = 900.0,
    say: Callable[[str], None] = print,
) -> Path:
    """Run the plan that `memory --emit` wrote into `folder` at smoke size on this CPU: the
    same trainer, engine and options through `accelerate launch`, on a tiny random model of
    the same architecture, with 2 gloo processes (1 for a one-GPU plan), stand-ins for hub
    datasets, a few steps. `overrides` (run-config fields) go over the rehearsal's config
    (out_dir: default a new temporary folder). Says what it substitutes; returns the run
    folder, after checking that the run used as many processes as asked."""
    folder = Path(os.path.abspath(folder))
    d, acc = _read_plan(folder)
    processes = REHEARSAL_PROCESSES if acc else 1
    work = Path(tempfile.mkdtemp(prefix="scalebio-rehearsal-"))
    say(f"rehearsing {folder} on this CPU (work files in {work}):")
    cfg = _rehearsal_config(d, work, processes, dict(overrides or {}), say)
    cmd = _rehearsal_command(cfg, acc, work, say)
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",  # the CPU, gloo, even on a GPU machine
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "HF_HUB_OFFLINE": "1",  # everything it reads is local
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    say(f"  command: {shlex.join(cmd)}")
    out = Path(cfg["out_dir"])
    try:
        code = run_group(cmd, timeout, env=env, capture=False).returncode
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"the rehearsal ran past {timeout:g} s and was stopped: give it more time "
            "(timeout) or fewer steps (steps=2)."
        ) from None
    steps = _checked(folder, out, code, processes)
    plural = "es" if processes > 1 else ""
    say(f"rehearsal passed: {steps} steps on {processes} process{plural}; run folder {out}")
    return out
