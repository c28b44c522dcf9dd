"""Embedded corpora: determinism, sizes, exact noise, checkable answers, held-out validation."""

from __future__ import annotations

import json
import random
import re

import pytest

from scalebio_core.sources.corpora import (
    CATALOG_LANGUAGES,
    CORPORA,
    Corpus,
    build_corpus,
    catalog_messages,
    corpus_stats,
    extract_answer,
    informative_sources,
    instruction_tasks,
    math_word_problems,
    multilingual_sources,
    multilingual_templates,
    noisy_sources,
    reference_answer,
)

SMALL = {
    "instruction": {"n_per_task": 5, "n_val": 7},
    "noisy": {"n_per_source": 20, "n_val": 7},
    "multilingual": {"n_per_source": 6, "n_val": 7},
    "informative": {"n_terse": 18, "n_detailed": 2, "n_val": 7},
    "math": {"n": 5, "n_val": 7},
    "planted": {"n_per_source": 6, "n_val": 7},
    "multilingual_templates": {"n_per_source": 6, "n_val": 7},
}
ALPACA = {"instruction", "input", "output"}


def test_registry_names_and_unknown() -> None:
    assert set(CORPORA) == {
        "instruction",
        "noisy",
        "multilingual",
        "informative",
        "math",
        "planted",
        "multilingual_templates",
    }
    with pytest.raises(ValueError, match="known: informative, instruction, math"):
        build_corpus("alpaca")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_deterministic_bytes_sorted_and_sized(name: str, tmp_path) -> None:
    a = build_corpus(name, seed=3, **SMALL[name])
    b = build_corpus(name, seed=3, **SMALL[name])
    assert isinstance(a, Corpus) and list(a.sources) == sorted(a.sources)
    assert len(a.validation) == 7
    for recs in [*a.sources.values(), a.validation]:
        assert all(set(r) == ALPACA and all(isinstance(v, str) for v in r.values()) for r in recs)
    da, db = a.write(tmp_path / "a"), b.write(tmp_path / "b")
    files = sorted(p.name for p in da.iterdir())
    expected = [f"{s}.jsonl" for s in a.sources] + ["validation.jsonl", "manifest.json"]
    assert files == sorted(expected)
    for f in files:
        assert (da / f).read_bytes() == (db / f).read_bytes(), f
    c = build_corpus(name, seed=4, **SMALL[name])
    assert c.sources != a.sources
    manifest = json.loads((da / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["params"]["seed"] == manifest["seed"] == 3
    assert manifest["provenance"] == a.provenance
    assert manifest["stats"] == corpus_stats(a)
    line = (da / "validation.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert json.loads(line) == a.validation[0]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_negative_sizes_rejected(name: str) -> None:
    kwargs = {k: -1 for k in SMALL[name]}
    with pytest.raises(ValueError, match="non-negative"):
        build_corpus(name, **kwargs)


def test_global_rng_untouched_and_streams_independent() -> None:
    state = random.getstate()
    a = noisy_sources(n_per_source=10, n_val=5, seed=1)
    b = noisy_sources(n_per_source=10, n_val=50, seed=1)
    assert random.getstate() == state
    assert a.sources == b.sources and a.validation == b.validation[:5]


def test_instruction_tasks_sizes_and_checkable() -> None:
    c = instruction_tasks(n_per_task=30, n_val=40, seed=0)
    assert len(c.sources) == 12 and all(len(v) == 30 for v in c.sources.values())
    for recs in [*c.sources.values(), c.validation]:
        for r in recs:
            assert reference_answer(r) == r["output"], r
            assert len(r["output"]) < 60
    stats = corpus_stats(c)
    assert stats["add"]["records"] == 30 and stats["validation"]["records"] == 40
    assert stats["add"]["characters"] > 30 * 50


@pytest.mark.parametrize("n", [20, 37])
def test_noise_fraction_exact(n: int) -> None:
    rates = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    c = noisy_sources(noise_rates=rates, n_per_source=n, n_val=25, seed=2)
    assert list(c.sources) == [f"noise_{r:.1f}" for r in rates]
    for rate, recs in zip(rates, c.sources.values(), strict=True):
        assert len(recs) == n
        wrong = sum(reference_answer(r) != r["output"] for r in recs)
        assert wrong == round(rate * n)
    assert all(reference_answer(r) == r["output"] for r in c.validation)


def test_noise_names_and_bad_rates() -> None:
    c = noisy_sources(noise_rates=(0.5, 0.25, 0.1), n_per_source=4, n_val=1)
    assert list(c.sources) == ["noise_0.1", "noise_0.25", "noise_0.5"]
    with pytest.raises(ValueError):
        noisy_sources(noise_rates=(0.2, 1.5))
    with pytest.raises(ValueError):
        noisy_sources(noise_rates=(0.2, 0.2))


def test_informative_ratio_and_styles() -> None:
    c = informative_sources(n_terse=90, n_detailed=10, n_val=20, seed=0)
    assert list(c.sources) == ["detailed", "terse"]
    assert len(c.sources["terse"]) == 9 * len(c.sources["detailed"])
    for r in c.sources["terse"]:
        assert r["output"] == reference_answer(r) and "The answer is" not in r["output"]
    for r in [*c.sources["detailed"], *c.validation]:
        assert r["output"].endswith(f"The answer is {reference_answer(r)}.")
        assert extract_answer(r["output"]) == reference_answer(r)
        assert len(r["output"]) > len(reference_answer(r)) + 20


def test_math_chain_of_thought_is_correct() -> None:
    c = math_word_problems(n=40, seed=5, n_val=30, val_steps=(2,))
    assert list(c.sources) == ["steps_1", "steps_2", "steps_3"]
    for k, recs in enumerate(c.sources.values(), start=1):
        assert len(recs) == 40
        assert all(r["input"].count("Then ") == k for r in recs)
    assert all(r["input"].count("Then ") == 2 for r in c.validation)
    for r in [*sum(c.sources.values(), []), *c.validation]:
        eqs = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", r["output"])
        assert eqs
        for a, op, b, res in eqs:
            assert eval(f"{a} {op} {b}") == int(res)  # noqa: S307 - digits and one operator
        assert extract_answer(r["output"]) == eqs[-1][3]
        assert int(extract_answer(r["output"])) >= 0


def test_multilingual_sources_are_parallel_text_with_held_out_english() -> None:
    c = multilingual_sources(n_per_source=40, n_val=30, seed=0)
    assert list(c.sources) == ["chinese", "english", "french", "german", "italian", "spanish"]
    assert all(len(v) == 40 for v in c.sources.values()) and len(c.validation) == len(c.test) == 30
    assert all(r["instruction"] == "Continue the text." and r["output"] for r in c.validation)
    # parallel: the i-th record of every source is the same catalog message, in its language
    messages = {m["english"]: m for m in catalog_messages(tuple(CATALOG_LANGUAGES))}
    for i, r in enumerate(c.sources["english"]):
        m = messages[r["input"] + " " + r["output"]]
        for lang in CATALOG_LANGUAGES:
            x = c.sources[lang][i]
            assert x["input"] + ("" if lang == "chinese" else " ") + x["output"] == m[lang]
    # held out: no validation or test message is in any source (the sources being parallel, the
    # English of every trained message is in the English source), nor any English string at all
    big = multilingual_sources(n_per_source=2000, n_val=30)
    trained_english = {r["input"] + " " + r["output"] for r in big.sources["english"]}
    trained = {r["input"] + " " + r["output"] for recs in big.sources.values() for r in recs}
    for split in (c.validation, c.test):
        english = {r["input"] + " " + r["output"] for r in split}
        assert english <= set(messages)
        assert not english & trained_english and not english & trained
    whole = [{r["input"] + " " + r["output"] for r in split} for split in (c.validation, c.test)]
    assert not whole[0] & whole[1]
    assert all(
        re.search(r"[\u4e00-\u9fff]", r["input"] + r["output"]) for r in c.sources["chinese"]
    )
    assert "Django" in c.provenance and "message catalogs" in c.provenance
    with pytest.raises(ValueError, match="n_val \\+ n_test must stay below"):
        multilingual_sources(n_val=400, n_test=400)
    with pytest.raises(ValueError, match="unknown languages"):
        multilingual_sources(languages=("klingon",))


def test_multilingual_text_variant() -> None:
    a = multilingual_sources(n_per_source=5, n_val=4, seed=1, fmt="text")
    b = multilingual_sources(n_per_source=5, n_val=4, seed=1)
    assert all(set(r) == {"text"} for v in a.sources.values() for r in v)
    r0, t0 = b.sources["french"][0], a.sources["french"][0]["text"]
    assert t0 == r0["input"] + " " + r0["output"]
    with pytest.raises(ValueError, match="fmt"):
        multilingual_sources(fmt="markdown")


def test_multilingual_templates_keep_the_tokenizer_text() -> None:
    c = multilingual_templates(n_per_source=5, n_val=4, seed=0)
    assert list(c.sources) == ["chinese", "english", "french", "german", "italian", "spanish"]
    assert "CLDR" in c.provenance and "pydoc_data" in c.provenance


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("instruction", {"n_per_task": 30}),
        ("math", {"n": 30, "extra_tasks": ("uppercase", "sort_numbers")}),
        ("noisy", {"n_per_source": 30}),
        ("informative", {"n_terse": 30, "n_detailed": 30}),
    ],
)
def test_every_source_holds_distinct_records(name, kwargs):
    """Each record is a new draw (a fresh RNG per record once made a source of copies)."""
    for source, records in build_corpus(name, **kwargs).sources.items():
        distinct = len({json.dumps(r, sort_keys=True) for r in records})
        assert distinct >= 0.5 * len(records), (source, distinct)
