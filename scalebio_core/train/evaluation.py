"""How well a model answers a held-out target set, and whether it can see what sources differ in.

    evaluate(...)     target loss; exact-match accuracy where the answers are checkable
                      ("The answer is N.", \\boxed{N}, a terse answer: `checkable`)
    model_sight(s)    what a run on your data can tell about its model (said with the verdict)

Used by `pipeline.sft` (the fine-tuned model on the test set) and by the ScaleBiO run's end
(`trainer.ScaleBiORun.sight`), so it imports neither.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..sources.corpora import extract_answer
from ..sources.data import DROP_REASONS, load_records, tokenize
from ..sources.sampling import collate
from .build import data_rules, data_specs
from .losses import per_sample_loss

CHECKABLE_CORPORA = ("instruction", "noisy", "informative", "math")
SHORT_WORDS, SHORT_CHARS = 4, 40
SIGHT_RECORDS = 100
"""Target records a run on your data answers at its end (`model_sight`)."""
CHANCE_MARGIN = 0.05


def short_answers(records: Sequence[dict], share: float = 0.9) -> bool:
    """Whether at least `share` of the records' responses end in a short answer that a grader
    can check: "The answer is N.", \\boxed{N}, a letter, a number, a few words (at most
    SHORT_WORDS words and SHORT_CHARS characters after `extract_answer`)."""
    if not records:
        return False
    answers = [extract_answer(r["response"]) for r in records]
    short = [0 < len(a) <= SHORT_CHARS and len(a.split()) <= SHORT_WORDS for a in answers]
    return sum(short) >= share * len(records)


def checkable(cfg, records: Sequence[dict] | None = None) -> bool:
    """Whether the target set's answers can be checked by exact match: exact_match 'on' or
    'off'; 'auto': the templated corpora, and data of your own (data_dir, sources, test) whose
    held-out `records` end in short answers (`short_answers`)."""
    if cfg.exact_match != "auto":
        return cfg.exact_match == "on"
    if cfg.sources or cfg.data_dir or cfg.test:
        return records is not None and short_answers(records)
    return cfg.corpus in CHECKABLE_CORPORA


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def target_loss(model, data, pad_id: int, batch_size: int = 32) -> float:
    """Mean per-sample loss (response tokens) over a tokenized set, in eval mode."""
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


def check_grader(grader: str) -> None:
    """Refuse, before anything trains, a grader that is unknown or whose package is missing."""
    if grader not in ("exact", "math-verify"):
        raise ConfigError(f"unknown grader {grader!r}: use 'exact' or 'math-verify'")
    if grader == "math-verify" and importlib.util.find_spec("math_verify") is None:
        raise ConfigError(
            "grader: math-verify needs the math-verify package: pip install "
            "'scalebio_core[math]' (or grader: exact, the final answers compared as text)."
        )


def grade(answer: str, expected: str, grader: str = "exact") -> bool:
    """Whether a generated answer matches the expected one.

    "exact": the final answers (`extract_answer`: the text after "The answer is", else the last
    \\boxed{}, else the whole stripped text) are equal strings. "math-verify": the
    `math-verify` package extracts the final answer of each (\\boxed{}, LaTeX or a plain
    expression) and compares them as sympy expressions, so "72", "$72$" and "\\boxed{72.0}"
    agree; the expected answer is parsed first and an answer it cannot parse counts as wrong.
    """
    if grader == "exact":
        return extract_answer(answer) == extract_answer(expected)
    check_grader(grader)
    from math_verify import parse, verify  # lazy: sympy and antlr load in seconds

    gold = parse(extract_answer(expected))
    if not gold:
        raise DataError(
            f"math-verify cannot parse the expected answer {expected[-80:]!r}: the test set's "
            "answers must end in a number or expression (e.g. 'The answer is 72.' or \\boxed{72})"
        )
    return bool(verify(gold, parse(answer)))


def evaluate(
    model,
    tokenizer,
    records: list[dict],
    max_length: int,
    exact_match: bool,
    rules: dict | None = None,
    grader: str = "exact",
) -> dict:
    """Target loss on `records`; accuracy of greedy answers when `exact_match`, checked by
    `grade(answer, expected, grader)`.

    `rules` (strict, max_drop_share, truncate_prompts) as the run's data: records without
    response tokens are dropped and counted in "dropped", or refused (`data.tokenize`); by
    default each must count.
    """
    data = tokenize({"test": records}, tokenizer, max_length, **(rules or {}))
    counts = data.dropped.get("test", {})
    dropped = sum(counts.get(k, 0) for k in DROP_REASONS)
    if exact_match and counts.get("prompt that fills max_length", 0):
        raise DataError(
            f"the test set: {counts['prompt that fills max_length']} prompts fill max_length = "
            f"{max_length}, so their answers cannot be graded; raise max_length or set "
            "truncate_prompts: true."
        )
    records = [r for r in records if r["response"].strip()]  # those tokenize kept
    out: dict[str, Any] = {
        "n_test": len(records),
        "dropped": dropped,
        "target_loss": target_loss(model, data, tokenizer.pad_token_id),
    }
    if exact_match:
        longest = max(int((lab != -100).sum()) for lab in data.labels)
        answers = greedy_answers(model, tokenizer, data, max_new_tokens=longest + 4)
        hits = [grade(a, r["response"], grader) for a, r in zip(answers, records, strict=True)]
        out["accuracy"] = float(np.mean(hits))
        out["grader"] = grader
        out["examples"] = [
            {"prompt": r["prompt"][-80:], "expected": r["response"], "answer": a}
            for a, r in list(zip(answers, records))[:5]
        ]
    return out


# ---------------------------------------------------------------- can the model see it?


def model_sight(s: Any) -> dict | None:
    """What a run on your data (data_dir, sources) can tell about its model, said with the
    verdict: None for the embedded corpora.

    - `note`, for a randomly initialised embedded model: it learns only from these records, so
      it separates sources by their form (language, format, length), not by correctness.
    - Where the target's answers are checkable (`checkable`): w answers up to SIGHT_RECORDS
      target records greedily; its accuracy is set against chance, the share of the most common
      answer (what always giving one answer scores). At chance, the model cannot tell a right
      answer from a wrong one, so weights on correctness would be noise. w was trained on the
      target set, so this accuracy is an upper bound on what the model can do there.
    Single-process runs only (a sharded w cannot generate from one process)."""
    cfg = s.cfg
    if not (cfg.data_dir or cfg.sources):
        return None
    fix = "use a pretrained model: model=gpt2 (or a hub name, or a folder with a model)"
    out: dict[str, Any] = {"model": cfg.model, "notes": [], "blind": False}
    if str(cfg.model).startswith("embedded"):
        out["blind"] = True
        out["notes"].append(
            f"the model ({cfg.model}) is randomly initialised and learns only from these "
            "records: it can separate sources by form (language, format, length), not by "
            "correctness"
        )
    _, val_spec = data_specs(cfg)
    records = load_records(val_spec)
    if s.dist.world == 1 and checkable(cfg, records):  # judged on the whole target set
        records = records[:SIGHT_RECORDS]
        try:
            result = evaluate(
                s.state.w, s.tokenizer, records, cfg.max_length, True, data_rules(cfg), cfg.grader
            )
        except (DataError, ConfigError) as e:  # the run is done; say why there is no accuracy
            result = None
            out["notes"].append(f"target accuracy not measured: {e}")
        if result is not None:
            answers = [extract_answer(r["response"]) for r in records if r["response"].strip()]
            chance = max(answers.count(a) for a in set(answers)) / len(answers)
            acc = result["accuracy"]
            out |= {"accuracy": acc, "chance": chance, "n": result["n_test"]}
            said = (
                f"the trained model (w) answers {acc:.0%} of {result['n_test']} target "
                f"questions (grader {cfg.grader}); always giving the most common answer "
                f"scores {chance:.0%}"
            )
            if acc <= chance + CHANCE_MARGIN:
                out["blind"] = True
                said += ": at chance, so it cannot tell a right answer from a wrong one"
            out["notes"].append(said)
    if out["blind"]:
        out["notes"].append(f"for weights that reflect correctness, {fix}")
    return out if out["notes"] else None
