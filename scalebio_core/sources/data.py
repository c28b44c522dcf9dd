"""Training sources: formats, loading, tokenization with prompt masking, caching, batching.

A source is a named list of normalised records ``{"prompt": str, "response": str}``. Formats:

* ``alpaca``: objects with ``instruction``, optional ``input``, ``output``; the prompt is
  `PROMPT_TEMPLATE` (without the Input block when ``input`` is empty), the response ``output``.
* ``sharegpt``: ``{"conversations": [{"from": "human"|"user", "value": ...},
  {"from": "gpt"|"assistant", "value": ...}, ...]}``; the first human turn (templated as an
  instruction) is the prompt and the first model turn after it the response. Later turns and system
  turns are dropped.
* ``text``: a ``.txt`` file (split into paragraphs at blank lines) or ``{"text"}`` objects; the
  prompt is empty and every token is a response token. `tokenize` splits each such record into
  chunks of ``max_length`` tokens, so long documents are never truncated.
* ``records``: objects that already have ``prompt`` and ``response``.
* ``hf``: ``datasets.load_dataset(hf_name, hf_config, split=hf_split)`` (``load_from_disk`` for a
  ``save_to_disk`` folder; ``path`` becomes ``data_files`` for builders such as ``"json"``), then
  the rows are read like ``auto``.
* ``auto``: ``.txt`` files are text; otherwise the keys of the first record decide.

Files: ``.json`` (an array of objects, or JSON Lines), ``.jsonl``, ``.txt``; a directory source
concatenates its files in name order. A record (a JSON Lines line, an element of a ``.json``
array, a ``.txt`` paragraph) may hold at most ``max_record_bytes`` bytes (`MAX_RECORD_BYTES`,
1 MiB): a longer one is refused as it is read, JSON Lines and ``.txt`` files in bounded memory.
`tokenize` appends the eos token to every response (as an id: records stay
tokenizer-independent) and prepends the special tokens the tokenizer puts at the start of a text
(Llama-3's bos; nothing for GPT-2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import datasets
import torch
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

from .. import messages
from ..errors import DataError
from ..files import save_torch
from .sampling import IGNORE, NO_PAD

FORMATS = ("auto", "alpaca", "sharegpt", "text", "hf", "records")
SUFFIXES = (".json", ".jsonl", ".txt")
HELD_OUT_STEMS = ("validation", "val", "dev", "test")
"""Files of a data folder that hold held-out sets: never a training source."""
EXCLUDED_STEMS = (*HELD_OUT_STEMS, "manifest")  # not training sources in a corpus folder
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
HUMAN, MODEL = ("human", "user"), ("gpt", "assistant")
EXPECTED_KEYS = {
    "alpaca": "instruction, output (optional: input)",
    "records": "prompt, response",
    "sharegpt": "conversations (a list of {from, value} turns)",
    "text": "text",
}
CACHE_VERSION = 2  # bump when tokenization or the cached fields change
MAX_RECORD_BYTES = 1 << 20
"""The largest record a source may hold by default, in bytes of its text in the file (1 MiB: a
JSON Lines line, an element of a .json array, a .txt paragraph; a record given in memory or by
`datasets`: its prompt and response). A longer one is refused as it is read, before it is held
whole or tokenized (one 50 MB record took minutes and gigabytes to tokenize). A run config's
`max_record_bytes`, or a source's, raises it."""


@dataclass(frozen=True)
class SourceSpec:
    """Where one named training source comes from (see the module docstring for formats)."""

    name: str
    path: str | None = None
    format: str = "auto"
    records: tuple | None = None
    hf_name: str | None = None
    hf_split: str = "train"
    hf_config: str | None = None
    limit: int | None = None
    shard: str | None = None
    """'i/n': keep records i, i+n, i+2n, … (disjoint partitions of one dataset; after limit)."""
    corrupt: float = 0.0
    """Fraction of responses replaced by another record's response (exactly round(rate·n))."""
    seed: int = 0
    """Seed of the corruption draw."""
    max_record_bytes: int = MAX_RECORD_BYTES
    """The largest record of the source, in bytes (`MAX_RECORD_BYTES`)."""


def corrupt_responses(records: list[dict], rate: float, seed: int) -> list[dict]:
    """Replace exactly round(rate·n) responses by the response of another, differing record."""
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"corrupt must lie in [0, 1], got {rate}.")
    n = len(records)
    k = round(rate * n)
    if k == 0:
        return records
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(n, generator=g)[:k].tolist()
    out = [dict(r) for r in records]
    for i in picked:
        for _ in range(100):
            j = int(torch.randint(n, (1,), generator=g))
            if records[j]["response"] != records[i]["response"]:
                out[i]["response"] = records[j]["response"]
                break
        else:
            raise DataError("corrupt: every record has the same response; nothing to swap in.")
    return out


def _shard(records: list[dict], shard: str, where: str) -> list[dict]:
    try:
        i, n = (int(x) for x in shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError) as e:
        raise DataError(f"{where}: shard must be 'i/n' with 0 <= i < n, got {shard!r}.") from e
    return records[i::n]


# ---------------------------------------------------------------- reading raw records

Raw = list[tuple[str, Any]]  # (location for messages, raw record)


def read_utf8(path: Path) -> str:
    """A text file's contents; a file that is not UTF-8 is refused naming its line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
            f"{e.start}). Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or remove "
            "it if it is not a data file."
        ) from None


BOM = b"\xef\xbb\xbf"
CHUNK = 1 << 16


def read_lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, int, bytes | int]]:
    """(line number from 1, byte offset, the line without its end) of a binary file, in bounded
    memory: a line of more than `limit` bytes is never held whole; its size in bytes (an int)
    comes in its place. A UTF-8 byte order mark at the start is dropped (offsets count it)."""
    n, offset = 0, 0
    while line := f.readline(limit + 2):  # room for the line's end, \r\n
        n, start = n + 1, offset
        offset += len(line)
        if len(line) == limit + 2 and not line.endswith(b"\n"):  # over-long: count the rest
            size, tail = len(line), line
            while more := f.readline(CHUNK):
                offset, size, tail = offset + len(more), size + len(more), more
                if more.endswith(b"\n"):
                    break
            yield n, start, size - (len(tail) - len(tail.rstrip(b"\r\n")))
            continue
        line = line.removesuffix(b"\n").removesuffix(b"\r")
        if n == 1 and line.startswith(BOM):
            line, start = line[len(BOM) :], start + len(BOM)
        yield n, start, (len(line) if len(line) > limit else line)


def _decode(path: Path, n: int, start: int, line: bytes) -> str:
    """A line's bytes as text; bytes that are not UTF-8 are refused naming the line (as
    `read_utf8`)."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: line {n}: not UTF-8 text (byte 0x{line[e.start]:02x} at offset "
            f"{start + e.start}). Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or "
            "remove it if it is not a data file."
        ) from None


def too_long(where: str, size: int, limit: int) -> DataError:
    """The error of a record over `limit` bytes at `where` (file and line)."""
    more = max(2 * limit, -(-size // (1 << 20)) << 20)  # whole MiB, at least the size
    return DataError(
        f"{where}: a record of {size:,} bytes, over the limit of {limit:,} bytes per record "
        "(max_record_bytes); nothing was tokenized. Split it into smaller records (a long text: "
        "a .txt file split into paragraphs at blank lines, or several text records), or raise "
        f"the limit if it must stay whole: max_record_bytes={more} in the run config (or in "
        "that source's entry of sources)."
    )


def _first_byte(path: Path) -> bytes:
    """The file's first byte that is not whitespace (after a byte order mark), or b""."""
    with open(path, "rb") as f:
        head = f.read(len(BOM))
        if head != BOM:
            f.seek(0)
        while chunk := f.read(CHUNK):
            if chunk := chunk.lstrip():
                return chunk[:1]
    return b""


def _read_json(path: Path, limit: int = MAX_RECORD_BYTES) -> Raw:
    if path.suffix == ".json" and _first_byte(path) == b"[":  # else: JSON Lines in a .json file
        return _read_json_array(path, limit)
    out: Raw = []
    with open(path, "rb") as f:
        for n, start, raw in read_lines(f, limit):
            where = f"{path}: record {len(out)} (line {n})"
            if isinstance(raw, int):
                raise too_long(where, raw, limit)
            line = _decode(path, n, start, raw)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: line {n}: malformed JSON ({e.msg}, column {e.colno}); fix "
                    "or delete that line (JSON Lines: one object per line)."
                ) from e
            out.append((where, rec))
    return out


def _read_json_array(path: Path, limit: int) -> Raw:
    """The elements of a .json file that holds one array. The file is read whole (its size is
    the user's); each element's text is measured before the next is parsed."""
    text = read_utf8(path)
    try:
        if os.path.getsize(path) <= limit:  # no element can be over the limit
            data = json.loads(text)
            return [(f"{path}: record {i}", r) for i, r in enumerate(data)]
        out: Raw = []
        decoder, space = json.JSONDecoder(), re.compile(r"\s*")
        i = space.match(text, text.index("[") + 1).end()
        while text[i : i + 1] != "]" or out:
            rec, end = decoder.raw_decode(text, i)
            chars = end - i
            size = chars if chars > limit else len(text[i:end].encode())
            if size > limit:
                line = text.count("\n", 0, i) + 1
                raise too_long(f"{path}: record {len(out)} (line {line})", size, limit)
            out.append((f"{path}: record {len(out)}", rec))
            i = space.match(text, end).end()
            if text[i : i + 1] == "]":
                break
            if text[i : i + 1] != ",":
                json.loads(text)  # the syntax error, as the whole file's parser words it
            i = space.match(text, i + 1).end()
        if text[i + 1 :].strip():
            json.loads(text)
        return out
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: line {e.lineno}: malformed JSON ({e.msg}, column "
            f"{e.colno}); fix the file (a JSON array of objects)."
        ) from e


def _read_txt(path: Path, limit: int = MAX_RECORD_BYTES) -> Raw:
    """The paragraphs of a text file (split at empty lines), each at most `limit` bytes, read
    line by line in bounded memory."""
    out: Raw = []
    lines: list[str] = []
    size, first = 0, 0  # the paragraph's bytes so far, its first line
    with open(path, "rb") as f:
        for n, start, raw in itertools.chain(read_lines(f, limit), [(0, 0, b"")]):  # b"": its end
            if raw == b"":
                if size > limit:
                    raise too_long(f"{path}: paragraph {len(out)} (line {first})", size, limit)
                para = "\n".join(lines).strip()
                if para:
                    out.append((f"{path}: paragraph {len(out)}", {"text": para}))
                lines, size = [], 0
                continue
            first = n if not size else first
            size += (raw if isinstance(raw, int) else len(raw)) + (1 if size else 0)
            if size > limit:
                lines = []  # counted on to the paragraph's end, not held
            else:
                lines.append(_decode(path, n, start, raw))  # type: ignore[arg-type]
    return out


def source_files(spec: SourceSpec) -> list[Path]:
    """The files a spec's path reads: the file itself, or the data files of its folder."""
    path = Path(spec.path)
    if not path.exists():
        raise DataError(f"source {spec.name!r}: path {path} does not exist; check the path.")
    files = [path]
    if path.is_dir():
        files = sorted(
            f
            for f in path.iterdir()
            if f.suffix in SUFFIXES and f.is_file() and f.stem not in EXCLUDED_STEMS
        )
    if not files:
        raise DataError(f"source {spec.name!r}: no {'/'.join(SUFFIXES)} files in {path}.")
    return files


def _read_path(spec: SourceSpec) -> list[tuple[Raw, str]]:
    """[(raw records, format)] per file of the spec's path."""
    out = []
    for f in source_files(spec):
        if f.suffix not in SUFFIXES:
            raise DataError(f"source {spec.name!r}: {f} is not a {'/'.join(SUFFIXES)} file.")
        fmt = "text" if f.suffix == ".txt" and spec.format == "auto" else spec.format
        limit = spec.max_record_bytes
        out.append((_read_txt(f, limit) if f.suffix == ".txt" else _read_json(f, limit), fmt))
    return out


def _datasets_offline() -> bool:
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _read_hf(spec: SourceSpec) -> Raw:
    name, where = spec.hf_name, f"source {spec.name!r}: HF dataset {spec.hf_name!r}"
    local = Path(name).exists()
    try:
        if local and any((Path(name) / f).is_file() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if spec.hf_split not in ds:
                    raise DataError(f"{where} has no split {spec.hf_split!r}; splits: {list(ds)}.")
                ds = ds[spec.hf_split]
        else:
            files = {"data_files": spec.path} if spec.path else {}
            ds = datasets.load_dataset(name, spec.hf_config, split=spec.hf_split, **files)
    except DataError:
        raise
    except Exception as e:
        if _datasets_offline() and not local and name not in _PACKAGED_DATASETS_MODULES:
            raise DataError(
                f"{where}: the Hugging Face hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is "
                "set) and it is not in the local cache. Give a local path (a save_to_disk folder, "
                "or hf_name='json' with path=<file>), or unset HF_HUB_OFFLINE and "
                "HF_DATASETS_OFFLINE when online."
            ) from e
        raise DataError(f"{where} (split {spec.hf_split!r}) could not be loaded: {e}") from e
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    return [(f"{where}: row {i}", r) for i, r in enumerate(ds)]


# ---------------------------------------------------------------- normalising


def _detect(where: str, rec: Any) -> str:
    keys = set(rec) if isinstance(rec, dict) else set()
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "response"} <= keys:
        return "records"
    if "text" in keys:
        return "text"
    known = "; ".join(f"{k}: {v}" for k, v in EXPECTED_KEYS.items())
    raise DataError(
        f"{where}: cannot detect the format from the keys {sorted(keys)}. Expected keys — {known}; "
        "or set the format explicitly."
    )


def _field(where: str, rec: Any, key: str, fmt: str, optional: bool = False) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}.")
    value = rec.get(key)
    if value is None and optional:
        return ""
    if key not in rec:
        raise DataError(
            f"{where}: missing key {key!r}; {fmt} records need the keys {EXPECTED_KEYS[fmt]}."
        )
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}.")
    return value


def _sharegpt(where: str, rec: Any) -> dict[str, str]:
    turns = rec.get("conversations") if isinstance(rec, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(
            f"{where}: missing key 'conversations' or it is not a list of turns; "
            f"sharegpt records need {EXPECTED_KEYS['sharegpt']}."
        )
    roles = [str(t.get("from", "")).lower() for t in turns]
    first = next((i for i, r in enumerate(roles) if r in HUMAN), None)
    reply = next((i for i, r in enumerate(roles) if r in MODEL and i > (first or 0)), None)
    if first is None or reply is None:
        raise DataError(f"{where}: needs a human turn followed by a gpt turn; roles are {roles}.")
    prompt = PROMPT_NO_INPUT.format(instruction=_field(where, turns[first], "value", "sharegpt"))
    return {"prompt": prompt, "response": _field(where, turns[reply], "value", "sharegpt")}


def _normalise(where: str, rec: Any, fmt: str) -> dict[str, str]:
    if fmt == "alpaca":
        ins = _field(where, rec, "instruction", fmt)
        inp = _field(where, rec, "input", fmt, optional=True)
        tpl = PROMPT_TEMPLATE if inp.strip() else PROMPT_NO_INPUT
        return {
            "prompt": tpl.format(instruction=ins, input=inp),
            "response": _field(where, rec, "output", fmt),
        }
    if fmt == "sharegpt":
        return _sharegpt(where, rec)
    if fmt == "text":
        return {"prompt": "", "response": _field(where, rec, "text", fmt)}
    return {
        "prompt": _field(where, rec, "prompt", fmt),
        "response": _field(where, rec, "response", fmt),
    }


def normalise_record(where: str, rec: Any, fmt: str = "auto") -> dict[str, str]:
    """One record of any format the data layer reads (`fmt` 'auto': its keys decide) as
    ``{"prompt", "response"}``; `where` names it in errors."""
    return _normalise(where, rec, _detect(where, rec) if fmt == "auto" else fmt)


def load_records(spec: SourceSpec) -> list[dict]:
    """The spec's records, normalised to ``{"prompt", "response"}`` (text: empty prompt)."""
    where = f"source {spec.name!r}"
    if spec.format not in FORMATS:
        raise DataError(
            f"{where}: unknown format {spec.format!r}; known formats: {', '.join(FORMATS)}."
        )
    if spec.limit is not None and (not isinstance(spec.limit, int) or spec.limit < 1):
        raise DataError(f"{where}: limit must be a whole number >= 1 or None, got {spec.limit!r}.")
    most = spec.max_record_bytes
    if not isinstance(most, int) or isinstance(most, bool) or most < 1:
        raise DataError(f"{where}: max_record_bytes must be a whole number >= 1, got {most!r}.")
    given = [x for x in ("path", "records", "hf_name") if getattr(spec, x) is not None]
    if spec.format == "hf" or spec.hf_name is not None:
        if spec.hf_name is None or spec.records is not None:
            raise DataError(f"{where}: the hf format needs hf_name (and no records).")
        parts = [(_read_hf(spec), "auto" if spec.format == "hf" else spec.format)]
    elif len(given) != 1:
        raise DataError(f"{where}: give exactly one of path, records or hf_name (got {given}).")
    elif spec.records is not None:
        parts = [([(f"{where}: record {i}", r) for i, r in enumerate(spec.records)], spec.format)]
    else:
        parts = _read_path(spec)
    out: list[dict] = []
    for raw, fmt in parts:
        raw = raw[: None if spec.limit is None else spec.limit - len(out)]
        if raw:
            fmt = _detect(raw[0][0], raw[0][1]) if fmt in ("auto", "hf") else fmt
            out.extend(_normalise(loc, rec, fmt) for loc, rec in raw)
            if spec.records is not None or spec.hf_name is not None:  # a file's: measured
                _check_sizes(raw, out[len(out) - len(raw) :], most)
    if spec.shard is not None:
        out = _shard(out, spec.shard, where)
    if not out:
        src = f" ({spec.path or spec.hf_name})" if (spec.path or spec.hf_name) else ""
        raise DataError(f"{where}{src} has no records: add records or remove the source.")
    return corrupt_responses(out, spec.corrupt, spec.seed) if spec.corrupt else out


def _check_sizes(raw: Raw, records: list[dict], limit: int) -> None:
    """Refuse a record (in memory, or from `datasets`) whose prompt and response hold more than
    `limit` bytes of UTF-8 text."""
    for (where, _), r in zip(raw, records):
        chars = len(r["prompt"]) + len(r["response"])
        if 4 * chars > limit:  # else it fits whatever its characters
            size = len(r["prompt"].encode()) + len(r["response"].encode())
            if size > limit:
                raise too_long(where, size, limit)


def load_sources(specs: Sequence[SourceSpec]) -> dict[str, list[dict]]:
    """Load every spec; keys sorted by name (the source order everywhere)."""
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"duplicate source names {dupes}: give every source a unique name.")
    if not specs:
        raise DataError("no sources: give at least one training source.")
    loaded = {s.name: load_records(s) for s in specs}
    return {n: loaded[n] for n in sorted(loaded)}


HELD_OUT_ROLES = {"validation": ("validation", "val", "dev"), "test": ("test",)}
"""The held-out sets of a data folder, by the stems of their files."""
HELD_OUT_WORDS = frozenset(
    {"validation", "valid", "val", "dev", "test", "eval", "evaluation", "heldout", "holdout"}
)
"""Words that, inside a longer file name (alpaca_test, val2), make its role a guess: a held-out
set or a source. Such a file is refused unless manifest.json names its role."""
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FolderRoles:
    """The files of a data folder by role: the training sources, the validation and test sets."""

    sources: tuple[Path, ...]
    validation: Path | None
    test: Path | None
    skipped: tuple[str, ...]
    """Entries that are none of these (subfolders, other formats), by name."""


def _manifest_roles(root: Path) -> dict | None:
    """The "roles" of the folder's manifest.json ({"sources": [...], "validation": file,
    "test": file}), or None without one."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}).") from e
    roles = manifest.get("roles") if isinstance(manifest, dict) else None
    if roles is None:
        return None
    form = '{"roles": {"sources": ["a.jsonl", …], "validation": "v.jsonl", "test": "t.jsonl"}}'
    if (
        not isinstance(roles, dict)
        or set(roles) - {"sources", "validation", "test"}
        or not isinstance(roles.get("sources"), list)
        or not all(isinstance(roles.get(k, ""), str) for k in ("validation", "test"))
    ):
        raise DataError(f"{path}: roles must read {form} (file names in the folder).")
    named = [*roles["sources"], *(roles[k] for k in ("validation", "test") if k in roles)]
    missing = [n for n in named if not (root / n).is_file()]
    if missing:
        raise DataError(f"{path}: roles name files that are not in {root}: {missing}.")
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        raise DataError(f"{path}: {twice} given two roles; a file is a source or held out.")
    return roles


def _held_out_words(stem: str) -> list[str]:
    """The words of HELD_OUT_WORDS in a file's stem (alpaca_test: ['test'])."""
    return sorted(HELD_OUT_WORDS & set(re.findall(r"[a-z]+", stem.lower())))


def folder_roles(path: str | os.PathLike[str]) -> FolderRoles:
    """The roles of a data folder's files. With "roles" in manifest.json, as it names them;
    else by name: validation.*, val.*, dev.* the validation set, test.* the test set, every
    other .json/.jsonl/.txt file a source. A name that could be either (`HELD_OUT_WORDS` inside
    a longer name) and several files for one role are refused: which file is held out would be a
    guess."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; give the folder that holds the source files.")
    entries = sorted(f for f in root.iterdir() if not f.name.startswith("."))
    roles = _manifest_roles(root)
    if roles is not None:
        sources = [root / n for n in roles["sources"]]
        held = {k: root / roles[k] for k in ("validation", "test") if k in roles}
    else:
        sources, held = [], {}
        for role, stems in HELD_OUT_ROLES.items():
            found = [f for f in entries if f.is_file() and f.suffix in SUFFIXES and f.stem in stems]
            if len(found) > 1:
                raise DataError(
                    f"{root}: several {role} sets ({', '.join(f.name for f in found)}): keep one "
                    f"file named {stems[0]}.jsonl (or set val_path for the validation set)."
                )
            if found:
                held[role] = found[0]
        for f in entries:
            if not f.is_file() or f.suffix not in SUFFIXES or f in held.values():
                continue
            if f.name == MANIFEST:
                continue
            words = _held_out_words(f.stem)
            if words:
                raise DataError(
                    f"{f}: the name could be a held-out set or a source. Name a held-out set "
                    f"validation.jsonl or test.jsonl and a source without {'/'.join(words)} in "
                    f"its name, or give the roles in {root / MANIFEST}: "
                    '{"roles": {"sources": [...], "validation": "...", "test": "..."}}.'
                )
            sources.append(f)
    used = {*sources, *held.values(), root / MANIFEST}
    skipped = tuple(f.name + ("/" if f.is_dir() else "") for f in entries if f not in used)
    for f in sources:
        if f.suffix not in SUFFIXES:
            raise DataError(f"{f}: a source is a {'/'.join(SUFFIXES)} file.")
    return FolderRoles(tuple(sources), held.get("validation"), held.get("test"), skipped)


def held_out_files(path: str | os.PathLike[str]) -> dict[str, Path]:
    """The validation and test files of a data folder (`folder_roles`), by role."""
    roles = folder_roles(path)
    return {k: v for k, v in (("validation", roles.validation), ("test", roles.test)) if v}


def leaks(
    sources: Mapping[str, list[dict]],
    held_out: Mapping[str, list[dict]],
    where: Mapping[str, str] | None = None,
) -> list[str]:
    """One line per held-out set (validation, test) whose records the training data also holds
    (the same prompt and response): how many of its records, in which sources (named by
    `where`, e.g. their file, else by name), and the fix. Held-out data that training sees reads
    too well; these lines are what `build_data`, `sft` and `resample` warn."""
    where = where or {}
    keys = {n: {(r["prompt"], r["response"]) for r in v} for n, v in sources.items()}
    seen = set().union(*keys.values()) if keys else set()
    out = []
    for role, recs in held_out.items():
        found = sum((r["prompt"], r["response"]) in seen for r in recs)
        if not found:
            continue
        per = {
            where.get(n, n): sum((r["prompt"], r["response"]) in k for r in recs)
            for n, k in keys.items()
        }
        shown = ", ".join(f"{n}: {c}" for n, c in per.items() if c)
        out.append(
            f"{found} of {len(recs)} {role} records are in the training data too ({shown}): "
            f"the model trains on them, so the {role} set's loss reads low (and its accuracy "
            f"high). Remove them from the training data or from the {role} set."
        )
    return out


def specs_from_dir(path: str | os.PathLike[str]) -> list[SourceSpec]:
    """One source per training file of `path` (`folder_roles`), named after the file stem,
    sorted by name; the held-out files and those skipped are said."""
    root = Path(path)
    roles = folder_roles(root)
    files = list(roles.sources)
    held_out = sorted(f.name for f in (roles.validation, roles.test) if f is not None)
    if held_out:
        messages.warn(f"{root}: {', '.join(held_out)} held out, not trained on.", stacklevel=2)
    if roles.skipped:
        messages.warn(
            f"{root}: skipped {', '.join(roles.skipped)}: a source is one {'/'.join(SUFFIXES)} "
            "file of the folder (subfolders and other formats are not read).",
            stacklevel=2,
        )
    stems = [f.stem for f in files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise DataError(f"{root}: several files per source name {dupes}; keep one file each.")
    if not files:
        raise DataError(f"{root} has no {'/'.join(SUFFIXES)} source files (besides validation).")
    if len(files) == 1:
        messages.warn(
            f"{root}: one source ({files[0].name}): its weight is 1 whatever the run does; "
            "reweighting needs two or more source files.",
            stacklevel=2,
        )
    return [SourceSpec(name=f.stem, path=str(f)) for f in sorted(files, key=lambda f: f.stem)]


# ---------------------------------------------------------------- tokenization


@dataclass
class TokenizedData:
    """Tokenized samples of all sources; labels are -100 on prompt tokens."""

    names: tuple[str, ...]
    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    source_ids: torch.Tensor
    dropped: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    """Per source: records read, and how many were dropped (no response tokens: an empty
    response, or a prompt that fills max_length) or had their prompt cut from the left."""

    def counts(self) -> torch.Tensor:  # samples per source [K]
        return torch.bincount(self.source_ids, minlength=len(self.names))

    def __len__(self) -> int:
        return len(self.input_ids)


def _fingerprint(
    recs: Mapping[str, list[dict]],
    names: Sequence[str],
    tokenizer: Any,
    max_length: int,
    prefix: list[int],
    truncate_prompts: bool = False,
) -> str:
    h = hashlib.sha256()
    meta = [
        CACHE_VERSION,
        list(names),
        max_length,
        prefix,
        truncate_prompts,
        tokenizer.eos_token_id,
        type(tokenizer).__name__,
    ]
    h.update(json.dumps(meta).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab()))
    h.update(vocab.encode())
    for name in sorted(recs):
        h.update(b"\0source\0" + name.encode())
        for r in recs[name]:
            h.update(b"\0" + r["prompt"].encode() + b"\1" + r["response"].encode())
    return h.hexdigest()[:20]


def _is_record(r: Any) -> bool:
    return isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("prompt", "response"))


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


DROP_REASONS = ("empty response", "prompt that fills max_length")


def _tokenize_source(
    recs: list[dict], tokenizer: Any, max_length: int, prefix: list[int], truncate_prompts: bool
) -> tuple[list[list[int]], list[list[int]], dict[str, int]]:
    """(ids, labels, counts: records, each of DROP_REASONS, "prompt truncated", and "first", the
    index of the first record dropped or -1)."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompts = _encode(tokenizer, [r["prompt"] for r in recs])
    responses = _encode(tokenizer, [r["response"] for r in recs])
    ids_out, labels_out, bad = [], [], []
    counts = {"records": len(recs), **dict.fromkeys(DROP_REASONS, 0), "prompt truncated": 0}
    for i, (r, p_ids, r_ids) in enumerate(zip(recs, prompts, responses)):
        if not r["response"].strip():
            bad.append(i)
            counts["empty response"] += 1
        elif r["prompt"] == "":  # language-model text: chunks of max_length, none dropped
            ids = prefix + r_ids + eos
            chunks = [ids[a : a + max_length] for a in range(0, len(ids), max_length)]
            chunks = [c for c in chunks if len(c) >= 2]  # a 1-token chunk predicts nothing
            ids_out += chunks
            labels_out += [list(c) for c in chunks]
        else:
            keep = max_length - len(prefix) - min(len(r_ids) + len(eos), max_length // 2)
            if truncate_prompts and len(prefix) + len(p_ids) + len(r_ids) + len(eos) > max_length:
                if len(p_ids) > keep:  # the prompt's end, next to the response, stays
                    p_ids = p_ids[len(p_ids) - max(keep, 0) :]
                    counts["prompt truncated"] += 1
            p_ids = prefix + p_ids
            ids = (p_ids + r_ids + eos)[:max_length]
            if len(ids) <= len(p_ids):
                bad.append(i)
                counts["prompt that fills max_length"] += 1
                continue
            ids_out.append(ids)
            labels_out.append([IGNORE] * len(p_ids) + ids[len(p_ids) :])
    counts["first"] = bad[0] if bad else -1
    return ids_out, labels_out, counts


AUTO_PERCENTILE = 95
AUTO_MAX_LENGTH = 2048
"""The largest max_length 'auto' chooses (activations grow with it; set max_length for more)."""
AUTO_SAMPLE = 2000
"""Records per source whose token lengths 'auto' measures (evenly spaced through the source)."""


def auto_max_length(
    records_by_source: Mapping[str, list[dict]], tokenizer: Any, context: int | None
) -> tuple[int, str]:
    """max_length 'auto': the AUTO_PERCENTILE-th percentile of the records' token lengths
    (special tokens, prompt, response, end of text), rounded up to a multiple of 16, at most
    `context` (the model's positions) and AUTO_MAX_LENGTH; and a line that says how it was chosen.
    """
    prefix = [
        t
        for t in tokenizer("", add_special_tokens=True)["input_ids"]
        if t != tokenizer.eos_token_id
    ]
    extra = len(prefix) + (tokenizer.eos_token_id is not None)
    lengths = []
    for recs in records_by_source.values():
        step = max(1, len(recs) // AUTO_SAMPLE)
        some = recs[::step][:AUTO_SAMPLE]
        prompts = _encode(tokenizer, [r["prompt"] for r in some])
        responses = _encode(tokenizer, [r["response"] for r in some])
        lengths += [extra + len(p) + len(r) for p, r in zip(prompts, responses)]
    if not lengths:
        raise DataError("max_length 'auto' measures the records, and there are none.")
    lengths.sort()
    q = lengths[max(0, -(-AUTO_PERCENTILE * len(lengths) // 100) - 1)]
    cap = min(AUTO_MAX_LENGTH, context or AUTO_MAX_LENGTH)
    n = min(cap, max(16, -(-q // 16) * 16))
    why = f"max_length = {n} (auto: the {AUTO_PERCENTILE}th percentile of {len(lengths)} records' "
    why += f"token lengths is {q}"
    if n < q:
        where = "the model's context" if cap == context else "AUTO_MAX_LENGTH"
        why += f"; capped at {where}, {cap}"
    why += ")"
    return n, why


def _check_dropped(
    name: str, counts: dict[str, int], max_length: int, strict: bool, most: float
) -> None:
    """Refuse a source that loses records under `strict`, or more than `most` of them."""
    lost, n = sum(counts[k] for k in DROP_REASONS), counts["records"]
    if not lost or (not strict and lost <= most * n):
        return
    why = ", ".join(f"{counts[k]} with {'an ' if k[0] == 'e' else 'a '}{k}" for k in DROP_REASONS)
    rule = (
        "strict_data is on (every record must train)"
        if strict
        else f"that is more than max_drop_share = {most:.0%} of the source"
    )
    raise DataError(
        f"source {name!r}: {lost} of {n} samples have no response tokens ({why}); first: "
        f"record {counts['first']}; {rule}. Raise max_length (now {max_length}) or shorten the "
        "prompts (truncate_prompts: true cuts them from the left); drop empty responses."
    )


def source_table(
    specs: Sequence[SourceSpec], data: Sequence[TokenizedData], max_length: int
) -> str:
    """A table of the sources and held-out sets a run reads: where each comes from, its records,
    those dropped, its samples and tokens, and the share of samples cut at max_length."""
    where = {s.name: s.path or s.hf_name or "(in memory)" for s in specs}
    head = ("source", "from", "records", "dropped", "samples", "tokens", "at max_length")
    rows = []
    for d in data:
        lengths = torch.tensor([len(x) for x in d.input_ids], dtype=torch.long)
        for k, name in enumerate(d.names):
            mine = lengths[d.source_ids == k]
            c = d.dropped.get(name, {})
            rows.append(
                (
                    name,
                    str(where.get(name, "")),
                    str(c.get("records", len(mine))),
                    str(sum(c.get(r, 0) for r in DROP_REASONS)),
                    str(len(mine)),
                    str(int(mine.sum())),
                    f"{float((mine >= max_length).float().mean()) if len(mine) else 0.0:.0%}",
                )
            )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join
    out = [line(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    out += [line(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def say_dropped(data: TokenizedData, max_length: int) -> list[str]:
    """Warn, per source, of the records dropped and the prompts cut; returns the lines."""
    lines = []
    for name, c in data.dropped.items():
        parts = [f"{c[k]} with {'an ' if k[0] == 'e' else 'a '}{k}" for k in DROP_REASONS if c[k]]
        if parts:
            lines.append(
                f"source {name!r}: dropped {sum(c[k] for k in DROP_REASONS)} of {c['records']} "
                f"records ({', '.join(parts)}; max_length = {max_length})"
            )
        if c["prompt truncated"]:
            lines.append(
                f"source {name!r}: {c['prompt truncated']} of {c['records']} prompts cut from the "
                "left (truncate_prompts)"
            )
    for line in lines:
        messages.warn(line, stacklevel=2)
    return lines


def tokenize(
    records_by_source: Mapping[str, list[dict]],
    tokenizer: Any,
    max_length: int,
    cache_dir: str | os.PathLike[str] | None = None,
    names: Sequence[str] | None = None,
    strict: bool = True,
    max_drop_share: float = 0.0,
    truncate_prompts: bool = False,
) -> TokenizedData:
    """Tokenize prompt and response separately, concatenate, keep the first max_length tokens.

    `names` fixes the source order (default: sorted keys); a name without records gets no samples.
    A record without response tokens (an empty response, or a prompt that fills max_length) is
    dropped and counted in `dropped`, unless `strict` or more than `max_drop_share` of its source
    would go (a DataError naming the counts and the fixes). `truncate_prompts` cuts an
    over-long prompt from the left, so that up to max_length // 2 response tokens remain.
    With `cache_dir`, the result is cached under a hash of the records, the tokenizer, max_length
    and `truncate_prompts` (written atomically) and loaded from there next time.
    """
    if tokenizer.pad_token_id is None:
        raise DataError(NO_PAD)
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be a whole number >= 2, got {max_length!r}.")
    names = tuple(sorted(records_by_source) if names is None else names)
    unknown = sorted(set(records_by_source) - set(names))
    if unknown or len(set(names)) != len(names):
        raise DataError(
            f"names {list(names)} must be unique and include every source; missing: {unknown}."
        )
    for n, recs in records_by_source.items():
        if not recs:
            raise DataError(f"source {n!r} has no records: add records or remove the source.")
        bad = next((i for i, r in enumerate(recs) if not _is_record(r)), None)
        if bad is not None:
            raise DataError(
                f"source {n!r}: record {bad} is not a normalised record with string "
                "'prompt' and 'response'; load the source with load_records first."
            )
    prefix = [
        t
        for t in tokenizer("", add_special_tokens=True)["input_ids"]
        if t != tokenizer.eos_token_id
    ]
    path = None
    if cache_dir is not None:
        key = _fingerprint(
            records_by_source, names, tokenizer, max_length, prefix, truncate_prompts
        )
        path = Path(cache_dir) / f"tokenized-{key}.pt"
    data = _load_cache(path, names) if path is not None and path.is_file() else None
    if data is None:
        ids, labels, src, dropped = [], [], [], {}
        for s, name in enumerate(names):
            if name in records_by_source:
                recs = records_by_source[name]
                i, lab, dropped[name] = _tokenize_source(
                    recs, tokenizer, max_length, prefix, truncate_prompts
                )
                ids += i
                labels += lab
                src += [s] * len(i)
        data = TokenizedData(
            names=names,
            input_ids=[torch.tensor(x, dtype=torch.long) for x in ids],
            labels=[torch.tensor(x, dtype=torch.long) for x in labels],
            source_ids=torch.tensor(src, dtype=torch.long),
            dropped=dropped,
        )
        if path is not None:
            _save_cache(data, path)
    for name, c in data.dropped.items():  # a cached result is checked as a fresh one
        _check_dropped(name, c, max_length, strict, max_drop_share)
    return data


def _save_cache(data: TokenizedData, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "names": list(data.names),
        "lengths": torch.tensor([len(x) for x in data.input_ids], dtype=torch.long),
        "input_ids": torch.cat([*data.input_ids, torch.zeros(0, dtype=torch.long)]),
        "labels": torch.cat([*data.labels, torch.zeros(0, dtype=torch.long)]),
        "source_ids": data.source_ids,
        "dropped": data.dropped,
    }
    save_torch(path, blob)  # atomic: readers see the old state or the whole file


CACHE_ERRORS = (
    RuntimeError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)
"""What `torch.load` and the unpacking raise on a torn or foreign cache file."""


def _load_cache(path: Path, names: Sequence[str]) -> TokenizedData | None:
    """A cached tokenization, or None when the file cannot be read whole (torn by a crash or a
    full disk, or not ours): it is deleted, with a warning naming it, and its caller tokenizes
    again and rewrites that entry alone."""
    try:
        blob = torch.load(path, weights_only=True)
        lengths = blob["lengths"].tolist()
        data = TokenizedData(
            names=tuple(blob["names"]),
            input_ids=list(torch.split(blob["input_ids"], lengths)),
            labels=list(torch.split(blob["labels"], lengths)),
            source_ids=blob["source_ids"],
            dropped=blob.get("dropped", {}),
        )
        if data.names != tuple(names) or len(data.source_ids) != len(lengths):
            raise ValueError(f"it holds sources {list(data.names)}, not {list(names)}")
        return data
    except CACHE_ERRORS as e:
        why = (str(e).split(". ")[0] or type(e).__name__)[:120]
        messages.warn(
            f"{path}: a tokenized-cache file that cannot be read ({why}); deleted, tokenizing "
            "again and rewriting it.",
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
        return None
