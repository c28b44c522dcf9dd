"""Models: embedded GPT-2 sizes and seeding, tiny real architectures through from_pretrained, and
the error messages for an offline hub, a bad size or dtype, a vocabulary mismatch, a missing pad."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants

from scalebio_core.core.blocks import find_blocks
from scalebio_core.sources.tokenizer import get_tokenizer
from scalebio_core.train import models as M

# Documented parameter ranges (vocabulary 2048, 256 positions).
SIZE_RANGES = {
    "nano": (0.1e6, 0.3e6),
    "tiny": (0.8e6, 1.5e6),
    "small": (5e6, 10e6),
    "deep": (0.4e6, 0.7e6),
}
TEXTS = ["Tom has 3 apples and buys 4 more. The answer is 7.", "Le billet coûte 36,89\xa0€."]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: M.save_tiny_model(arch, root / arch, seed=0) for arch in M.TINY_ARCHS}


# ---------------------------------------------------------------- embedded sizes


@pytest.mark.parametrize("size", list(M.EMBEDDED_SIZES))
def test_embedded_sizes_in_documented_range(size: str) -> None:
    model = M.load_model(f"embedded:{size}")
    lo, hi = SIZE_RANGES[size]
    assert lo <= M.count_parameters(model) <= hi
    cfg = model.config
    assert cfg.vocab_size == M.DEFAULT_VOCAB == len(get_tokenizer())
    assert cfg.n_positions == 256 and (cfg.eos_token_id, cfg.pad_token_id) == (0, 1)
    assert next(model.parameters()).dtype == torch.float32
    path, blocks = find_blocks(model)
    assert path == "transformer.h" and len(blocks) == M.EMBEDDED_SIZES[size]["n_layer"]


def test_count_parameters_by_hand() -> None:
    # nano: wte V*d + wpe P*d + per block 12 d^2 + 13 d + final LayerNorm 2d; lm_head tied to wte.
    v, p, d, n = M.DEFAULT_VOCAB, 256, 64, 2
    assert (
        M.count_parameters(M.load_model("embedded:nano"))
        == v * d + p * d + n * (12 * d * d + 13 * d) + 2 * d
    )


def test_embedded_default_and_max_positions() -> None:
    assert M.load_model().config.n_embd == M.EMBEDDED_SIZES["tiny"]["n_embd"]
    model = M.load_model("embedded:nano", vocab_size=300, max_positions=512)
    assert model.config.n_positions == 512
    assert model.get_input_embeddings().num_embeddings == 300


def test_embedded_seed_determinism_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = _state(M.load_model("embedded:nano", seed=1))
    assert torch.equal(torch.random.get_rng_state(), before)
    b = _state(M.load_model("embedded:nano", seed=1))
    c = _state(M.load_model("embedded:nano", seed=2))
    assert _equal(a, b)
    assert not torch.equal(
        a["transformer.h.0.attn.c_attn.weight"], c["transformer.h.0.attn.c_attn.weight"]
    )
    assert torch.equal(torch.random.get_rng_state(), before)


def test_embedded_forward_with_labels_and_dtype() -> None:
    tok = M.load_tokenizer()
    model = M.load_model("embedded:nano")
    M.check_compatible(model, tok)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    loss = model(**enc, labels=enc["input_ids"]).loss
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(M.DEFAULT_VOCAB)) < 1.0
    half = M.load_model("embedded:nano", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_load_tokenizer_embedded_aliases() -> None:
    assert len(M.load_tokenizer("embedded:small")) == len(M.load_tokenizer()) == M.DEFAULT_VOCAB
    assert M.load_tokenizer().pad_token_id == 1


# ---------------------------------------------------------------- tiny real architectures


@pytest.mark.parametrize("arch", list(M.TINY_ARCHS))
def test_tiny_arch_roundtrip_offline(arch: str, tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs[arch]
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    model = M.load_model(str(path))
    tok = M.load_tokenizer(str(path))
    assert model.config.model_type == arch
    M.check_compatible(model, tok)
    ref = get_tokenizer()
    for t in TEXTS:  # the same token ids as the embedded tokenizer (no model-specific swap)
        assert tok.encode(t) == ref.encode(t) and tok.decode(tok.encode(t)) == t
    assert (tok.pad_token_id, tok.eos_token_id) == (ref.pad_token_id, ref.eos_token_id)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    loss = model(**enc, labels=labels).loss
    assert math.isfinite(loss.item())
    assert len(find_blocks(model)[1]) == 2


def test_tiny_arch_seeded_and_dtype(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    again = M.save_tiny_model("llama", tmp_path / "again", seed=0)
    other = M.save_tiny_model("llama", tmp_path / "other", seed=1)
    ref = _state(M.load_model(str(tiny_dirs["llama"])))
    assert _equal(ref, _state(M.load_model(str(again))))
    assert not _equal(ref, _state(M.load_model(str(other))))
    half = M.load_model(str(tiny_dirs["llama"]), dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_pretrained_vocab_growth_and_context_check(tiny_dirs: dict[str, Path]) -> None:
    path = str(tiny_dirs["gpt2"])
    grown = M.load_model(path, vocab_size=M.DEFAULT_VOCAB + 8)
    assert grown.get_input_embeddings().num_embeddings == M.DEFAULT_VOCAB + 8
    with pytest.raises(M.ModelError, match=r"max_positions=4096 exceeds .*\(128\)"):
        M.load_model(path, max_positions=4096)


def test_save_tiny_model_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(M.ModelError, match="unknown architecture 'mamba'.*gpt2, llama"):
        M.save_tiny_model("mamba", tmp_path / "m")
    with pytest.raises(M.ModelError, match="vocab_size=100 is too small.*>= 258"):
        M.save_tiny_model("gpt2", tmp_path / "m", vocab_size=100)


# ---------------------------------------------------------------- errors


def test_hub_name_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # the env var alone must suffice
    name = "meta-llama/Meta-Llama-3-8B"
    monkeypatch.setattr(M, "_hub_reachable", lambda *a, **k: pytest.fail("network probed"))
    with pytest.raises(M.ModelError) as err:
        M.load_model(name)
    msg = str(err.value)
    assert msg.startswith(f"'{name}' is not a local directory and the model hub is offline")
    assert f"huggingface-cli download {name}" in msg and "unset HF_HUB_OFFLINE" in msg
    with pytest.raises(M.ModelError, match="'gpt2' is not a local directory.*offline"):
        M.load_tokenizer("gpt2")


def test_hub_unreachable_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(M, "_hub_reachable", lambda *a, **k: False)  # no network in the test
    with pytest.raises(
        M.ModelError,
        match="not in the local hub cache, and the model hub cannot "
        "be reached.*huggingface-cli download acme/x",
    ):
        M.load_model("acme/x")


def _fake_hub_cache(cache: Path, repo: str, src: Path) -> None:
    """Lay `src` out as the HF cache entry of `repo` (as huggingface-cli download would)."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(src, entry / "snapshots" / "abc123")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")


def test_hub_name_from_cache_offline(
    tmp_path: Path, tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_hub_cache(tmp_path, "acme/tiny-llama", tiny_dirs["llama"])
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = M.load_model("acme/tiny-llama")
    tok = M.load_tokenizer("acme/tiny-llama")
    assert model.config.model_type == "llama" and len(tok) == M.DEFAULT_VOCAB
    M.check_compatible(model, tok)


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(M.ModelError, match="is not a directory.*save_pretrained"):
        M.load_model(str(tmp_path / "no" / "such" / "model"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(M.ModelError, match="local directory .*save_pretrained"):
        M.load_model(str(empty))


def test_unknown_embedded_size() -> None:
    with pytest.raises(
        M.ModelError,
        match="unknown embedded model size 'huge'.*'embedded:nano', "
        "'embedded:tiny', 'embedded:small'",
    ):
        M.load_model("embedded:huge")


def test_bad_dtype() -> None:
    with pytest.raises(M.ModelError, match="unknown dtype 'fp8'.*float32, bfloat16, float16"):
        M.load_model("embedded:nano", dtype="fp8")


def test_vocab_larger_than_embeddings() -> None:
    model = M.load_model("embedded:nano", vocab_size=300)
    with pytest.raises(M.ModelError, match=r"2048 tokens .* only 300.*resize_token_embeddings"):
        M.check_compatible(model, M.load_tokenizer())


def test_tokenizer_without_pad(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    tok = M.load_tokenizer(str(tiny_dirs["gpt2"]))
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()).get("pad_token") is None
    with pytest.raises(M.ModelError, match="has no pad token; pass allow_pad_from_eos=True"):
        M.load_tokenizer(str(tmp_path), allow_pad_from_eos=False)
    with pytest.raises(M.ModelError, match="no pad token"):
        M.check_compatible(M.load_model("embedded:nano"), tok)
    padded = M.load_tokenizer(str(tmp_path))  # default: pad = eos
    assert padded.pad_token == padded.eos_token == "<|endoftext|>"


# ---------------------------------------------------------------- clone


def test_clone_model_equal_but_independent() -> None:
    w = M.load_model("embedded:nano")
    u = M.clone_model(w)
    assert _equal(_state(w), _state(u))
    for (name, pw), (_, pu) in zip(w.named_parameters(), u.named_parameters()):
        assert pw.data_ptr() != pu.data_ptr(), name
    assert u.lm_head.weight is u.transformer.wte.weight  # tying survives the copy
    with torch.no_grad():
        next(u.parameters()).add_(1.0)
    assert not _equal(_state(w), _state(u))
    before = _state(w)
    ids = torch.tensor([[5, 6, 7, 8]])
    u(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in w.parameters())
    assert _equal(before, _state(w))


def test_random_architecture_has_the_shapes_the_memory_model_counts(tmp_path):
    """`random:<architecture>`: the shipped config's exact shapes (counted on the meta device
    for Yi-34B), random weights made in the asked dtype where asked, the embedded tokenizer."""
    from scalebio_core.errors import ConfigError
    from scalebio_core.plan.memory import model_shape
    from scalebio_core.plan.scaleout import plan_config
    from scalebio_core.train.build import tokenizer_name
    from scalebio_core.train.config import TrainConfig

    yi = M.empty_model("random:01-ai/Yi-34B")
    assert M.count_parameters(yi) == model_shape("01-ai/Yi-34B").params > 34e9
    small = json.loads((M.MODEL_CONFIGS / "meta-llama__Meta-Llama-3-8B.json").read_text())
    small.update(num_hidden_layers=2, hidden_size=32, intermediate_size=64, vocab_size=300)
    small.update(num_attention_heads=4, num_key_value_heads=2)
    (tmp_path / "config.json").write_text(json.dumps(small))
    name = f"random:{tmp_path}"
    a = M.load_model(name, vocab_size=512, seed=3, dtype="bfloat16", device="cpu")
    b = M.load_model(name, vocab_size=512, seed=3, dtype="bfloat16")
    assert type(a).__name__ == "LlamaForCausalLM" and a.dtype == torch.bfloat16
    assert a.get_input_embeddings().num_embeddings == 512  # grown to the tokenizer's size
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # seeded
    assert M.count_parameters(a) == model_shape(model=a).params
    cfg = plan_config(None, {"model": name, "max_length": 64}, gpus=1)
    assert cfg.tokenizer == "embedded" and tokenizer_name(cfg) == "embedded"
    assert tokenizer_name(TrainConfig(model="random:01-ai/Yi-34B")) == "embedded"
    with pytest.raises(ConfigError, match="shipped configs"):
        M.load_model("random:no-such-org/no-such-model")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scalebio_step_on_a_gpu_keeps_lam_where_it_was_made():
    """lam lives on the CPU; the step's p goes to the GPU the losses are on (it once failed
    there with 'Expected all tensors to be on the same device')."""
    from scalebio_core.core.bilevel import BilevelConfig, init_state, scalebio_step
    from scalebio_core.train.losses import LMFns

    w = M.load_model("embedded:nano").cuda()
    u = M.clone_model(w)
    state = init_state(w, u, ["a", "b"], BilevelConfig(total_steps=2))
    ids = torch.randint(0, 2048, (4, 16), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    val = dict(batch, source_ids=torch.zeros(4, dtype=torch.long, device="cuda"))
    batch["source_ids"] = torch.tensor([0, 1, 0, 1], device="cuda")
    m = scalebio_step(state, batch, val, LMFns())
    assert math.isfinite(m["L1"]) and state.lam.device.type == "cpu"
