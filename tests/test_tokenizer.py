"""Offline byte-level BPE: roundtrip, special tokens, determinism, on-disk cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalebio_core.sources import tokenizer as T
from scalebio_core.sources.corpora import multilingual_sources

SAMPLES = [
    "Tom has 3 apples and buys 4 more. The answer is 7.",
    "  leading, double  spaces and trailing \n\nnew lines\t tabs  ",
    "Le billet coûte 36,89\xa0€. Die Straße ist 5 Kilometer lang. ¿Dónde está?",
    "七月，李华参观了布拉格。",
    "emoji 🚀 and combining e\u0301 and NFD vs NFC é",
    "",
    "<|endoftext|>two docs<|pad|>",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tok-cache")


@pytest.fixture(scope="module")
def tok(cache: Path):
    return T.get_tokenizer(cache_dir=cache)


def test_special_tokens_and_size(tok) -> None:
    assert len(tok) == 2048
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 0, 1)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok("hello")["input_ids"] == tok.encode("hello")  # no bos/eos added by default
    assert 0 not in tok("hello world")["input_ids"]


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip(tok, text: str) -> None:
    assert tok.decode(tok(text)["input_ids"]) == text


def test_roundtrip_corpus_text_and_compression(tok) -> None:
    c = multilingual_sources(n_per_source=3, n_val=3, seed=9, fmt="text")
    for recs in [*c.sources.values(), c.validation]:
        for r in recs:
            assert tok.decode(tok.encode(r["text"])) == r["text"]
    english = " ".join(r["text"] for r in c.sources["english"])
    assert len(tok.encode(english)) < len(english.encode("utf-8")) / 2.5  # BPE learned merges


def test_cache_is_reused_not_retrained(cache: Path, tok, monkeypatch: pytest.MonkeyPatch) -> None:
    path = T.tokenizer_path(cache_dir=cache)
    assert path.parent == cache and path.name.startswith("tokenizer-v2048-")
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no temp dirs left over
    mtime = (path / "tokenizer.json").stat().st_mtime_ns

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(T, "train_tokenizer", boom)
    again = T.get_tokenizer(cache_dir=cache)
    assert (path / "tokenizer.json").stat().st_mtime_ns == mtime
    assert again.get_vocab() == tok.get_vocab() and again.pad_token_id == 1


def test_env_cache_dir_and_vocab_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEBIO_CACHE", str(tmp_path))
    small = T.get_tokenizer(vocab_size=300)
    assert len(small) == 300
    assert (T.tokenizer_path(300).parent, T.tokenizer_path(300) != T.tokenizer_path(2048)) == (
        tmp_path,
        True,
    )
    assert (T.tokenizer_path(300) / "tokenizer.json").is_file()
    text = SAMPLES[2]
    assert small.decode(small.encode(text)) == text


def test_training_is_deterministic() -> None:
    a = T.train_tokenizer(400).backend_tokenizer.to_str()
    b = T.train_tokenizer(400).backend_tokenizer.to_str()
    assert a == b


def test_vocab_too_small() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        T.train_tokenizer(100)
