"""The planted mixture (issue 17): the corpus, the curves of each method's product, and the claim
that DoReMi's run does not depend on the planted mixture (notebook 10 shares it)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from scalebio_core.lab import planted
from scalebio_core.sources.corpora import PLANTED_STYLES, build_corpus, planted_weights
from scalebio_core.train import runs
from scalebio_core.train.convergence import convergence


def test_the_validation_set_follows_the_planted_mixture_exactly_and_the_sources_share_prompts():
    c = build_corpus("planted", mixture=(0.5, 0.3, 0.2, 0.0), n_per_source=30, n_val=50)
    assert list(c.sources) == list(PLANTED_STYLES["labels"])
    labels = Counter(r["output"].split(":")[0] for r in c.validation)
    assert labels == {"A": 25, "B": 15, "C": 10}  # exact shares, none of label_d
    prompts = {n: [(r["instruction"], r["input"]) for r in recs] for n, recs in c.sources.items()}
    assert len({tuple(v) for v in prompts.values()}) == 1  # the same records in every source
    answers = {n: [r["output"].split(": ", 1)[1] for r in recs] for n, recs in c.sources.items()}
    assert len({tuple(v) for v in answers.values()}) == 1  # and the same answers after the label
    assert c.params["mixture"] == [0.5, 0.3, 0.2, 0.0]
    apart = build_corpus("planted", n_per_source=30, n_val=10, shared_prompts=False)
    assert apart.sources["label_a"][0]["input"] != apart.sources["label_b"][0]["input"] or (
        apart.sources["label_a"][1]["input"] != apart.sources["label_b"][1]["input"]
    )
    fmt = build_corpus("planted", styles="formats", n_per_source=5, n_val=10)
    assert fmt.sources["sentence"][0]["output"].startswith("The answer is ")
    assert planted_weights([0.2, 0.2, 0.6, 0.0]) == {
        "label_a": 0.2,
        "label_b": 0.2,
        "label_c": 0.6,
        "label_d": 0.0,
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mixture": (0.5, 0.5)}, "4 weights"),
        ({"mixture": (0.5, 0.3, 0.3, 0.0)}, "summing to 1"),
        ({"mixture": (1.2, -0.2, 0.0, 0.0)}, ">= 0"),
        ({"styles": "emoji"}, "styles must be one of"),
    ],
)
def test_a_bad_planted_mixture_is_refused_with_the_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_corpus("planted", **kwargs)


def _write_run(path, rows, seconds):
    path.mkdir(parents=True)
    (path / runs.TRAJECTORY).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / runs.TIMING).write_text(
        "".join(json.dumps({"step": i, "seconds": s}) + "\n" for i, s in enumerate(seconds))
    )


def test_doremi_product_is_uniform_during_the_reference_then_the_running_mean(tmp_path):
    names = ["label_a", "label_b"]
    rows = [{"step": 0, "phase": "reference", "p": dict(zip(names, [0.5, 0.5]))}]
    rows += [
        {"step": 1, "phase": "proxy", "p": dict(zip(names, [0.9, 0.1]))},
        {"step": 2, "phase": "proxy", "p": dict(zip(names, [0.7, 0.3]))},
    ]
    _write_run(tmp_path / "doremi", rows, [1.0, 2.0, 2.0])
    curve = planted.product_curve(tmp_path / "doremi")
    assert np.allclose(curve["weights"], [[0.5, 0.5], [0.9, 0.1], [0.8, 0.2]])
    assert np.allclose(curve["seconds"], [1.0, 3.0, 5.0])  # the reference's seconds count
    sb = [{"step": i, "p": dict(zip(names, [0.5 + 0.1 * i, 0.5 - 0.1 * i]))} for i in range(3)]
    _write_run(tmp_path / "scalebio", sb, [1.0, 1.0, 1.0])
    curve = planted.product_curve(tmp_path / "scalebio")
    dist = planted.distance(curve["weights"], {"label_a": 0.7, "label_b": 0.3}, names)
    assert np.allclose(dist, [np.sqrt(0.08), np.sqrt(0.02), 0.0])
    # within 0.2 from the second step on (after 2 s); 0.1 only at the last
    assert planted.time_within(curve["seconds"], dist, 0.2) == 2.0
    assert planted.time_within(curve["seconds"], dist, 0.01) == 3.0
    assert planted.time_within(curve["seconds"], np.array([0.5, 0.01, 0.5]), 0.1) is None
    assert planted.time_within(curve["seconds"], np.zeros(3), 0.1) == 0.0


def test_doremi_ignores_the_validation_set_so_one_run_serves_every_mixture(tmp_path, monkeypatch):
    """The claim behind `planted.doremi_run`: two DoReMi runs that differ only in the planted
    mixture (the validation set) give the same weights step for step."""
    from scalebio_core.lab.experiments import run_preset

    monkeypatch.setenv("SCALEBIO_RUNS", str(tmp_path))
    ps = []
    for i, mix in enumerate(([0.5, 0.3, 0.2, 0.0], [0.2, 0.2, 0.6, 0.0])):
        run = run_preset(
            "planted",
            "smoke",
            progress=False,
            method="doremi",
            steps=6,
            corpus_args={"n_per_source": 40, "n_val": 40, "mixture": mix},
            out_dir=str(tmp_path / f"doremi{i}"),
        )
        ps.append([r["p"] for r in runs.read_jsonl(run / runs.TRAJECTORY)])
    assert ps[0] == ps[1]
    # and run_all reuses the seed's DoReMi run for the second mixture
    spec = {
        "mixtures": [[0.5, 0.3, 0.2, 0.0], [0.2, 0.2, 0.6, 0.0]],
        "seeds": [0],
        "methods": ["doremi", "uniform"],
        "tolerance": 0.05,
    }
    rows = planted.run_all("smoke", spec, overrides={"steps": 4}, progress=False)
    doremi = [r for r in rows if r["method"] == "doremi"]
    assert doremi[0]["run_dir"] == doremi[1]["run_dir"]
    assert doremi[0]["final"] == doremi[1]["final"]
    assert doremi[0]["final_distance"] != doremi[1]["final_distance"]  # other targets
    table = planted.format_table(planted.summarize(rows, 0.05))
    assert "| 50 / 30 / 20 / 0 | uniform | 1 | 0.361 ± 0.000 | 0 | never (0/1) |" in table


def test_a_doremi_verdict_names_doremis_knob_not_lambdas():
    rows = [
        {"step": t, "phase": "proxy", "p": {"a": 0.5 + 0.004 * t, "b": 0.5 - 0.004 * t}}
        for t in range(60)
    ]
    verdict = convergence(rows)
    assert verdict["verdict"] == "moving" and "raise doremi_eta" in verdict["text"]
    assert "lr_lam" not in verdict["text"]
