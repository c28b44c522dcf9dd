"""Offline byte-level BPE tokenizer, trained on the embedded corpora and cached on disk.

``get_tokenizer()`` returns a transformers ``PreTrainedTokenizerFast`` (v5: an alias of
``TokenizersBackend``) with ``<|endoftext|>`` as bos/eos/unk and ``<|pad|>`` as pad. It is trained
once per (vocabulary size, training text, library version) and cached under
``$SCALEBIO_CACHE`` (default ``~/.cache/scalebio_core``) as ``tokenizer-v{vocab}-{hash}``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ..files import atomic_dir
from .corpora import build_corpus

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)  # ids 0 and 1
FORMAT_VERSION = 1  # bump when the training recipe changes
# Corpus sizes used for training text (seed 0): every embedded corpus contributes.
TRAINING_CORPORA: dict[str, dict[str, int]] = {
    "instruction": {"n_per_task": 100, "n_val": 100},
    "noisy": {"n_per_source": 200, "n_val": 0},
    "multilingual_templates": {"n_per_source": 1000, "n_val": 200},
    "informative": {"n_terse": 300, "n_detailed": 300, "n_val": 0},
    "math": {"n": 200, "n_val": 0},
}


@functools.lru_cache(maxsize=1)
def training_texts() -> tuple[str, ...]:
    """Every record of every embedded corpus (fixed sizes, seed 0), as plain strings."""
    out: list[str] = []
    for name, kwargs in TRAINING_CORPORA.items():
        out.extend(build_corpus(name, seed=0, **kwargs).texts())
    return tuple(out)


def _fingerprint(vocab_size: int) -> str:
    h = hashlib.sha256()
    meta = f"v{FORMAT_VERSION}|{vocab_size}|{SPECIAL_TOKENS}|tokenizers {tokenizers.__version__}"
    h.update(meta.encode())
    for t in training_texts():
        h.update(b"\0" + t.encode("utf-8"))
    return h.hexdigest()[:12]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$SCALEBIO_CACHE``, else ~/.cache/scalebio_core."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SCALEBIO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "scalebio_core"


def tokenizer_path(vocab_size: int = 2048, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the tokenizer of this vocabulary size is (or would be) cached."""
    return cache_root(cache_dir) / f"tokenizer-v{vocab_size}-{_fingerprint(vocab_size)}"


def train_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on `training_texts()` (deterministic; no disk access)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )


def get_tokenizer(
    vocab_size: int = 2048, cache_dir: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerFast:
    """Load the cached tokenizer, or train it and cache it atomically (`files.atomic_dir`)."""
    path = tokenizer_path(vocab_size, cache_dir)
    if not (path / "tokenizer.json").is_file():
        with atomic_dir(path, complete=lambda p: (p / "tokenizer.json").is_file()) as tmp:
            train_tokenizer(vocab_size).save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(str(path))
