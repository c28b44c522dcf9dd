"""What makes a run the run it is: its config, its model's shape and a fingerprint of its data.

A checkpoint carries the identity of the run that wrote it (`checkpoint.save`), and a resume
compares it with the run it is asked to continue (`checkpoint.load`): a checkpoint copied from
another run (another seed, a longer run, another model size) is refused, naming what differs,
before anything is loaded or any log is cut. The data part fingerprints every data file the run
reads (its bytes, SHA-256) and the tokenized result; a file edited between a kill and its resume
is refused by name unless the user accepts the change, which is then recorded in changes.jsonl.
The run folder keeps the same record, readable, in identity.json.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..sources.data import SourceSpec, TokenizedData, source_files

IDENTITY = "identity.json"
TOKENIZED = "tokenized "
"""The prefix of a tokenized set's entry in `data_changes` ("tokenized train")."""

RESUME_IGNORED = ("out_dir", "tracker", "cpu_malloc", "fsdp_offload", "zero_offload")
"""Config keys a resume may change: where and how the run is written or held, not what it does."""
RESUME_CHANGEABLE = ("lr_w", "lr_u", "lr_lam", "alpha")
"""Config keys a resume may change with a record (changes.jsonl, and each row's lr_w, lr_u,
alpha): the learning rates and α, what a stop on a non-finite loss advises lowering."""


def _sha(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def file_sha(path: Path, block: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in blocks (bounded memory)."""
    with open(path, "rb") as f:
        return _sha(iter(lambda: f.read(block), b""))


def records_sha(records: Iterable[Mapping[str, str]]) -> str:
    """SHA-256 of normalised records (prompt and response, in order)."""
    return _sha(b"\0" + r["prompt"].encode() + b"\1" + r["response"].encode() for r in records)


def data_fingerprint(
    specs: Iterable[SourceSpec], records: Mapping[str, list[dict]]
) -> dict[str, str]:
    """One fingerprint per data file the specs read (its absolute path: the SHA-256 of its
    bytes); a source without files (records given in the config, an embedded corpus, a hub
    dataset) by its name: the SHA-256 of its normalised records (`records[name]`)."""
    out: dict[str, str] = {}
    for spec in specs:
        files = source_files(spec) if spec.path is not None else []
        for f in files:
            out[str(Path(f).resolve())] = file_sha(f)
        if not files:
            origin = f"hf:{spec.hf_name}" if spec.hf_name else "records"
            out[f"source {spec.name} ({origin})"] = records_sha(records[spec.name])
    return out


def tokenized_sha(data: TokenizedData) -> str:
    """SHA-256 of a tokenized set: its source names, and each sample's source, ids and labels."""
    head = json.dumps(list(data.names)).encode()
    return _sha(
        [head, data.source_ids.numpy().tobytes()]
        + [t.numpy().tobytes() for pair in zip(data.input_ids, data.labels) for t in pair]
    )


def model_identity(model: nn.Module) -> dict[str, Any]:
    """The model's shape: its parameter count and a hash of every parameter's name, shape and
    dtype (global shapes: a sharded parameter counts whole)."""
    shapes = []
    for name, p in model.named_parameters():
        shape = tuple(getattr(p, "ds_shape", None) or p.shape)  # DeepSpeed ZeRO-3 partitions
        shapes.append((name.removeprefix("module."), list(shape), str(p.dtype)))
    count = sum(int(torch.Size(s).numel()) for _, s, _ in shapes)
    return {"parameters": count, "shapes": _sha([json.dumps(shapes).encode()])[:16]}


def run_identity(
    cfg_dict: Mapping[str, Any], model: nn.Module, data: Mapping[str, Any]
) -> dict[str, Any]:
    """The identity a checkpoint carries: the resolved config (less the keys a resume may
    change), the model's shape, and the data's fingerprint (`Data.fingerprint`)."""
    skip = set(RESUME_IGNORED + RESUME_CHANGEABLE)
    return {
        "config": {k: v for k, v in cfg_dict.items() if k not in skip},
        "model": model_identity(model),
        "data": dict(data),
    }


def _read(config: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's config as it is compared: on a run's own data (data_dir, sources) the
    corpus is not read, whatever is recorded (checkpoints before it was null say 'noisy')."""
    out = dict(config)
    if out.get("data_dir") or out.get("sources"):
        out.pop("corpus", None)
    return out


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, list[str]]:
    """What differs between a checkpoint's identity (`saved`) and this run's (`now`), by part:
    "config", "model" and "data" (the files, and the tokenized sets), as lines to show."""
    out: dict[str, list[str]] = {"config": [], "model": [], "data": []}
    a, b = _read(saved.get("config", {})), _read(now.get("config", {}))
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out["config"].append(f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} in this run")
    ma, mb = saved.get("model", {}), now.get("model", {})
    if ma != mb:
        out["model"].append(
            f"the checkpoint's model has {ma.get('parameters', 0):,} parameters (shapes "
            f"{ma.get('shapes')}), this run's {mb.get('parameters', 0):,} "
            f"(shapes {mb.get('shapes')})"
        )
    changes = data_changes(saved, now)
    files = {k: v for k, v in changes.items() if not k.startswith(TOKENIZED)}
    for f, (then, current) in files.items():
        if current is None:
            out["data"].append(f"{f}: read by the checkpoint's run, not by this one")
        elif then is None:
            out["data"].append(f"{f}: new (the checkpoint's run did not read it)")
        else:
            out["data"].append(f"{f}: changed (SHA-256 {then[:12]}… then, {current[:12]}… now)")
    if changes and not files:  # same files, another tokenized result
        out["data"] += [
            f"the {k} set differs (same files: the tokenizer, max_length or the package's "
            "tokenization changed)"
            for k in changes
        ]
    return {k: v for k, v in out.items() if v}


def data_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, list[str]]:
    """The changed fingerprints of the data, {name: [then, now]} (changes.jsonl's record)."""
    out = {}
    for part in ("files", "tokenized"):
        a, b = saved.get("data", {}).get(part, {}), now.get("data", {}).get(part, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out[k if part == "files" else TOKENIZED + k] = [a.get(k), b.get(k)]
    return out
