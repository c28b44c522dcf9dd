"""From weights to a trained model: baseline runs, resampling, fine-tuning, evaluation.

    run_baseline(cfg)    uniform / natural / validation-only / DoReMi into a run directory
    resample(...)        N examples drawn from the sources by the learned weights
    sft(cfg, data, ...)  plain fine-tuning of a fresh model on them (the trainer, weights fixed)
    evaluate(...)        target loss on a held-out target set; exact-match accuracy where the
                         answers are checkable ("The answer is N." or a terse answer)

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import runs
from .baselines import VALIDATION, DoReMiConfig, doremi_step, fixed_weights, plain_step
from .bilevel import ConfigError, NonFiniteLossError

FIXED = ("uniform", "natural", "validation")
CHECKABLE_CORPORA = ("instruction", "noisy", "informative", "math")
TEST_SEED_OFFSET = 7919  # the held-out draw's corpus seed: seed + this
EVAL = "eval.json"
RESAMPLED = "resampled.jsonl"


def expected_rows(cfg) -> int:
    """Rows of a finished run's trajectory.jsonl."""
    if cfg.method in FIXED:
        return 1
    if cfg.method == "doremi":
        return (cfg.doremi_ref_steps or cfg.steps) + cfg.steps
    return cfg.steps


# ---------------------------------------------------------------- baselines as runs


def run_baseline(cfg, resume: bool = False, progress: bool = True, callback=None) -> dict:
    """Run a baseline into cfg.out_dir (config.yaml, trajectory.jsonl, weights.json)."""
    if cfg.method in FIXED:
        return _fixed_run(cfg)
    if cfg.method == "doremi":
        return _doremi_run(cfg, resume, progress, callback)
    raise ConfigError(f"{cfg.method!r} is not a baseline; baselines: {(*FIXED, 'doremi')}.")


def _fixed_run(cfg) -> dict:
    from .data import load_sources
    from .trainer import _prepare_run_dir, data_specs

    run_dir = _prepare_run_dir(cfg, resume=False)
    specs, _ = data_specs(cfg)
    sizes = {n: len(r) for n, r in load_sources(specs).items()}
    weights = fixed_weights(cfg.method, sizes)
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_yaml(run_dir / runs.CONFIG, cfg.to_dict())
        runs.write_text(
            run_dir / runs.TRAJECTORY,
            json.dumps({"step": 0, "method": cfg.method, "p": weights, "sizes": sizes}) + "\n",
        )
        runs.write_json(run_dir / runs.WEIGHTS, weights)
    return weights


def _doremi_run(cfg, resume: bool, progress: bool, callback) -> dict:
    """Reference on the uniform mixture (u), then the proxy with Group DRO weights (w)."""
    from .trainer import (
        LMFns,
        TrainingStopped,
        _all_reduce_grads,
        _batches,
        open_run,
        save_checkpoint,
    )

    # w: the proxy, u: the reference
    s, run_dir, start = open_run(cfg, resume, weights=None)
    accelerator, main = s.accelerator, s.accelerator.is_main_process
    n_ref = cfg.doremi_ref_steps or cfg.steps
    total = n_ref + cfg.steps
    traj = runs.JsonlLog(run_dir / runs.TRAJECTORY)
    seen = [r["p"] for r in runs.read_jsonl(run_dir / runs.TRAJECTORY) if r["phase"] == "proxy"]
    proxy_ps = [[r[n] for n in s.names] for r in seen]

    def averaged() -> dict[str, float]:
        if not proxy_ps:
            return dict.fromkeys(s.names, 1.0 / len(s.names))
        return dict(zip(s.names, np.mean(proxy_ps, axis=0).tolist()))

    fns = LMFns(cfg.val_dropout, val_scale=1.0 / accelerator.num_processes)
    multi = accelerator.num_processes > 1
    kw = {
        "divisor": None if s.divisor is None else s.divisor.to(s.device),
        "reduce": s.reduce if multi else None,
        "sync": _all_reduce_grads if multi and not s.sharded else None,  # FSDP reduces its own
    }
    ref_cfg = dataclasses.replace(s.state.config, total_steps=n_ref)
    dcfg: DoReMiConfig = cfg.doremi()
    uniform = torch.full((len(s.names),), 1.0 / len(s.names), device=s.device)
    bar = tqdm(
        range(start, total),
        initial=start,
        total=total,
        desc="DoReMi",
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    for t in bar:
        ref = t < n_ref
        phase = "reference" if ref else "proxy"
        batch = _batches(s, s.train, s.sampler.indices(t), cfg.grad_accum)
        model, opt = (s.state.u, s.state.opt_u) if ref else (s.state.w, s.state.opt_w)
        if s.lisa:
            s.lisa[1 if ref else 0].apply(t, opt)
        try:
            with accelerator.autocast():
                if ref:
                    m = plain_step(model, opt, batch, fns, uniform, ref_cfg, t, **kw)
                else:
                    s.state.u.eval()  # the reference is fixed: no dropout in its losses
                    p = torch.softmax(s.state.lam.detach(), 0).to(s.device)
                    p_new, m = doremi_step(
                        model, s.state.u, opt, p, batch, fns, s.state.config, dcfg, t - n_ref, **kw
                    )
                    with torch.no_grad():
                        s.state.lam.copy_(torch.log(p_new).to(s.state.lam))
        except NonFiniteLossError as e:
            save_checkpoint(s, run_dir, weights=averaged())
            raise TrainingStopped(
                f"{e}\nDoReMi stopped at step {t} ({phase}); the last good state is saved in "
                f"{run_dir / runs.CHECKPOINT}. Resume with --resume after lowering lr_w."
            ) from e
        s.state.step = t + 1
        tokens = int(s.reduce(torch.tensor(float(sum(b["attention_mask"].sum() for b in batch)))))
        row = {
            "step": t,
            "phase": phase,
            "p": dict(zip(s.names, m["p"])),
            "loss": m["loss"],
            "loss_w": dict(zip(s.names, m["loss_w"])),
            "excess": dict(zip(s.names, m.get("excess", [0.0] * len(s.names)))),
            "lr_w": m["lr_w"],
            "tokens": tokens,
        }
        if not ref:
            proxy_ps.append(m["p"])
        if main:
            traj.append(row)
        if (t + 1) % cfg.checkpoint_every == 0 or t + 1 == total:
            save_checkpoint(s, run_dir, weights=averaged())
        if progress:
            bar.set_postfix_str(f"{phase} loss={m['loss']:.3f}")
        if callback is not None:
            callback(row, s)
    weights = averaged()
    if main:
        runs.write_json(run_dir / runs.WEIGHTS, weights)
    accelerator.wait_for_everyone()
    return weights


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
    for name, count in zip(weights, _largest_remainder(w, n)):
        pool = pools[name]
        if count == 0:
            continue
        if not pool:
            raise ConfigError(f"source {name!r} has weight but no records.")
        idx = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-count // len(pool)))])
        out.extend({**pool[i], "source": name} for i in idx[:count].tolist())
    if add_validation:
        if validation is None:
            raise ConfigError("add_validation needs the validation records.")
        out.extend({**r, "source": VALIDATION} for r in validation)
    return [out[i] for i in rng.permutation(len(out)).tolist()]


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    runs.write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return Path(path)


def resample_run(
    run_dir: str | os.PathLike[str],
    n: int,
    out: str | os.PathLike[str] | None = None,
    seed: int = 0,
    add_validation: bool = False,
    weights: Mapping[str, float] | None = None,
) -> Path:
    """Resample the sources of a run (its config.yaml) with its weights.json; write JSON Lines."""

    from .data import load_records, load_sources
    from .trainer import TrainConfig, data_specs

    run_dir = Path(run_dir)
    needed = [runs.CONFIG] + ([runs.WEIGHTS] if weights is None else [])
    for missing in [run_dir / f for f in needed if not (run_dir / f).exists()]:
        raise ConfigError(f"{missing} does not exist: give a finished run directory.")
    cfg = TrainConfig.from_dict(runs.load_yaml((run_dir / runs.CONFIG).read_text()))
    if weights is None:
        weights = json.loads((run_dir / runs.WEIGHTS).read_text())
    specs, val_spec = data_specs(cfg)
    rows = resample(
        weights,
        load_sources(specs),
        n,
        seed=seed,
        validation=load_records(val_spec),
        add_validation=add_validation,
    )
    return write_jsonl(Path(out) if out else run_dir / RESAMPLED, rows)


# ---------------------------------------------------------------- the held-out target set


def _key(r: dict) -> tuple[str, str]:
    return (r["prompt"], r["response"])


def heldout_records(cfg) -> list[dict]:
    """The held-out target set: `cfg.test`, or a fresh draw of an embedded corpus's validation
    distribution without any record of the training sources or the validation set."""
    from .corpora import build_corpus
    from .data import SourceSpec, load_records, load_sources
    from .trainer import data_specs

    if cfg.test:
        return load_records(SourceSpec(**{"name": "test", **cfg.test}))
    if cfg.sources or cfg.data_dir:
        raise ConfigError(
            "no held-out test set: set test: {path: …} (or hf_name: …) in the config; the "
            "validation set steered the weights and cannot measure them."
        )
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


def checkable(cfg) -> bool:
    """Whether the target set's answers can be checked by exact match."""
    if cfg.exact_match != "auto":
        return cfg.exact_match == "on"
    return not (cfg.sources or cfg.data_dir or cfg.test) and cfg.corpus in CHECKABLE_CORPORA


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def target_loss(model, data, pad_id: int, batch_size: int = 32) -> float:
    """Mean per-sample loss (response tokens) over a tokenized set, in eval mode."""
    from .data import collate
    from .trainer import per_sample_loss

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    try:
        for i in range(0, len(data), batch_size):
            b = collate(data, range(i, min(i + batch_size, len(data))), pad_id)
            b = {k: v.to(device) for k, v in b.items()}
            total += float(per_sample_loss(model, b).sum())
    finally:
        model.train(was)
    return total / len(data)


@torch.no_grad()
def greedy_answers(model, tokenizer, data, max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy continuations of each sample's prompt (left-padded batches), decoded to text."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = [ids[lab == -100] for ids, lab in zip(data.input_ids, data.labels)]
    limit = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", 10**9
    )
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            t = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), t), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), t), dtype=torch.long)
            for r, p in enumerate(chunk):
                ids[r, t - len(p) :] = p
                mask[r, t - len(p) :] = 1
            new = max(1, min(max_new_tokens, limit - t))
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )[:, t:]
            for row in gen.tolist():
                row = row[: row.index(eos)] if eos in row else row
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was)
    return out


def evaluate(model, tokenizer, records: list[dict], max_length: int, exact_match: bool) -> dict:
    """Target loss on `records`; exact-match accuracy of greedy answers when `exact_match`."""
    from .corpora import extract_answer
    from .data import tokenize

    data = tokenize({"test": records}, tokenizer, max_length)
    out: dict[str, Any] = {
        "n_test": len(records),
        "target_loss": target_loss(model, data, tokenizer.pad_token_id),
    }
    if exact_match:
        longest = max(int((lab != -100).sum()) for lab in data.labels)
        answers = greedy_answers(model, tokenizer, data, max_new_tokens=longest + 4)
        hits = [
            extract_answer(a) == extract_answer(r["response"])
            for a, r in zip(answers, records, strict=True)
        ]
        out["accuracy"] = float(np.mean(hits))
        out["examples"] = [
            {"prompt": r["prompt"][-80:], "expected": r["response"], "answer": a}
            for a, r in list(zip(answers, records))[:5]
        ]
    return out


# ---------------------------------------------------------------- fine-tuning on a resampled set


def sft(
    cfg,
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    token_budget: int | None = None,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
) -> dict:
    """Fine-tune a fresh `cfg.model` on a resampled JSON Lines file, then evaluate it.

    Plain training (the trainer's data path, `plain_step`, cfg's lr_w, schedule, batch size);
    `token_budget` sets the steps to ceil(budget / (batch_size · mean tokens per sample)) so that
    mixtures of long and short samples see the same number of tokens (in expectation). Writes
    config.yaml, trajectory.jsonl and eval.json (target loss, accuracy) into `out_dir`; an
    existing eval.json is never overwritten (choose another out_dir).
    """
    from .data import load_records
    from .trainer import _batches, data_specs, make_accelerator, setup

    out = Path(out_dir)
    if (out / EVAL).exists():
        raise ConfigError(
            f"{out / EVAL} exists: this fine-tuning ran already; choose another "
            "out_dir (or delete the folder to rerun it)."
        )
    if not Path(data).is_file():
        raise ConfigError(
            f"{data} does not exist: write it with `python -m scalebio_core resample` first."
        )
    tests = heldout_records(cfg)  # before training: a missing test set fails fast
    _, val_spec = data_specs(cfg)
    val_file = write_jsonl(out / "data" / "validation.jsonl", load_records(val_spec))
    run_cfg = dataclasses.replace(
        cfg,
        method="scalebio",
        sources=[{"name": "train", "path": str(Path(data).resolve())}],
        validation={"path": str(val_file)},
        data_dir=None,
        sampler="union",
        estimator="expected",
        lisa_active=0,
        out_dir=str(out),
    )
    accelerator = make_accelerator(run_cfg)
    torch.manual_seed(run_cfg.seed)
    if accelerator.num_processes > 1:
        raise ConfigError(
            "sft fine-tunes in one process (its steps do not reduce gradients over ranks): run "
            "it with python -m scalebio_core sft …, not accelerate launch."
        )
    s = setup(run_cfg, accelerator, copies=1)
    steps = run_cfg.steps
    if token_budget:
        mean_len = float(np.mean([len(x) for x in s.train.input_ids]))
        steps = max(1, math.ceil(token_budget / (run_cfg.batch_size * mean_len)))
    run_cfg = dataclasses.replace(run_cfg, steps=steps)
    bcfg = dataclasses.replace(s.state.config, total_steps=steps)
    main = accelerator.is_main_process
    if main:
        runs.write_yaml(out / runs.CONFIG, {**run_cfg.to_dict(), "token_budget": token_budget})
        (out / runs.TRAJECTORY).write_text("")
    traj = runs.JsonlLog(out / runs.TRAJECTORY)
    from .trainer import LMFns

    fns = LMFns()
    one = torch.ones(1, device=s.device)
    seen = 0
    for step in tqdm(range(steps), desc="fine-tune", disable=not (progress and main)):
        batch = _batches(s, s.train, s.sampler.indices(step), run_cfg.grad_accum)
        with accelerator.autocast():
            m = plain_step(s.state.w, s.state.opt_w, batch, fns, one, bcfg, step)
        seen += int(sum(b["attention_mask"].sum() for b in batch))
        row = {"step": step, "loss": m["loss"], "lr_w": m["lr_w"], "tokens": seen}
        if main:
            traj.append(row)
        if callback is not None:
            callback(row)
    result = evaluate(s.state.w, s.tokenizer, tests, run_cfg.max_length, checkable(cfg))
    result.update({"steps": steps, "tokens": seen, "data": str(data), "seed": run_cfg.seed})
    if main:
        runs.write_json(out / EVAL, result)
    return result
