"""Models and tokenizers: the embedded GPT-2 sizes offline, anything else via `from_pretrained`.

``load_model("embedded:tiny")`` builds a random-init GPT-2 whose weights depend only on ``seed``
(the global torch RNG is left untouched); any other name goes to
``AutoModelForCausalLM.from_pretrained``, so a local directory works offline and a hub name needs
the hub (or its local cache). ``save_tiny_model`` writes a tiny random model of a real architecture
(GPT-2, Llama, GPT-NeoX, Qwen2, Gemma2) plus a fitting tokenizer, so the `from_pretrained` path is
tested without a hub.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from accelerate import init_empty_weights
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from ..errors import ConfigError, ModelError
from ..sources.tokenizer import EOS, PAD, SPECIAL_TOKENS, get_tokenizer
from .config import ATTENTION, CONFIG_DIR

EMBEDDED_PREFIX = "embedded"
RANDOM_PREFIX = "random:"
MODEL_CONFIGS = CONFIG_DIR / "models"
"""Architectures shipped with the project (`org__name.json`): the memory model's and
`random:<org/name>`'s shapes of the paper's models."""
DEFAULT_VOCAB = 2048  # the embedded tokenizer's size; `len(get_tokenizer())`
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# GPT-2 configs (GPT2Config kwargs; vocab_size comes from the tokenizer). Dropout is off: the
# bilevel step compares losses of w and u on the same batch, and dropout noise would blur them.
_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
EMBEDDED_SIZES: dict[str, dict] = {
    "nano": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 256, **_NO_DROPOUT},  # 0.25M
    "tiny": {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 256, **_NO_DROPOUT},  # 1.1M
    "small": {"n_layer": 6, "n_embd": 256, "n_head": 8, "n_positions": 256, **_NO_DROPOUT},  # 5.3M
    # 8 narrow blocks: LISA with 1, 2, 4 of 8 active blocks on a CPU (0.55M)
    "deep": {"n_layer": 8, "n_embd": 64, "n_head": 4, "n_positions": 256, **_NO_DROPOUT},
}
# Tiny configs of real architectures (kwargs of each model type's Config class), for offline tests.
TINY_ARCHS: dict[str, dict] = {
    "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_inner": 64, "n_positions": 128},
    "llama": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    },
    "gpt_neox": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    },
    "qwen2": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    },
    "gemma2": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "query_pre_attn_scalar": 8,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "sliding_window": 64,
    },
}
_TRUE = {"1", "ON", "YES", "TRUE"}
_GENERIC_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}


# ---------------------------------------------------------------- helpers


@contextmanager
def _seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with the torch RNG seeded by `seed` (the CPU's, and `device`'s when it is a
    GPU), restoring the global state after."""
    gpus = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now, or as huggingface_hub read it at import."""
    env = [os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE")]
    if any(v is not None and v.upper() in _TRUE for v in env):
        return True
    return bool(hub_constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    """A name that can only be a filesystem path (a hub id is `name` or `org/name`)."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith("/")
    )


def _in_hub_cache(name: str, files: tuple[str, ...]) -> bool:
    """Whether any of `files` of hub repo `name` is in the local HF cache (no network)."""
    for f in files:
        try:
            if isinstance(try_to_load_from_cache(name, f), str):
                return True
        except ValueError:  # not a valid repo id
            return False
    return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub endpoint opens within `timeout` (assumed so behind a proxy)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(hub_constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(
    loader: Callable[..., Any],
    name: str,
    what: str,
    probe: tuple[str, ...],
    local_only: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """`loader(name, **kwargs)`, with a ModelError naming the fix for a bad path or no hub.

    A hub name is read from the local HF cache when the hub is offline (HF_HUB_OFFLINE) or cannot
    be reached; if no file in `probe` is cached it fails at once, before any network request
    (transformers retries for ~25 s otherwise). `local_only` adds loader kwargs for that case.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        try:
            return loader(str(local), **kwargs)
        except (OSError, ValueError) as e:
            raise ModelError(
                f"could not load the {what} from the local directory '{name}': {e}. Point to a "
                f"directory written by save_pretrained (config.json, weights, tokenizer files)."
            ) from e
    if _looks_like_path(name) or local.exists():
        raise ModelError(
            f"'{name}' is not a directory. Pass the folder that save_pretrained wrote, or a hub "
            f"name such as 'gpt2' or 'meta-llama/Meta-Llama-3-8B'."
        )
    fix = (
        f"Download it on a machine with internet (huggingface-cli download {name}) and pass "
        f"the local path"
    )
    offline = _hub_offline()
    if offline or not _hub_reachable():
        if not _in_hub_cache(name, probe):
            if offline:
                raise ModelError(
                    f"'{name}' is not a local directory and the model hub is offline "
                    f"(HF_HUB_OFFLINE=1). {fix}, or unset HF_HUB_OFFLINE."
                )
            raise ModelError(
                f"'{name}' is not a local directory, not in the local hub cache, and the model hub "
                f"cannot be reached (no network?). {fix}."
            )
        kwargs = {**kwargs, **(local_only or {}), "local_files_only": True}
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"could not load the {what} '{name}': {e}. Check the name (and access rights for a "
            f"gated model such as Llama: huggingface-cli login), or: {fix}."
        ) from e


def _declares_generic_tokenizer(path: Path) -> bool:
    """`path` holds a tokenizer.json whose tokenizer_config.json names the generic fast class."""
    cfg = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not cfg.is_file():
        return False
    try:
        declared = json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError):
        return False
    return declared in _GENERIC_TOKENIZERS


def _embedded_size(name: str) -> str:
    size = name.partition(":")[2] or "tiny"
    if size not in EMBEDDED_SIZES:
        raise ModelError(
            f"unknown embedded model size '{size}' in '{name}'; the sizes are "
            f"{', '.join(repr(f'{EMBEDDED_PREFIX}:{s}') for s in EMBEDDED_SIZES)}."
        )
    return size


def _is_embedded(name: str) -> bool:
    return name == EMBEDDED_PREFIX or name.startswith(EMBEDDED_PREFIX + ":")


def is_random(name: str) -> bool:
    """A `random:<architecture>` model: the architecture's real shapes, random weights."""
    return name.startswith(RANDOM_PREFIX)


def architecture(name_or_path: str) -> Any:
    """A model's architecture (its transformers config, no weights): an embedded model, a local
    config.json or a folder holding one, one shipped in configs/models/ (`org/name` as
    `org__name.json`), or the hub's cache."""
    if _is_embedded(name_or_path):
        return _embedded_config(name_or_path, None, None, "auto")
    if is_random(name_or_path):
        return architecture(name_or_path[len(RANDOM_PREFIX) :])
    path = Path(name_or_path).expanduser()
    shipped = MODEL_CONFIGS / f"{name_or_path.replace('/', '__')}.json"
    for c in (path / "config.json", path, shipped):
        if c.is_file():
            d = json.loads(c.read_text())
            kind = d.pop("model_type", None)
            if kind not in CONFIG_MAPPING:
                raise ConfigError(f"{c}: unknown model_type {kind!r}.")
            return CONFIG_MAPPING[kind](**{k: v for k, v in d.items() if k != "architectures"})
    if not _looks_like_path(name_or_path) and _in_hub_cache(name_or_path, ("config.json",)):
        return _from_pretrained(
            AutoConfig.from_pretrained, name_or_path, "config", ("config.json",)
        )
    known = sorted(p.stem.replace("__", "/") for p in MODEL_CONFIGS.glob("*.json"))
    raise ConfigError(
        f"no config for {name_or_path!r}: pass a folder or config.json, a model in the hub's "
        f"cache, or one of the shipped configs {known}."
    )


def _random_model(
    name: str,
    vocab_size: int | None,
    seed: int,
    dtype: torch.dtype,
    attn_implementation: str,
    device: torch.device | None,
) -> nn.Module:
    """`random:<architecture>`, built where it will train (`device`; default the CPU) in `dtype`:
    no whole fp32 copy anywhere, no weights read. For measuring memory and speed at a real
    model's shape (benchmarks/gpu_check.py --paper-scale), never for results."""
    config = architecture(name)
    text = config.get_text_config()
    if vocab_size is not None and vocab_size > text.vocab_size:
        text.vocab_size = vocab_size
    device = torch.device(device or "cpu")
    with _seeded(seed, device), device:
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, **_attention_kwargs(attn_implementation)
        )
    return model


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def _context_length(config: Any) -> int | None:
    for attr in ("n_positions", "max_position_embeddings"):
        n = getattr(config, attr, None)
        if isinstance(n, int):
            return n
    return None


# ---------------------------------------------------------------- public API


def load_tokenizer(
    name_or_path: str = "embedded",
    vocab_size: int = DEFAULT_VOCAB,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_pad_from_eos: bool = True,
) -> Any:
    """The embedded BPE tokenizer (``"embedded"`` or ``"embedded:<size>"``), else `AutoTokenizer`.

    `vocab_size` and `cache_dir` apply to the embedded tokenizer only. A local directory whose
    tokenizer_config.json declares the generic class (TokenizersBackend / PreTrainedTokenizerFast)
    loads its tokenizer.json as saved: AutoTokenizer would swap in a model-specific class for some
    model types (e.g. Qwen2Tokenizer, with its own pre-tokenizer), changing the token ids.
    Hub tokenizers such as gpt2 or Llama have no pad token; with `allow_pad_from_eos` (default)
    the pad token becomes the eos token (then mask padding by the attention mask, not by pad id,
    so real eos tokens still count), otherwise ModelError.
    """
    if _is_embedded(name_or_path):
        tok = get_tokenizer(vocab_size, cache_dir=cache_dir)
    else:
        generic = _declares_generic_tokenizer(Path(name_or_path).expanduser())
        loader = PreTrainedTokenizerFast if generic else AutoTokenizer
        tok = _from_pretrained(
            loader.from_pretrained,
            name_or_path,
            "tokenizer",
            ("tokenizer_config.json", "tokenizer.json", "config.json"),
        )
    if tok.pad_token is None:
        if not allow_pad_from_eos:
            raise ModelError(
                f"tokenizer '{name_or_path}' has no pad token; pass allow_pad_from_eos=True to pad "
                f"with the eos token, or set tokenizer.pad_token before training."
            )
        if tok.eos_token is None:
            raise ModelError(
                f"tokenizer '{name_or_path}' has neither a pad nor an eos token; set "
                f"tokenizer.pad_token (e.g. tokenizer.add_special_tokens({{'pad_token': '<pad>'}}) "
                f"and resize the model's embeddings)."
            )
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str = "embedded:tiny",
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    max_positions: int | None = None,
    attn_implementation: str = "auto",
    device: torch.device | str | None = None,
) -> nn.Module:
    """A causal LM: an embedded GPT-2 size (random init from `seed`), `random:<architecture>`
    (an architecture's shapes with random weights from `seed`, built on `device` in `dtype`:
    `architecture`) or `from_pretrained`.

    ``"embedded:<size>"`` (sizes in `EMBEDDED_SIZES`) builds a GPT-2 with `vocab_size` (default
    2048, the embedded tokenizer) and `max_positions` positions (default 256); its weights depend
    only on `seed`, and the global torch RNG is unchanged. Any other name is a local directory or a
    hub name for `AutoModelForCausalLM`; there `vocab_size` larger than the embeddings grows them
    (`resize_token_embeddings`, seeded) and `max_positions` beyond the model's context is an error.
    `attn_implementation` ('sdpa', 'eager', 'flash_attention_2') is transformers' attention kernel;
    'auto' leaves the choice to transformers (sdpa where the architecture supports it).
    """
    torch_dtype = _dtype(dtype)
    check_attention(attn_implementation)
    if _is_embedded(name_or_path):
        config = _embedded_config(name_or_path, vocab_size, max_positions, attn_implementation)
        with _seeded(seed):
            model = GPT2LMHeadModel(config)
        return model.to(torch_dtype)
    if is_random(name_or_path):
        return _random_model(
            name_or_path, vocab_size, seed, torch_dtype, attn_implementation, device
        )

    model = _from_pretrained(
        AutoModelForCausalLM.from_pretrained,
        name_or_path,
        "model",
        ("config.json",),
        {"adapter_kwargs": {"local_files_only": True}},
        dtype=torch_dtype,
        **_attention_kwargs(attn_implementation),
    )
    n_ctx = _context_length(model.config)
    if max_positions is not None and n_ctx is not None and max_positions > n_ctx:
        raise ModelError(
            f"max_positions={max_positions} exceeds the context length of '{name_or_path}' "
            f"({n_ctx}); use a shorter max_length or a model with a longer context."
        )
    if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
        with _seeded(seed):
            model.resize_token_embeddings(vocab_size)
    return model


def _embedded_config(
    name: str, vocab_size: int | None, max_positions: int | None, attn_implementation: str
) -> GPT2Config:
    kwargs = dict(EMBEDDED_SIZES[_embedded_size(name)])
    if max_positions is not None:
        kwargs["n_positions"] = max_positions
    eos, pad = (SPECIAL_TOKENS.index(t) for t in (EOS, PAD))
    return GPT2Config(
        **kwargs,
        vocab_size=DEFAULT_VOCAB if vocab_size is None else vocab_size,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        **_attention_kwargs(attn_implementation),
    )


def empty_model(
    name_or_path: str = "embedded:tiny",
    vocab_size: int | None = None,
    dtype: str = "float32",
    attn_implementation: str = "auto",
) -> nn.Module:
    """The model `load_model` returns, with its parameters on the meta device (no memory, no
    weights read) and its buffers real: the skeleton that a sharded run fills from rank 0."""
    torch_dtype = _dtype(dtype)
    check_attention(attn_implementation)
    if _is_embedded(name_or_path):
        config = _embedded_config(name_or_path, vocab_size, None, attn_implementation)
        with init_empty_weights(include_buffers=False):
            model = GPT2LMHeadModel(config).to(torch_dtype)
        model.tie_weights()  # the context's new meta parameters undo the tie
        return model
    config = model_config(name_or_path)
    text = config.get_text_config()
    if vocab_size is not None and vocab_size > text.vocab_size:
        text.vocab_size = vocab_size  # as load_model's resize_token_embeddings
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch_dtype, **_attention_kwargs(attn_implementation)
        )
    model.tie_weights()
    return model


def _attention_kwargs(name: str) -> dict[str, str]:
    return {} if name == "auto" else {"attn_implementation": name}


def check_attention(name: str) -> None:
    """Refuse an attention kernel that cannot run here, naming the fix."""
    if name not in ATTENTION:
        raise ModelError(f"unknown attn_implementation {name!r}; use one of {ATTENTION}.")
    if name != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ModelError(
            "attn_implementation=flash_attention_2 needs the flash-attn package: pip install "
            "flash-attn --no-build-isolation (CUDA GPUs), or use attn_implementation=sdpa."
        )
    if not torch.cuda.is_available():
        raise ModelError(
            "attn_implementation=flash_attention_2 runs on CUDA GPUs only; on this machine use "
            "attn_implementation=sdpa."
        )


def check_compatible(model: nn.Module, tokenizer: Any) -> None:
    """Raise ModelError if `tokenizer` can produce ids the model cannot embed, or cannot pad."""
    n_emb = model.get_input_embeddings().num_embeddings
    n_tok = len(tokenizer)
    if n_tok > n_emb:
        raise ModelError(
            f"the tokenizer has {n_tok} tokens but the model embeds only {n_emb}; call "
            f"model.resize_token_embeddings(len(tokenizer)) (or load_model(..., "
            f"vocab_size=len(tokenizer))), or use the tokenizer that matches the model."
        )
    if tokenizer.pad_token is None:
        raise ModelError(
            "the tokenizer has no pad token; load it with load_tokenizer(..., "
            "allow_pad_from_eos=True) or set tokenizer.pad_token."
        )


def model_config(name_or_path: str | nn.Module) -> Any:
    """The model's config alone (embedded, `random:<architecture>`, a local folder, or the hub's
    cache), no weights; a model object's own config."""
    if isinstance(name_or_path, nn.Module):
        return name_or_path.config
    if _is_embedded(name_or_path) or is_random(name_or_path):
        return architecture(name_or_path)
    return _from_pretrained(AutoConfig.from_pretrained, name_or_path, "config", ("config.json",))


def model_label(name_or_path: str | nn.Module) -> str:
    """How messages name a model: its name, or a model object's name_or_path (else its class)."""
    if isinstance(name_or_path, nn.Module):
        config = getattr(name_or_path, "config", None)
        return getattr(config, "name_or_path", "") or type(name_or_path).__name__
    return name_or_path


def context_limit(name_or_path: str | nn.Module) -> int | None:
    """The positions the model can embed (None where its config does not say)."""
    text = model_config(name_or_path).get_text_config()
    return getattr(text, "n_positions", None) or getattr(text, "max_position_embeddings", None)


def check_context(name_or_path: str | nn.Module, max_length: int) -> None:
    """Refuse a max_length beyond the positions the model can embed, before anything runs."""
    limit = context_limit(name_or_path)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"max_length = {max_length} but {model_label(name_or_path)} embeds at most {limit} "
            f"positions: set max_length <= {limit}, or choose a model with a longer context."
        )


def clone_model(model: nn.Module) -> nn.Module:
    """An independent deep copy (e.g. the follower u of w): equal weights, separate storage."""
    return copy.deepcopy(model)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_tiny_model(
    arch: str,
    path: str | os.PathLike[str],
    vocab_size: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    config_overrides: dict | None = None,
) -> Path:
    """Save a tiny random-init `arch` model (2 layers) and a fitting tokenizer to `path`;
    `config_overrides` change fields of its config (a context length, say).

    `arch` is a key of `TINY_ARCHS` (a transformers model type). The tokenizer is the embedded BPE
    of size min(`vocab_size`, 2048) (default 2048; at least 258), so ``load_model(path)`` and
    ``load_tokenizer(path)`` work offline. Weights depend only on `seed`. Returns `path`.
    """
    if arch not in TINY_ARCHS:
        raise ModelError(f"unknown architecture '{arch}'; choose one of {', '.join(TINY_ARCHS)}.")
    vocab_size = DEFAULT_VOCAB if vocab_size is None else vocab_size
    n_min = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_min:
        raise ModelError(
            f"vocab_size={vocab_size} is too small for the byte-level tokenizer; use >= {n_min}."
        )
    tok = get_tokenizer(min(vocab_size, DEFAULT_VOCAB), cache_dir=cache_dir)
    config = AutoConfig.for_model(
        arch,
        **{**TINY_ARCHS[arch], **(config_overrides or {})},
        vocab_size=vocab_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(config)
    out = Path(path)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
