"""A folder of the user's own data, or a few loss functions of their own (issue 15): defaults
chosen for the model and the data, the roles of a folder's files, a verdict, and `solve` with no
learning rate to choose."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_rundirs import _alpaca_folder

from scalebio_core import BilevelConfig, BilevelProblem, solve
from scalebio_core.core import toy
from scalebio_core.errors import ConfigError, DataError
from scalebio_core.plan.memory import setup_of
from scalebio_core.sources.data import (
    AUTO_MAX_LENGTH,
    auto_max_length,
    folder_roles,
    specs_from_dir,
)
from scalebio_core.train.build import build_data, heldout_spec
from scalebio_core.train.config import EMBEDDED_LR, PRETRAINED_LR, TrainConfig
from scalebio_core.train.convergence import convergence
from scalebio_core.train.models import load_model, load_tokenizer
from scalebio_core.train.pipeline import evaluate
from scalebio_core.train.runs import load_trajectory

ROOT = Path(__file__).resolve().parent.parent


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _records(verb: str, n: int, words: int = 3) -> list[dict]:
    vocab = "river stone light paper garden window music number winter market".split()
    return [
        {
            "instruction": f"{verb} {i}: " + " ".join(vocab[(i + k) % 10] for k in range(words)),
            "output": vocab[i % 10],
        }
        for i in range(n)
    ]


# ------------------------------------------------------------------ one command, defaults


def test_learning_rates_default_by_model_and_a_given_rate_is_kept():
    assert TrainConfig(model="embedded:tiny").bilevel.lr_w == EMBEDDED_LR
    assert TrainConfig(model="embedded:nano").bilevel.lr_u == EMBEDDED_LR
    assert TrainConfig(model="gpt2").bilevel.lr_w == PRETRAINED_LR
    assert TrainConfig(model="gpt2").bilevel.lr_u == PRETRAINED_LR
    given = TrainConfig(model="embedded:tiny", lr_w=5e-4)
    assert (given.bilevel.lr_w, given.bilevel.lr_u) == (5e-4, EMBEDDED_LR)
    round_trip = TrainConfig.from_dict(TrainConfig(model="gpt2").to_dict())
    assert round_trip.bilevel.lr_w == PRETRAINED_LR  # a run's config.yaml keeps its rates


def test_two_sources_and_held_out_sets_run_with_defaults_through_the_cli(tmp_path):
    """Acceptance: two sources plus validation.jsonl and test.jsonl, one command; the sources
    are exactly the two, the start table (test set included) is printed, a verdict ends it."""
    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "alpha.jsonl", _records("Repeat", 30))
    _jsonl(data / "beta.jsonl", _records("Spell", 30, words=12))
    _jsonl(data / "validation.jsonl", _records("Say", 12))
    _jsonl(data / "test.jsonl", _records("Tell", 10))
    run = tmp_path / "run"
    args = [f"data_dir={data}", f"out_dir={run}", "model=embedded:nano", "steps=3"]
    out = subprocess.run(
        [sys.executable, "-m", "scalebio_core", "train", *args, "batch_size=4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert load_trajectory(run)["names"] == ["alpha", "beta"]
    lines = out.stderr.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith("source "))
    assert [x.split()[0] for x in lines[head + 1 : head + 5]] == [
        "alpha",
        "beta",
        "validation",
        "test",
    ]
    assert lines[head + 4].split()[1] == str(data / "test.jsonl")
    chosen = next(x for x in lines if x.startswith("max_length = "))
    assert "(auto: the 95th percentile of 82 records' token lengths is" in chosen
    assert "too short: 3 steps are too few to judge" in out.stderr
    verdict = json.loads((run / "verdict.json").read_text())
    assert verdict["verdict"] == "too short"
    cfg = (run / "config.yaml").read_text()
    assert f"lr_w: {EMBEDDED_LR}" in cfg and "max_length: auto" in cfg


def test_alpaca_warts_run_with_default_settings_and_say_what_was_dropped(tmp_path):
    """Acceptance: empty outputs and a very long prompt, no settings beyond the folder: the
    long prompt lies far beyond the chosen max_length and is dropped, as are the empty outputs,
    and the warnings say so per source."""
    data = _alpaca_folder(tmp_path / "data")
    cfg = TrainConfig(
        data_dir=str(data), model="embedded:nano", steps=2, batch_size=4, out_dir=str(tmp_path)
    )
    tok = load_tokenizer("embedded", vocab_size=cfg.vocab_size)
    with pytest.warns(UserWarning) as seen:
        built = build_data(cfg, tok)
    said = " ".join(str(w.message) for w in seen)
    n = built.cfg.max_length
    assert 16 <= n < 200 and n % 16 == 0
    assert (
        f"source 'a': dropped 1 of 40 records (1 with an empty response; max_length = {n})" in said
    )
    b = "source 'b': dropped 1 of 40 records (1 with a prompt that fills max_length; "
    assert b + f"max_length = {n})" in said
    assert "source 'validation': dropped 1 of 20" in said
    assert built.table.splitlines()[-1].startswith(f"max_length = {n} (auto")


def test_auto_max_length_rounds_up_and_is_capped_by_the_model(tmp_path):
    tok = load_tokenizer("embedded", vocab_size=2048)
    short = {"a": [{"prompt": "one two ", "response": "three"} for _ in range(50)]}
    n, why = auto_max_length(short, tok, context=1024)
    assert n == 16 and "the 95th percentile of 50 records' token lengths" in why
    text = " ".join(["river stone light paper"] * 200)
    long = {"a": [{"prompt": "", "response": text}] * 10}
    n, why = auto_max_length(long, tok, context=256)
    assert n == 256 and "capped at the model's context, 256" in why
    n, _ = auto_max_length(long, tok, context=None)
    assert n <= AUTO_MAX_LENGTH
    cfg = TrainConfig(model="embedded:nano")
    with pytest.raises(ConfigError, match=r"max_length is 'auto'.*--max-length N"):
        setup_of(cfg, 1)
    assert setup_of(cfg.replace(max_length=128), 1).seq == 128
    with pytest.raises(ConfigError, match="max_length must be a whole number >= 2 or 'auto'"):
        TrainConfig(max_length="long")


# ------------------------------------------------------------------ the roles of a folder's files


def test_a_manifest_names_the_roles_and_a_name_that_could_be_either_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("alpaca_test.jsonl", "gpt4.jsonl", "target.jsonl", "exam.jsonl"):
        _jsonl(data / name, _records("Say", 4))
    with pytest.raises(DataError, match=r"alpaca_test.jsonl: the name could be a held-out set"):
        specs_from_dir(data)
    manifest = {
        "name": "mine",
        "roles": {"sources": ["alpaca_test.jsonl", "gpt4.jsonl"], "validation": "target.jsonl"},
    }
    (data / "manifest.json").write_text(json.dumps({**manifest}))
    roles = folder_roles(data)
    assert [f.name for f in roles.sources] == ["alpaca_test.jsonl", "gpt4.jsonl"]
    assert roles.validation == data / "target.jsonl" and roles.test is None
    assert roles.skipped == ("exam.jsonl",)
    manifest["roles"]["test"] = "exam.jsonl"
    (data / "manifest.json").write_text(json.dumps(manifest))
    cfg = TrainConfig(data_dir=str(data))
    assert heldout_spec(cfg).path == str(data / "exam.jsonl")
    with pytest.warns(UserWarning, match="exam.jsonl, target.jsonl held out"):
        assert [s.name for s in specs_from_dir(data)] == ["alpaca_test", "gpt4"]
    for bad, message in (
        ({"sources": ["nope.jsonl"]}, r"roles name files that are not in"),
        ({"sources": ["gpt4.jsonl"], "test": "gpt4.jsonl"}, r"given two roles"),
        ({"validation": "target.jsonl"}, r"roles must read"),
    ):
        (data / "manifest.json").write_text(json.dumps({"roles": bad}))
        with pytest.raises(DataError, match=message):
            folder_roles(data)


# ------------------------------------------------------------------ the verdict


def test_a_still_gradient_under_a_decayed_rate_is_not_called_converged():
    """p stops moving because lr_lam decayed, while λ's gradient keeps one sign: drifting."""
    rng = np.random.default_rng(0)
    n, rows = 200, []
    for i in range(n):
        q = 0.6 + 0.2 * (1 - 0.97**i)
        lw = [1.0 + 0.01 * rng.normal(), 1.2 + 0.01 * rng.normal()]  # w fits a better than u
        rows.append(
            {
                "step": i,
                "p": {"a": q, "b": 1 - q},
                "loss_w": lw,
                "loss_u": [1.1, 1.1],
                "alpha": 10.0,
                "lr_lam": 0.01 * 0.5 * (1 + np.cos(np.pi * i / n)),
            }
        )
    v = convergence(rows)
    assert v["verdict"] == "drifting" and v["lam_grad_drift"] > 3, v
    assert "lr_lam fell to" in v["text"] and "points one way" in v["text"]
    for r in rows:  # the same path, with a gradient that is noise around 0: settled
        r["loss_w"] = [1.1 + 0.01 * rng.normal(), 1.1 + 0.01 * rng.normal()]
    v = convergence(rows)
    assert v["verdict"] == "settled" and "no steady direction" in v["text"], v


# ------------------------------------------------------------------ your own problem


def _points_problem(target) -> tuple[BilevelProblem, np.ndarray]:
    """The README's problem: each source's optimum a point; the target's optimum `target`."""
    c = {"near": [1.0, 0.0], "also_near": [0.0, 1.0], "far": [-3.0, -3.0]}
    pts = torch.tensor(list(c.values()), dtype=torch.float64)
    t = torch.as_tensor(target, dtype=torch.float32)
    problem = BilevelProblem(
        sources={
            n: (lambda v: lambda th: ((th - v) ** 2).sum())(torch.tensor(v)) for n, v in c.items()
        },
        val_loss=lambda th: ((th - t) ** 2).sum(),
        init=torch.zeros(2),
    )
    f = lambda p: ((p @ pts - t.double()) ** 2).sum()  # noqa: E731
    return problem, toy.minimize_on_simplex(f, 3)[0]


def test_a_hand_picked_rate_collapses_and_is_warned_of_and_solve_alone_does_not():
    problem, p_star = _points_problem([0.8, 0.8])  # outside the hull: p* = (0.5, 0.5, 0)
    cfg = BilevelConfig(
        alpha=10, optimizer="sgd", lr_w=0.02, lr_u=0.02, lr_lam=1.0, weight_decay=0.0,
        total_steps=1500,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"p collapsed onto the boundary of the simplex: 'near'"):
        bad = solve(problem, cfg)
    assert max(bad.weights.values()) > 0.99 and bad.warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good = solve(problem)
    assert good.warning is None
    assert np.abs(np.array(list(good.weights.values())) - p_star).max() < 1e-3


def _random_instance(family: str, rng: np.random.Generator):
    """A random instance of a toy family (its size, points, targets, κ drawn from `rng`) and its
    exact weights p* (`toy.minimize_on_simplex`, or the family's own exact answer)."""
    seed = int(rng.integers(1000))
    if family == "least_squares":
        k = int(rng.integers(3, 6))
        prob = toy.least_squares(
            k=k,
            d=int(rng.integers(k, 9)),
            shift=tuple(rng.uniform(0.1, 1.0, k)),
            noise=tuple(rng.uniform(0.05, 1.0, k)),
            seed=seed,
        )
        return prob.as_problem(), prob.exact()[0]
    if family == "weighted_mean":
        k = int(rng.integers(3, 7))
        prob, p_star = toy.weighted_mean(
            k=k,
            d=int(rng.integers(k - 1, 8)),
            support=int(rng.integers(2, k)),
            distance=float(rng.uniform(0.5, 2.0)),
            seed=seed,
        )
        return prob.as_problem(), p_star
    if family == "conditioned_quadratic":
        prob = toy.conditioned_quadratic(
            k=int(rng.integers(3, 6)),
            d=int(rng.integers(4, 12)),
            kappa=float(rng.uniform(2.0, 50.0)),
            seed=seed,
        )
        return prob.as_problem(), prob.exact()[0]
    return _points_problem(rng.uniform(0.2, 1.2, 2))  # float32, target in or out of the hull


FAMILIES = ["least_squares", "weighted_mean", "conditioned_quadratic", "points"]


@pytest.mark.parametrize("family", FAMILIES)
def test_solve_without_learning_rates_reaches_the_exact_weights_of_random_instances(family):
    rng = np.random.default_rng([2026, FAMILIES.index(family)])  # a fixed draw: reproducible
    problem, p_star = _random_instance(family, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no collapse warning either
        result = solve(problem)
    p = np.array([result.weights[n] for n in problem.names])
    assert np.abs(p - p_star).max() < 1e-3, (family, p.round(5), np.round(p_star, 5))


def test_the_test_set_follows_the_runs_rules_for_records_without_response_tokens():
    tok = load_tokenizer("embedded", vocab_size=2048)
    model = load_model("embedded:nano", vocab_size=len(tok), seed=0)
    records = [{"prompt": f"Say {i}: ", "response": "river"} for i in range(30)]
    records[4] = {"prompt": "Say 4: ", "response": " "}
    with pytest.raises(DataError, match="strict_data is on"):
        evaluate(model, tok, records, 32, False, {"strict": True, "max_drop_share": 0.05})
    lenient = {"strict": False, "max_drop_share": 0.05, "truncate_prompts": False}
    result = evaluate(model, tok, records, 32, False, lenient)
    assert (result["n_test"], result["dropped"]) == (29, 1)
    for r in records[:3]:  # 4 of 30 is more than the 5% a run may drop
        r["response"] = ""
    with pytest.raises(DataError, match="more than max_drop_share = 5%"):
        evaluate(model, tok, records, 32, False, lenient)
