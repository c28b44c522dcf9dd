"""Data layer: formats, bad-input errors, prompt masking, caching, batching, the estimator trap."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from scalebio_core.core.bilevel import lam_grad, weighted_lower_loss
from scalebio_core.errors import ConfigError, DataError
from scalebio_core.sources import data as D
from scalebio_core.sources.corpora import build_corpus
from scalebio_core.sources.data import (
    SourceSpec,
    load_records,
    load_sources,
    specs_from_dir,
    tokenize,
)
from scalebio_core.sources.sampling import BatchSampler, collate
from scalebio_core.sources.tokenizer import get_tokenizer

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def _jsonl(path: Path, recs: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats


def test_alpaca_json_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    _jsonl(tmp_path / "b.jsonl", ALPACA)
    a = load_records(SourceSpec("a", path=str(tmp_path / "a.json")))
    b = load_records(SourceSpec("b", path=str(tmp_path / "b.jsonl"), format="alpaca"))
    assert a == b and len(a) == 2
    want = D.PROMPT_TEMPLATE.format(instruction="Add the numbers.", input="2 and 3")
    assert a[0]["prompt"] == want
    assert "### Input:" not in a[1]["prompt"] and a[1]["prompt"].endswith("### Response:\n")
    assert [r["response"] for r in a] == ["5", "hi"]
    # a .json file holding JSON Lines, and a directory source (files concatenated in name order)
    _jsonl(tmp_path / "c.json", ALPACA[:1])
    assert load_records(SourceSpec("c", path=str(tmp_path / "c.json"))) == a[:1]
    (tmp_path / "validation.jsonl").write_text("not even json\n")  # skipped in a directory
    both = load_records(SourceSpec("d", path=str(tmp_path)))
    assert both == a + b + a[:1]
    assert load_records(SourceSpec("d", path=str(tmp_path), limit=3)) == both[:3]


def test_sharegpt_uses_first_exchange() -> None:
    conv = {
        "conversations": [
            {"from": "system", "value": "be nice"},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ]
    }
    (r,) = load_records(SourceSpec("s", records=(conv,)))
    assert r == {"prompt": D.PROMPT_NO_INPUT.format(instruction="Q1"), "response": "A1"}
    with pytest.raises(DataError, match="human turn followed by a gpt turn"):
        load_records(SourceSpec("s", records=({"conversations": [{"from": "gpt", "value": "x"}]},)))


def test_text_file_and_text_records(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("First para\nline two.\n\n\n Second para. \n")
    recs = load_records(SourceSpec("t", path=str(tmp_path / "t.txt")))
    assert recs == [
        {"prompt": "", "response": "First para\nline two."},
        {"prompt": "", "response": "Second para."},
    ]
    assert load_records(SourceSpec("t", records=({"text": "x"},))) == [
        {"prompt": "", "response": "x"}
    ]
    assert load_records(
        SourceSpec("r", records=({"prompt": "p", "response": "q"},), format="records")
    ) == [{"prompt": "p", "response": "q"}]


def test_specs_from_dir_excludes_validation_and_manifest(tmp_path: Path) -> None:
    build_corpus("informative", n_terse=3, n_detailed=2, n_val=2).write(tmp_path)
    specs = specs_from_dir(tmp_path)
    assert [s.name for s in specs] == ["detailed", "terse"]
    assert list(load_sources(specs[::-1])) == ["detailed", "terse"]  # keys sorted


# ---------------------------------------------------------------- HF datasets, offline


def test_hf_offline_hub_name_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec = SourceSpec("alpaca", format="hf", hf_name="no-such-org/no-such-dataset-xyz")
    with pytest.raises(DataError, match="hub is offline") as e:
        load_records(spec)
    assert "local path" in str(e.value) and "unset HF_HUB_OFFLINE" in str(e.value)


def test_hf_local_datasets(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list(ALPACA * 3)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    want = load_records(SourceSpec("a", records=tuple(ALPACA)))
    saved = load_records(SourceSpec("x", format="hf", hf_name=str(tmp_path / "saved"), limit=2))
    assert saved == want
    test = load_records(SourceSpec("x", format="hf", hf_name=str(tmp_path / "dd"), hf_split="test"))
    assert test == want[:1]
    js = load_records(SourceSpec("x", format="hf", hf_name="json", path=str(tmp_path / "a.json")))
    assert js == want
    with pytest.raises(DataError, match=r"no split 'valid'; splits: \['train', 'test'\]"):
        load_records(SourceSpec("x", format="hf", hf_name=str(tmp_path / "dd"), hf_split="valid"))


# ---------------------------------------------------------------- bad inputs


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(ALPACA[0]) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: malformed JSON"):
        load_records(SourceSpec("bad", path=str(f)))


def test_a_50_mb_record_is_refused_as_it_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """Issue 27, item 9: one 50 MB record in a data folder took minutes and 15.7 GB before its
    error. It is refused while the file is read, before the line is held whole: Python's own
    allocations (tracemalloc) stay far below the record's size."""
    import tracemalloc

    from scalebio_core.train.build import data_specs
    from scalebio_core.train.config import TrainConfig

    folder = tmp_path / "data"
    folder.mkdir()
    _jsonl(folder / "b.jsonl", ALPACA)
    _jsonl(folder / "validation.jsonl", ALPACA)
    size = 50 * 2**20
    with open(folder / "a.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps(ALPACA[0]) + "\n\n")
        f.write('{"text": "' + "x" * (size - 12) + '"}\n')
        f.write(json.dumps(ALPACA[1]) + "\n")
    specs, _ = data_specs(TrainConfig(data_dir=str(folder)))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            load_sources(specs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"the reader held {peak:,} bytes"
    message = str(e.value)
    assert f"{folder / 'a.jsonl'}: record 1 (line 3): a record of {size:,} bytes" in message
    assert "over the limit of 1,048,576 bytes per record (max_record_bytes)" in message
    assert "Split it into smaller records" in message and "max_record_bytes=" in message


def test_the_record_limit_covers_every_format_and_can_be_raised(tmp_path: Path, capsys) -> None:
    """The limit holds for .json arrays, .txt paragraphs and records in memory; a run config's
    max_record_bytes (or a source's own) raises it, and the command line says the error."""
    from scalebio_core.cli import main
    from scalebio_core.train.build import data_specs
    from scalebio_core.train.config import TrainConfig

    long = {"instruction": "say it", "input": "", "output": "y" * 300}
    (tmp_path / "arr.json").write_text(json.dumps([ALPACA[0], long, ALPACA[1]], indent=1))
    (tmp_path / "t.txt").write_text("short one\n\n" + "z " * 60 + "\n" + "z " * 60 + "\n\nend\n")
    jl = _jsonl(tmp_path / "l.jsonl", [ALPACA[0], long])
    for path, where in (
        ("arr.json", "arr.json: record 1 (line 7): a record of 3"),
        ("t.txt", "t.txt: paragraph 1 (line 3): a record of 241 bytes"),
        ("l.jsonl", "l.jsonl: record 1 (line 2): a record of 3"),
    ):
        spec = SourceSpec("s", path=str(tmp_path / path), max_record_bytes=200)
        with pytest.raises(DataError, match="over the limit of 200 bytes") as e:
            load_records(spec)
        assert where in str(e.value), str(e.value)
        assert len(load_records(SourceSpec("s", path=str(tmp_path / path)))) == 3 - (
            path == "l.jsonl"
        )
    with pytest.raises(DataError, match=r"source 's': record 0: a record of 306 bytes"):
        long_one = ({"prompt": "p", "response": "r" * 305},)
        load_records(SourceSpec("s", records=long_one, max_record_bytes=300))
    # the run config's limit reaches every source; a source of `sources` may set its own
    cfg = TrainConfig(data_dir=str(_folder(tmp_path, jl)), max_record_bytes=200)
    specs, val = data_specs(cfg)
    assert {s.max_record_bytes for s in [*specs, val]} == {200}
    with pytest.raises(DataError, match="over the limit of 200 bytes"):
        load_sources(specs)
    own = [{"name": "l", "path": str(jl), "max_record_bytes": 4000}]
    cfg = TrainConfig(sources=own, validation={"path": str(jl)}, max_record_bytes=200)
    specs, val = data_specs(cfg)
    assert [s.max_record_bytes for s in specs] == [4000] and val.max_record_bytes == 200
    assert len(load_sources(specs)["l"]) == 2
    with pytest.raises(ConfigError, match="max_record_bytes must be a whole number >= 1"):
        TrainConfig(max_record_bytes=0)
    # the command line: exit code 2 and the message, before anything is tokenized or trained
    out = tmp_path / "run"
    folder = _folder(tmp_path, jl)
    args = [f"data_dir={folder}", "max_record_bytes=200", f"out_dir={out}", "steps=1"]
    code = main(["train", "--no-progress", *args, "model=embedded:nano"])
    err = capsys.readouterr().err
    assert code == 2 and "l.jsonl: record 1 (line 2): a record of" in err, err


def _folder(tmp_path: Path, source: Path) -> Path:
    """A data folder of one source (a copy of `source`) and two more, with a validation set."""
    folder = tmp_path / "folder"
    if not folder.is_dir():
        folder.mkdir()
        (folder / source.name).write_bytes(source.read_bytes())
        _jsonl(folder / "other.jsonl", ALPACA)
        _jsonl(folder / "validation.jsonl", ALPACA)
    return folder


def test_missing_field_names_record_key_and_expected(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "m.jsonl", [ALPACA[0], ALPACA[1], {"instruction": "no output"}])
    with pytest.raises(DataError) as e:
        load_records(SourceSpec("m", path=str(f)))
    msg = str(e.value)
    assert "m.jsonl: record 2 (line 3)" in msg and "missing key 'output'" in msg
    assert "instruction, output (optional: input)" in msg
    with pytest.raises(DataError, match=r"record 1: missing key 'response'; .*prompt, response"):
        load_records(SourceSpec("r", records=({"prompt": "a", "response": "b"}, {"prompt": "c"})))
    with pytest.raises(DataError, match="cannot detect the format from the keys.*conversations"):
        load_records(SourceSpec("u", records=({"question": "a"},)))


def test_empty_source_unknown_format_missing_path(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="'empty'.*empty.jsonl.*has no records"):
        load_sources(specs_from_dir(tmp_path))
    with pytest.raises(DataError, match="unknown format 'csv'; known formats: auto, alpaca"):
        load_records(SourceSpec("x", path=str(tmp_path / "empty.jsonl"), format="csv"))
    with pytest.raises(DataError, match=r"path .*nope\.jsonl does not exist"):
        load_records(SourceSpec("x", path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="not a directory"):
        specs_from_dir(tmp_path / "nope")


def test_duplicate_source_names() -> None:
    spec = SourceSpec("a", records=tuple(ALPACA))
    with pytest.raises(DataError, match=r"duplicate source names \['a'\]"):
        load_sources([spec, spec])


def test_truncated_away_and_empty_responses(tok) -> None:
    long = [{"prompt": "p", "response": "r"}] + [{"prompt": "w " * 50, "response": "r"}] * 3
    recs = {"ok": [{"prompt": "p", "response": "r"}], "long": long}
    with pytest.raises(DataError) as e:
        tokenize(recs, tok, max_length=16)
    msg = str(e.value)
    assert "source 'long': 3 of 4 samples have no response tokens" in msg
    assert "first: record 1" in msg and "Raise max_length (now 16) or shorten the prompts" in msg
    with pytest.raises(DataError, match="source 'e': 1 of 1"):
        tokenize({"e": [{"prompt": "q", "response": "  "}]}, tok, max_length=16)
    with pytest.raises(DataError, match="source 'raw': record 0 is not a normalised record"):
        tokenize({"raw": ALPACA}, tok, max_length=16)


def test_no_pad_token(tok) -> None:
    nopad = copy.deepcopy(tok)
    nopad.pad_token = None
    recs = {"a": [{"prompt": "q", "response": "r"}]}
    with pytest.raises(DataError, match=r"no pad token; set tokenizer\.pad_token = tokenizer\.eos"):
        tokenize(recs, nopad, max_length=16)
    data = tokenize(recs, tok, max_length=16)
    with pytest.raises(DataError, match="no pad token"):
        collate(data, [0], pad_id=None)


# ---------------------------------------------------------------- tokenization and collate


def test_prompt_masking_is_exact(tok) -> None:
    recs = load_records(SourceSpec("a", records=tuple(ALPACA)))
    data = tokenize({"a": recs}, tok, max_length=256)
    for r, ids, labels in zip(recs, data.input_ids, data.labels):
        p, q = tok.encode(r["prompt"]), tok.encode(r["response"]) + [tok.eos_token_id]
        assert ids.tolist() == p + q
        assert labels.tolist() == [-100] * len(p) + q
    # truncation keeps the first max_length tokens: the response's start survives
    n_prompt = len(tok.encode(recs[0]["prompt"]))
    long = [{"prompt": recs[0]["prompt"], "response": "many words " * 40}]
    cut = tokenize({"a": long}, tok, max_length=n_prompt + 3)
    assert len(cut.input_ids[0]) == n_prompt + 3 and (cut.labels[0] != -100).sum() == 3


def test_text_is_chunked_not_truncated(tok) -> None:
    text = " ".join(f"word{i}" for i in range(300))
    full = tok.encode(text) + [tok.eos_token_id]
    data = tokenize({"lm": [{"prompt": "", "response": text}]}, tok, max_length=32)
    assert all(len(x) <= 32 for x in data.input_ids) and len(data) == math.ceil(len(full) / 32)
    assert torch.cat(data.input_ids).tolist() == full[: sum(len(x) for x in data.input_ids)]
    assert all(torch.equal(x, y) for x, y in zip(data.input_ids, data.labels))


def test_names_fix_source_order(tok) -> None:
    recs = {"b": [{"prompt": "q", "response": "r"}], "a": [{"prompt": "q", "response": "s"}] * 2}
    assert tokenize(recs, tok, 16).names == ("a", "b")
    data = tokenize(recs, tok, 16, names=["c", "b", "a"])
    assert data.names == ("c", "b", "a") and data.counts().tolist() == [0, 1, 2]
    with pytest.raises(DataError, match=r"missing: \['b'\]"):
        tokenize(recs, tok, 16, names=["a"])


def test_tokenize_cache(tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = load_sources(
        [
            SourceSpec("a", records=tuple(ALPACA)),
            SourceSpec("t", records=({"text": "some text " * 30},)),
        ]
    )
    first = tokenize(recs, tok, 48, cache_dir=tmp_path)
    (cached,) = list(tmp_path.iterdir())  # one file, no temp files left
    assert cached.name.startswith("tokenized-") and cached.suffix == ".pt"

    def boom(*a, **k):
        raise AssertionError("tokenized again instead of loading the cache")

    monkeypatch.setattr(D, "_tokenize_source", boom)
    again = tokenize(recs, tok, 48, cache_dir=tmp_path)
    assert again.names == first.names and torch.equal(again.source_ids, first.source_ids)
    assert all(torch.equal(x, y) for x, y in zip(again.input_ids, first.input_ids))
    assert all(torch.equal(x, y) for x, y in zip(again.labels, first.labels))
    with pytest.raises(AssertionError, match="tokenized again"):  # new key: max_length differs
        tokenize(recs, tok, 49, cache_dir=tmp_path)


def test_a_torn_cache_file_is_named_deleted_and_rebuilt_alone(tok, tmp_path: Path) -> None:
    """Issue 27, item 10: a tokenized-cache file cut short (a crash, a full disk) or overwritten
    with garbage was a raw PytorchStreamReader error that named no file."""
    recs = load_sources([SourceSpec("a", records=tuple(ALPACA))])
    first = tokenize(recs, tok, 48, cache_dir=tmp_path)
    (mine,) = list(tmp_path.iterdir())
    tokenize({"t": [{"prompt": "", "response": "other text " * 9}]}, tok, 48, cache_dir=tmp_path)
    (theirs,) = [p for p in tmp_path.iterdir() if p != mine]
    whole, kept = mine.read_bytes(), theirs.read_bytes()
    for torn in (whole[: len(whole) // 2], b"not a cache file"):
        mine.write_bytes(torn)
        with pytest.warns(UserWarning, match=rf"{mine}: a tokenized-cache file that cannot be"):
            again = tokenize(recs, tok, 48, cache_dir=tmp_path)
        assert all(torch.equal(x, y) for x, y in zip(again.input_ids, first.input_ids, strict=True))
        assert torch.load(mine, weights_only=True)["names"] == ["a"]  # rewritten whole
        assert theirs.read_bytes() == kept  # the other entry untouched
        assert sorted(tmp_path.iterdir()) == sorted([mine, theirs])  # no temporary files left


def test_collate_right_pads(tok) -> None:
    recs = {
        "a": [{"prompt": "q", "response": "a long answer here"}],
        "b": [{"prompt": "question two", "response": "r"}],
    }
    data = tokenize(recs, tok, 64)
    batch = collate(data, [1, 0], pad_id=tok.pad_token_id)
    n0, n1 = len(data.input_ids[1]), len(data.input_ids[0])
    t = max(n0, n1)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (2, t),
        "attention_mask": (2, t),
        "labels": (2, t),
        "source_ids": (2,),
    }
    assert batch["source_ids"].tolist() == [1, 0]
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    short = 0 if n0 < n1 else 1
    assert (batch["input_ids"][short, min(n0, n1) :] == tok.pad_token_id).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@pytest.mark.parametrize(
    "name, kwargs, max_length",
    [
        ("instruction", {"n_per_task": 3, "n_val": 5}, 64),
        ("noisy", {"n_per_source": 20, "n_val": 10}, 64),
        ("multilingual", {"n_per_source": 5, "n_val": 5}, 64),  # short interface messages
        ("multilingual", {"n_per_source": 5, "n_val": 5, "fmt": "text"}, 64),
        ("informative", {"n_terse": 10, "n_detailed": 5, "n_val": 5}, 64),
        ("math", {"n": 10, "n_val": 5}, 128),  # prompts: 69-81 tokens
    ],
)
def test_embedded_corpus_through_files(
    tok, tmp_path: Path, name: str, kwargs: dict, max_length: int
) -> None:
    corpus = build_corpus(name, **kwargs)
    corpus.write(tmp_path)
    sources = load_sources(specs_from_dir(tmp_path))
    assert list(sources) == list(corpus.sources)  # validation and manifest excluded
    assert {k: len(v) for k, v in sources.items()} == {k: len(v) for k, v in corpus.sources.items()}
    if max_length > 64:  # at 64 the prompts fill the context: the clear error, not silent loss
        with pytest.raises(DataError, match=r"no response tokens.*Raise max_length \(now 64\)"):
            tokenize(sources, tok, max_length=64)
    data = tokenize(sources, tok, max_length=max_length)
    assert data.names == tuple(corpus.sources) and (data.counts() > 0).all()
    sampler = BatchSampler(data.source_ids, len(data.names), 2 * len(data.names))
    batch = collate(data, sampler.indices(0), tok.pad_token_id)
    b, t = batch["input_ids"].shape
    assert b == 2 * len(data.names) and t <= max_length
    assert torch.bincount(batch["source_ids"], minlength=len(data.names)).tolist() == [2] * len(
        data.names
    )
    resp = batch["labels"] != -100
    assert (resp.sum(1) >= 1).all() and not (resp & (batch["attention_mask"] == 0)).any()
    assert (batch["input_ids"][resp] == batch["labels"][resp]).all()
    if "fmt" not in kwargs:  # prompted records: the first token is a prompt token
        assert not resp[:, 0].any()
    val = load_records(SourceSpec("validation", path=str(tmp_path / "validation.jsonl")))
    assert len(val) == len(corpus.validation)


# ---------------------------------------------------------------- the sampler


def _ids(sizes: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in enumerate(sizes)])


def test_union_covers_each_epoch_and_resumes() -> None:
    ids = _ids([12, 6, 2])
    s = BatchSampler(ids, 3, batch_size=5, kind="union", seed=3)
    for epoch in range(3):
        seen = sum((s.indices(epoch * 4 + t) for t in range(4)), [])
        assert sorted(seen) == list(range(20))
    assert torch.allclose(s.expected_counts(), torch.tensor([3.0, 1.5, 0.5], dtype=torch.float64))
    stream = sum((s.indices(t) for t in range(12)), [])
    odd = BatchSampler(ids, 3, batch_size=7, kind="union", seed=3)  # batches straddle epochs
    assert sum((odd.indices(t) for t in range(6)), [])[:42] == stream[:42]
    fresh = BatchSampler(ids, 3, batch_size=5, kind="union", seed=3)
    assert fresh.indices(9) == s.indices(9) and s.indices(0) != s.indices(4)
    assert BatchSampler(ids, 3, 5, "union", seed=4).indices(0) != s.indices(0)


def test_balanced_quotas_rotation_and_resume() -> None:
    ids = _ids([10, 4, 1])
    s = BatchSampler(ids, 3, batch_size=7, kind="balanced", seed=1)
    assert torch.allclose(s.expected_counts(), torch.full((3,), 7 / 3, dtype=torch.float64))
    counts = torch.stack([torch.bincount(ids[s.indices(t)], minlength=3) for t in range(30)])
    assert (counts >= 2).all() and (counts.sum(1) == 7).all()
    assert (counts.reshape(10, 3, 3).sum(1) == 7).all()  # any K consecutive batches: B per source
    assert [s.quotas(t) for t in range(4)] == [[3, 2, 2], [2, 3, 2], [2, 2, 3], [3, 2, 2]]
    assert counts.tolist() == [s.quotas(t) for t in range(30)]
    # each source walks through its own epoch permutations: every sample once per epoch
    src1 = torch.tensor([i for t in range(30) for i in s.indices(t) if ids[i] == 1])
    used = torch.bincount(src1 - 10, minlength=4)
    assert int(used.max() - used.min()) <= 1 and int(used.sum()) == counts[:, 1].sum()
    fresh = BatchSampler(ids, 3, batch_size=7, kind="balanced", seed=1)
    assert [fresh.indices(t) for t in (29, 3)] == [s.indices(29), s.indices(3)]


def test_sampler_errors() -> None:
    with pytest.raises(DataError, match=r"batch_size \(2\) must be >= the number of sources \(3\)"):
        BatchSampler(_ids([3, 3, 3]), 3, batch_size=2)
    with pytest.raises(DataError, match="unknown sampler kind 'uniform'; known kinds: union"):
        BatchSampler(_ids([3, 3]), 2, 4, kind="uniform")
    with pytest.raises(DataError, match=r"source\(s\) \[1\] have no samples"):
        BatchSampler(_ids([3, 0, 2]), 3, 4, kind="union")


# ---------------------------------------------------------------- the estimator trap


def _batch_grads(sampler: BatchSampler, steps: int, losses, ids, p, divisor):
    grads, ests = [], []
    for t in range(steps):
        idx = torch.tensor(sampler.indices(t))
        _, est, _ = weighted_lower_loss(losses[idx], ids[idx], p, divisor)
        grads.append(lam_grad(p, est, torch.zeros_like(est), 1.0))
        ests.append(est)
    g, e = torch.stack(grads), torch.stack(ests)
    return g.mean(0), g.std(0) / math.sqrt(steps), e.mean(0), e.std(0) / math.sqrt(steps)


def test_estimator_trap_realized_counts_are_biased_expected_counts_are_not() -> None:
    """Full λ-gradient of L2 = Σ p_s l̄_s is (diag p − ppᵀ) l̄; compare batch averages."""
    sizes = [90, 9, 1]
    ids = _ids(sizes).double()
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    losses = means[ids.long()] + 0.3 * torch.rand(len(ids), generator=gen, dtype=torch.float64)
    ids = ids.long()
    p = torch.softmax(torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64), 0)
    lbar = torch.stack([losses[ids == s].mean() for s in range(3)])
    full = (torch.diag(p) - torch.outer(p, p)) @ lbar

    # the closed form used below is the autograd gradient through softmax
    lam = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64, requires_grad=True)
    l2, est, _ = weighted_lower_loss(losses[:12], ids[:12], torch.softmax(lam, 0), None)
    (auto,) = torch.autograd.grad(l2, lam)
    assert torch.allclose(auto, lam_grad(p, est, torch.zeros(3, dtype=torch.float64), 1.0))

    # (i) union batches, divisor = expected counts B·n_s/N: unbiased (whole epochs: exact)
    union = BatchSampler(ids, 3, batch_size=10, kind="union", seed=0)
    steps = 10 * 300  # 300 epochs of 10 batches
    div = union.expected_counts()
    mean, se, _, _ = _batch_grads(union, steps, losses, ids, p, div)
    assert ((mean - full).abs() <= 5 * se).all()
    assert torch.allclose(mean, full, atol=1e-5)

    # (ii) union batches, realized counts (the paper's estimate): a source is absent from a batch
    # with probability C(N − n_s, B) / C(N, B), and then contributes 0: E[l̂_s] = P(present)·l̄_s.
    mean, se, est_mean, est_se = _batch_grads(union, steps, losses, ids, p, None)
    present = torch.tensor([1 - math.comb(100 - n, 10) / math.comb(100, 10) for n in sizes])
    assert ((est_mean - present * lbar).abs() <= 5 * est_se + 1e-9).all()  # the predicted bias
    assert ((mean - full).abs() / se).max() > 20  # many standard errors off
    assert (est_mean[1:] < 0.7 * lbar[1:]).all()  # small sources look better than they are
    assert (mean * full < 0).all()  # here the paper's estimate even flips every sign

    # (iii) balanced batches (every source in every batch), realized counts: unbiased
    bal = BatchSampler(ids, 3, batch_size=6, kind="balanced", seed=0)
    mean, se, _, _ = _batch_grads(bal, 45 * 20, losses, ids, p, None)  # whole epochs per source
    assert ((mean - full).abs() <= 5 * se + 1e-12).all()
    assert torch.allclose(mean, full, atol=1e-5)
