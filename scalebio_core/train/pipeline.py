"""From weights to a trained model: resampling, fine-tuning, evaluation on held-out data.

    resample(...)        N examples drawn from the sources by the learned weights
    sft(cfg, data, ...)  plain fine-tuning of a fresh model on them (the trainer, weights fixed)
    evaluate(...)        target loss on a held-out target set; exact-match accuracy where the
                         answers are checkable (`evaluation`, re-exported here)

The held-out target set of an embedded corpus is a fresh draw of its validation distribution
(another seed) with every record that also occurs in the training sources or the validation set
removed: the validation set has steered the weights (and may be added to the training data), so
it cannot measure them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from .. import files, messages
from ..core.baselines import VALIDATION, plain_step
from ..errors import ConfigError, DataError
from ..sources.corpora import build_corpus
from ..sources.data import (
    SourceSpec,
    leaks,
    load_records,
    load_sources,
    read_lines,
)
from . import loop, runs
from .build import count_tokens, data_rules, data_specs, heldout_spec, setup, train_batch
from .config import TrainConfig, read_run_config
from .evaluation import check_grader, checkable, evaluate, grade

__all__ = ["check_grader", "checkable", "evaluate", "grade"]  # evaluation's, for older callers
from .loop import Callback
from .trainer import lm_fns

TEST_SEED_OFFSET = 7919  # the held-out draw's corpus seed: seed + this
EVAL = "eval.json"
RESAMPLED = "resampled.jsonl"
RESAMPLE_KEYS = frozenset({"prompt", "response", "source"})
"""The keys of every record `resample` writes: how a file is recognised as its output."""
SFT_FILES = (runs.CONFIG, runs.TRAJECTORY, runs.TIMING, EVAL, "data/validation.jsonl")
"""What `sft` writes into its out folder (all that --overwrite replaces)."""


# ---------------------------------------------------------------- resampling


def _largest_remainder(weights: Sequence[float], n: int) -> list[int]:
    raw = np.asarray(weights, float) * n
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts.tolist()


def resample(
    weights: Mapping[str, float],
    records: Mapping[str, list[dict]],
    n: int,
    seed: int = 0,
    validation: list[dict] | None = None,
    add_validation: bool = False,
) -> list[dict]:
    """`n` records drawn by `weights` (n_s = round(n·p_s), largest remainders), shuffled.

    Within a source, records are drawn without replacement, then again in a new order when the
    source runs out (epochs). The key "validation" (validation-only weights) draws from the
    validation set. `add_validation` appends the whole validation set once (explicit: the
    paper's release does this). Each record keeps its prompt and response and gains "source".
    """
    pools = dict(records)
    if VALIDATION in weights and weights[VALIDATION] > 0:
        if validation is None:
            raise ConfigError("the weights put mass on the validation set: pass `validation`.")
        pools[VALIDATION] = validation
    unknown = sorted(set(weights) - set(pools))
    missing = sorted(set(records) - set(weights))
    if unknown or missing:
        raise ConfigError(
            f"the weights do not match the sources: unknown {unknown}, missing {missing}. Use "
            "the weights.json of a run on these same sources."
        )
    w = np.asarray([float(weights[k]) for k in weights])
    if not np.all(np.isfinite(w)) or (w < 0).any() or not math.isclose(w.sum(), 1, abs_tol=1e-6):
        raise ConfigError(f"weights must be >= 0 and sum to 1; got {dict(weights)}.")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a whole number >= 1, got {n!r}.")
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    repeated: list[str] = []
    for name, count in zip(weights, _largest_remainder(w, n)):
        pool = pools[name]
        if count == 0:
            continue
        if not pool:
            raise ConfigError(f"source {name!r} has weight but no records.")
        idx = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-count // len(pool)))])
        out.extend({**pool[i], "source": name} for i in idx[:count].tolist())
        if count > len(pool):
            repeated.append(
                f"{name}: {count} draws of {len(pool)} records, each record about "
                f"{count / len(pool):.1f} times"
            )
    if repeated:
        messages.warn(
            "resampling repeats records of sources smaller than their draws ("
            + "; ".join(repeated)
            + "): a model fine-tuned on them sees those records that often. Ask for fewer "
            "records (--n; n= in Python) or give those sources more data.",
            stacklevel=2,
        )
    if add_validation:
        if validation is None:
            raise ConfigError("add_validation needs the validation records.")
        out.extend({**r, "source": VALIDATION} for r in validation)
    return [out[i] for i in rng.permutation(len(out)).tolist()]


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    files.write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return Path(path)


def read_weights(path: str | os.PathLike[str], fix: str) -> dict[str, float]:
    """A weights.json (each source name to its weight); its errors name the file and `fix`."""
    try:
        weights = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        at = f" (line {e.lineno}, column {e.colno}: {e.msg})" if hasattr(e, "lineno") else ""
        raise DataError(f"{path}: not valid JSON{at}; {fix}") from e
    if not isinstance(weights, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in weights.values()
    ):
        raise DataError(f"{path}: a weights.json maps each source name to its weight; {fix}")
    return weights


def is_resample_output(path: Path, limit: int) -> bool:
    """Whether `path` is a file `resample` wrote: JSON Lines, every line a record of exactly
    prompt, response and source, text each (lines over `limit` bytes are not read whole)."""
    try:
        with open(path, "rb") as f:
            lines = 0
            for _, _, line in read_lines(f, limit):
                rec = None if isinstance(line, int) else json.loads(line)
                if not (
                    isinstance(rec, dict)
                    and set(rec) == RESAMPLE_KEYS
                    and all(isinstance(v, str) for v in rec.values())
                ):
                    return False
                lines += 1
            return lines > 0
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return False


def _check_resample_out(target: Path, overwrite: bool, limit: int) -> None:
    """Refuse to write over an existing file, unless `overwrite` and it is resample's own."""
    if target.is_dir():
        raise ConfigError(
            f"--out {target} is a folder: give the path of a JSON Lines file. Nothing was written."
        )
    if not target.exists():
        return
    if not is_resample_output(target, limit):
        raise ConfigError(
            f"{target} exists and is not an output of resample (a JSON Lines file whose every "
            "line is a record of exactly prompt, response and source); nothing was written. "
            "Choose another --out: --overwrite replaces only resample's own earlier output."
        )
    if not overwrite:
        raise ConfigError(
            f"{target} exists (an earlier output of resample); nothing was written. Pass "
            "--overwrite (overwrite=True in Python) to replace it, or choose another --out."
        )


def _check_run_files(run_dir: Path, weights: Mapping[str, float] | None) -> None:
    needed = [runs.CONFIG] + ([runs.WEIGHTS] if weights is None else [])
    for missing in [run_dir / f for f in needed if not (run_dir / f).exists()]:
        raise ConfigError(f"{missing} does not exist: give a finished run directory.")


def resample_rows(
    run_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    add_validation: bool = False,
    weights: Mapping[str, float] | None = None,
    where: str = "the drawn records",
) -> list[dict]:
    """`n` records of a run's sources drawn by its weights.json (or `weights`): `resample` on the
    sources its config.yaml names. Warns when the drawn records (named `where`, e.g. the file
    they go to) hold records of the validation set (beyond those `add_validation` appends) or of
    the test set (`data.leaks`): held-out data that a fine-tuning on them would train on."""
    run_dir = Path(run_dir)
    _check_run_files(run_dir, weights)
    cfg = read_run_config(run_dir)
    if weights is None:
        weights = read_weights(
            run_dir / runs.WEIGHTS,
            "the run writes it at its end and at every checkpoint: rewrite it by resuming the "
            f"run (python -m scalebio_core train --config {run_dir / runs.CONFIG} --resume), "
            "or give the weights to use (--weights FILE; weights= in Python).",
        )
    specs, val_spec = data_specs(cfg)
    validation = load_records(val_spec)
    rows = resample(
        weights,
        load_sources(specs),
        n,
        seed=seed,
        validation=validation,
        add_validation=add_validation,
    )
    drawn = [r for r in rows if r["source"] != VALIDATION]  # not the validation set's own
    lines = leaks({where: drawn}, {"validation": validation})
    test = heldout_spec(cfg) if (cfg.data_dir or cfg.sources) else None  # a corpus's: disjoint
    if test is not None:
        lines += leaks({where: rows}, {"test": load_records(test)})
    for line in lines:
        messages.warn(line, stacklevel=3)
    return rows


def resample_run(
    run_dir: str | os.PathLike[str],
    n: int,
    out: str | os.PathLike[str] | None = None,
    seed: int = 0,
    add_validation: bool = False,
    weights: Mapping[str, float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Resample the sources of a run (its config.yaml) with its weights.json; write JSON Lines
    to `out` (default: <run>/resampled.jsonl). An existing file there is refused, unless
    `overwrite` and it is an earlier output of resample (`is_resample_output`)."""
    run_dir = Path(run_dir)
    _check_run_files(run_dir, weights)
    target = Path(out) if out else run_dir / RESAMPLED
    limit = 8 * read_run_config(run_dir).max_record_bytes  # JSON escapes, "source"
    _check_resample_out(target, overwrite, limit)
    rows = resample_rows(run_dir, n, seed, add_validation, weights, where=target.name)
    return write_jsonl(target, rows)


def mixture(
    run_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    add_validation: bool = False,
    weights: Mapping[str, float] | None = None,
) -> Any:
    """The learned mixture as a `datasets.Dataset` for TRL's `SFTTrainer` (or any trainer):
    `n` records of the run's sources drawn by its weights (`resample`: exact counts by largest
    remainders, a source's records reused in a new order only once it runs out, said in a
    warning), in TRL's prompt–completion format: columns `prompt`, `completion`, `source`."""
    return prompt_completion(resample_rows(run_dir, n, seed, add_validation, weights))


def prompt_completion(rows: list[dict]) -> Any:
    """Drawn records as a `datasets.Dataset` in TRL's prompt–completion format (columns
    `prompt`, `completion`, `source`)."""
    return datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["response"], "source": r["source"]} for r in rows]
    )


# ---------------------------------------------------------------- the held-out target set


def _key(r: dict) -> tuple[str, str]:
    return (r["prompt"], r["response"])


def heldout_records(cfg) -> list[dict]:
    """The held-out target set: `cfg.test` or the data folder's test file, or an embedded
    corpus's test split, or else a fresh draw of its validation distribution; without any record
    of the training sources or the validation set."""
    spec = heldout_spec(cfg)
    if spec is not None:
        return load_records(spec)
    if cfg.sources or cfg.data_dir:
        raise ConfigError(
            "no held-out test set: set test: {path: …} (or hf_name: …) in the config, or add "
            "test.jsonl to the data folder; the validation set steered the weights and cannot "
            "measure them."
        )
    fresh = build_corpus(cfg.corpus, **cfg.corpus_args).test  # a corpus of finite text
    if not fresh:
        args = dict(cfg.corpus_args)
        args["seed"] = int(args.get("seed", 0)) + TEST_SEED_OFFSET
        fresh = build_corpus(cfg.corpus, **args).validation
    specs, val_spec = data_specs(cfg)
    seen = {_key(r) for recs in load_sources(specs).values() for r in recs}
    seen |= {_key(r) for r in load_records(val_spec)}
    out, kept = [], set()
    for r in load_records(SourceSpec(name="test", records=tuple(fresh))):
        if _key(r) not in seen and _key(r) not in kept:
            out.append(r)
            kept.add(_key(r))
    if not out:
        raise ConfigError("the held-out draw repeats the training data entirely; raise n_val.")
    return out


def write_example_folder(
    path: str | os.PathLike[str], corpus: str = "noisy", **corpus_args: Any
) -> Path:
    """A data folder as a user brings one, from an embedded corpus: one JSON Lines file per
    source, validation.jsonl without any record of the sources, test.jsonl (a fresh draw of the
    validation distribution without any record of the others, `heldout_records`) and
    manifest.json (what the corpus is)."""
    out = build_corpus(corpus, **corpus_args).write(path)
    cfg = TrainConfig(corpus=corpus, corpus_args=corpus_args)
    specs, val_spec = data_specs(cfg)
    seen = {_key(r) for recs in load_sources(specs).values() for r in recs}
    val = [r for r in load_records(val_spec) if _key(r) not in seen]
    write_jsonl(out / "validation.jsonl", val)  # a templated corpus repeats some records
    write_jsonl(out / "test.jsonl", heldout_records(cfg))
    return out


# ---------------------------------------------------------------- fine-tuning on a resampled set


class FineTune:
    """Plain fine-tuning of w on its one source (`plain_step`, weights fixed): a `loop.Method`
    without checkpoints (a fine-tuning is rerun, not resumed). `token_budget` sets its steps
    once the data is tokenized (`sft`)."""

    desc = "fine-tune"
    advice = "lr_w"
    learns_weights = False
    checkpoints = False

    def __init__(self, cfg: TrainConfig, accelerator: Any, token_budget: int | None = None):
        if accelerator.num_processes > 1:
            raise ConfigError(
                "sft fine-tunes in one process (its steps do not reduce gradients over ranks): "
                "run it with python -m scalebio_core sft …, not accelerate launch."
            )
        s = setup(cfg, accelerator, copies=1)
        steps = cfg.steps
        if token_budget:
            mean_len = float(np.mean([len(x) for x in s.train.input_ids]))
            steps = max(1, math.ceil(token_budget / (cfg.batch_size * mean_len)))
        self.setup, self.dist, self.total = s, s.dist, steps
        self.recorded_config = {**cfg.replace(steps=steps).to_dict(), "token_budget": token_budget}
        self.bcfg = dataclasses.replace(s.state.config, total_steps=steps)
        self.fns = lm_fns(s)
        self.one = torch.ones(1, device=s.device)
        self.seen = 0

    def step(self, t: int) -> tuple[dict, int]:
        s = self.setup
        batch = train_batch(s, t)
        with s.dist.autocast():
            m = plain_step(s.state.w, s.state.opt_w, batch, self.fns, self.one, self.bcfg, t)
        tokens = count_tokens(s, batch)
        self.seen += tokens
        return {"step": t, "loss": m["loss"], "lr_w": m["lr_w"], "tokens": self.seen}, tokens

    def weights(self) -> dict[str, float]:
        return {}

    def postfix(self, row: dict) -> str:
        return f"loss={row['loss']:.3f}"

    def save(self, run_dir: Path, weights: dict[str, float]) -> None:
        """Nothing: a fine-tuning keeps no checkpoint."""

    def load(self, run_dir: Path, accept_data_change: bool = False) -> tuple[int, dict]:
        return 0, {}


def is_sft_output(folder: Path) -> bool:
    """Whether `folder` holds a fine-tuning of `sft`: its config.yaml has sft's token_budget."""
    try:
        cfg = files.load_yaml((Path(folder) / runs.CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, not text, not YAML (ConfigError)
        return False
    return isinstance(cfg, dict) and "token_budget" in cfg


def check_sft_out(out: Path, data: Path, overwrite: bool) -> None:
    """Refuse an out folder of sft that holds files other than the data file (which may lie in
    it), unless it is an earlier output of sft and `overwrite` is given; say what it holds."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: choose another --out.")
    if not out.is_dir():
        return
    data = data.resolve()
    held = []
    for p in sorted(out.iterdir()):
        inner = sorted(p.iterdir()) if p.name == "data" and p.is_dir() else [p]
        for q in inner:
            if not q.name.startswith(files.TMP_PREFIX) and q.resolve() != data:
                held.append(q.relative_to(out).as_posix() + ("/" if q.is_dir() else ""))
    if not held:
        return  # new, empty, or holding only the data to fine-tune on
    shown = ", ".join(held[:10]) + (f", … ({len(held)} in all)" if len(held) > 10 else "")
    if not is_sft_output(out):
        raise ConfigError(
            f"--out {out} is not empty and is not an earlier output of sft: it holds {shown}. "
            "Nothing was written. Choose a new or empty folder (the resampled data file may lie "
            "in it); --overwrite replaces only sft's own earlier output."
        )
    if overwrite:
        return
    ours = ", ".join(f for f in held if f in SFT_FILES)
    state = (
        f"{out / EVAL} exists: this fine-tuning ran already"
        if (out / EVAL).exists()
        else f"{out} holds an unfinished fine-tuning of sft (no {EVAL})"
    )
    raise ConfigError(
        f"{state}; nothing was written. Pass --overwrite (overwrite=True in Python) to replace "
        f"that earlier output ({ours}; other files are kept), or choose another --out."
    )


def sft(
    cfg: TrainConfig,
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    token_budget: int | None = None,
    progress: bool = True,
    callback: Callback | None = None,
    overwrite: bool = False,
) -> dict:
    """Fine-tune a fresh `cfg.model` on a resampled JSON Lines file, then evaluate it.

    Plain training (the trainer's data path, `plain_step`, cfg's lr_w, schedule, batch size);
    `token_budget` sets the steps to ceil(budget / (batch_size · mean tokens per sample)) so that
    mixtures of long and short samples see the same number of tokens (in expectation). Writes
    config.yaml, trajectory.jsonl (tokens seen so far per step), timing.jsonl, data/validation.jsonl
    and eval.json (target loss, accuracy) into `out_dir` (`SFT_FILES`). `out_dir` must be new,
    empty (the data file may lie in it) or an earlier output of sft; that one is replaced only
    with `overwrite` (its other files are kept), never a folder of other files
    (`check_sft_out`). Records of the validation or the test set in `data` are warned of, with
    counts (`data.leaks`): the run's config names the test set (a data folder's test file too).
    """
    out = Path(out_dir)
    check_sft_out(out, Path(data), overwrite)
    if not Path(data).is_file():
        raise ConfigError(
            f"{data} does not exist: write it with `python -m scalebio_core resample` first."
        )
    check_grader(cfg.grader)  # before training: a grader that cannot run fails fast
    tests = heldout_records(cfg)  # likewise a missing test set
    _, val_spec = data_specs(cfg)
    test_spec = heldout_spec(cfg)  # named in the run's config: its records are checked for leaks
    test = cfg.test or (
        {"path": str(Path(test_spec.path).resolve())} if test_spec and test_spec.path else None
    )
    val_file = out / "data" / "validation.jsonl"
    run_cfg = cfg.replace(
        method="sft",
        sources=[{"name": "train", "path": str(Path(data).resolve())}],
        validation={"path": str(val_file)},
        data_dir=None,
        test=test,
        sampler="union",
        estimator="expected",
        lisa_active=0,
        out_dir=str(out),
    )
    built: list[FineTune] = []

    def build(c: TrainConfig, accelerator: Any) -> FineTune:
        """Once the folder is locked: clear an earlier fine-tuning (overwrite), then write
        config.yaml first, so that one stopped at any point is recognised as sft's (the run
        rewrites it once the token budget has set the steps), and the validation set."""
        for f in (EVAL, runs.TIMING, runs.TRAJECTORY):
            (out / f).unlink(missing_ok=True)
        files.write_yaml(out / runs.CONFIG, {**c.to_dict(), "token_budget": token_budget})
        write_jsonl(val_file, load_records(val_spec))
        built.append(FineTune(c, accelerator, token_budget))
        return built[-1]

    # the run of every method: its lock, its folder's files, signals, the NaN stop
    loop.run(run_cfg, build, progress=progress, callback=callback, fresh=True)
    method = built[-1]
    s, steps = method.setup, method.total
    rules = data_rules(cfg)
    result = evaluate(
        s.state.w, s.tokenizer, tests, s.cfg.max_length, checkable(cfg, tests), rules, cfg.grader
    )
    result.update({"steps": steps, "tokens": method.seen, "data": str(data), "seed": run_cfg.seed})
    if method.dist.is_main:
        files.write_json(out / EVAL, result)
    return result
