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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import datasets

from .corpora import build_corpus
from .models import save_tiny_model

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
