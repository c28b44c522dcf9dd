"""LISA: block discovery on tiny HF decoders, the seeded sampler, freezing and optimizer state."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from scalebio_core.core.lisa import (
    Lisa,
    LisaError,
    LisaSampler,
    find_blocks,
    make_lisa_pair,
    optimizer_state_bytes,
    pair_seeds,
)

TINY = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    max_position_embeddings=64,
)


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=100))


def tiny_llama(n_layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(**{**TINY, "num_hidden_layers": n_layers}, num_key_value_heads=2)
    )


BUILDERS = {
    "gpt2": (tiny_gpt2, "transformer.h"),
    "llama": (tiny_llama, "model.layers"),
    "gpt_neox": (lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**TINY)), "gpt_neox.layers"),
    "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, num_key_value_heads=2)), "model.layers"),
    "gemma2": (
        lambda: Gemma2ForCausalLM(Gemma2Config(**TINY, num_key_value_heads=2, head_dim=16)),
        "model.layers",
    ),
}


def lm_loss(model: nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 8), generator=g)
    return model(input_ids=ids, labels=ids).loss


# ---------------------------------------------------------------- find_blocks


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_find_blocks_generic(kind):
    build, expected = BUILDERS[kind]
    model = build()
    path, blocks = find_blocks(model)
    assert path == expected
    assert len(blocks) == 4
    assert blocks is model.get_submodule(expected)


def test_find_blocks_through_peft():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    path, blocks = find_blocks(model)
    assert path == "base_model.model.model.layers"
    assert model.get_submodule(path) is blocks is base.model.layers
    # an override written for the plain HF model also works through the wrapper
    path2, blocks2 = find_blocks(model, "model.layers")
    assert (path2, blocks2) == (path, blocks)


def test_find_blocks_override_and_wrong_path():
    model = tiny_llama()
    assert find_blocks(model, "model.layers") == ("model.layers", model.model.layers)
    with pytest.raises(LisaError, match=r"lisa_layers_path='model\.blocks'.*'model\.layers'"):
        find_blocks(model, "model.blocks")
    with pytest.raises(LisaError, match="Embedding, not a ModuleList"):
        find_blocks(model, "model.embed_tokens")


def test_find_blocks_none_found():
    with pytest.raises(LisaError, match=r"no nn\.ModuleList.*lisa_layers_path=.*'model\.layers'"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_find_blocks_prefers_most_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList(nn.Linear(2, 2) for _ in range(8))
            self.big = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.LayerNorm(64)])

    assert find_blocks(Net())[0] == "big"


# ---------------------------------------------------------------- the sampler


def test_sampler_validation_messages():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(LisaError, match=r"n_active=5 but there are n_blocks=4.*between 1 and 4"):
        LisaSampler(4, 5, 20, g)
    with pytest.raises(LisaError, match="n_active=0"):
        LisaSampler(4, 0, 20, g)
    with pytest.raises(LisaError, match="interval=0"):
        LisaSampler(4, 2, 0, g)
    with pytest.raises(LisaError, match=r"n_active=9.*blocks found at 'transformer\.h'"):
        Lisa(tiny_gpt2(), n_active=9)


def test_sampler_deterministic_redraw_and_resume():
    s = LisaSampler(8, 3, 5, torch.Generator().manual_seed(123))
    draws = [s.active_at(t) for t in range(60)]
    for t, d in enumerate(draws):
        assert len(d) == 3 and list(d) == sorted(set(d)) and all(0 <= i < 8 for i in d)
        if t % 5:
            assert d == draws[t - 1]  # no redraw inside a period
    assert len({draws[t] for t in range(0, 60, 5)}) > 1  # redraws do change the draw
    # a fresh sampler with the same seed, asked straight for step 57 (no replay), agrees
    g = torch.Generator().manual_seed(123)
    torch.rand(100, generator=g)  # consuming the generator does not change the draws
    assert LisaSampler(8, 3, 5, g).active_at(57) == draws[57]
    assert LisaSampler(8, 3, 5, 123).active_at(57) == draws[57]
    other = LisaSampler(8, 3, 5, 124)
    assert [other.active_at(t) for t in range(0, 60, 5)] != draws[::5]


# ---------------------------------------------------------------- freezing


def test_apply_freezes_all_but_active_blocks():
    model = tiny_gpt2()
    lisa = Lisa(model, n_active=2, interval=3, seed=0)
    for step in range(12):
        active = lisa.apply(step)
        assert active == lisa.sampler.active_at(step)
        for i, block in enumerate(model.transformer.h):
            assert all(p.requires_grad == (i in active) for p in block.parameters())
        for name in ("transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"):
            assert all(p.requires_grad for p in model.get_submodule(name).parameters())


def test_apply_changes_flags_only_at_redraw_steps():
    model = tiny_llama()
    lisa = Lisa(model, n_active=1, interval=4, seed=0)
    lisa.apply(0)
    q = model.model.layers[lisa.active[0]].self_attn.q_proj.weight
    q.requires_grad_(False)  # a change made between redraws is left alone ...
    lisa.apply(1)
    assert not q.requires_grad
    lisa.apply(4)  # ... and overwritten at the next redraw
    assert all(
        p.requires_grad == (i in lisa.active)
        for i, b in enumerate(model.model.layers)
        for p in b.parameters()
    )


def test_apply_resumes_mid_period():
    model = tiny_llama()
    lisa = Lisa(model, n_active=2, interval=20, seed=7)
    active = lisa.apply(57)  # first call mid-period still sets the flags
    assert active == LisaSampler(4, 2, 20, 7).active_at(40)
    assert sum(any(p.requires_grad for p in b.parameters()) for b in model.model.layers) == 2


def test_train_embeddings_false_freezes_outside():
    model = tiny_llama()
    lisa = Lisa(model, n_active=2, interval=20, train_embeddings=False)
    lisa.apply(0)
    trainable = {
        n.split(".")[1] if n.startswith("model.") else n.split(".")[0]
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"layers"}
    assert lisa.n_trainable() == sum(
        p.numel() for i in lisa.active for p in model.model.layers[i].parameters()
    )


def test_peft_base_weights_never_unfrozen():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lisa = Lisa(model, n_active=2, interval=1, seed=0)
    for step in range(4):
        active = lisa.apply(step)
        for n, p in model.named_parameters():
            in_active = any(f"layers.{i}." in n for i in active)
            assert p.requires_grad == ("lora_" in n and in_active), n


# ---------------------------------------------------------------- optimizer state


def _train(model: nn.Module, opt: torch.optim.Optimizer, lisa: Lisa, steps: range) -> None:
    for step in steps:
        lisa.apply(step, opt)
        opt.zero_grad(set_to_none=True)
        lm_loss(model, step).backward()
        opt.step()


@pytest.mark.parametrize("drop", [True, False])
def test_state_dropped_or_kept_on_redraw(drop):
    model = tiny_llama(n_layers=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n_registered = len(opt.param_groups[0]["params"])
    lisa = Lisa(model, n_active=5, interval=1, seed=0, drop_frozen_state=drop)
    # one step before any freezing, so every parameter has AdamW state
    opt.zero_grad()
    lm_loss(model).backward()
    opt.step()
    full = optimizer_state_bytes(opt)
    assert full == sum(2 * p.numel() * 4 + 4 for p in model.parameters())  # exp_avg(_sq), step
    lisa.apply(0, opt)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    if drop:
        assert optimizer_state_bytes(opt) == full - sum(2 * p.numel() * 4 + 4 for p in frozen)
        assert all(p not in opt.state for p in frozen)
    else:
        assert optimizer_state_bytes(opt) == full
    assert len(opt.param_groups[0]["params"]) == n_registered


def test_training_continues_after_unfreezing():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lisa = Lisa(model, n_active=1, interval=2, seed=3)
    seen: set[int] = set()
    for step in range(40):
        seen.update(lisa.apply(step, opt))
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, step)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        # state exists exactly for the parameters that train now (lazily re-initialised)
        assert {id(p) for p in opt.state} == {id(p) for p in model.parameters() if p.requires_grad}
        if len(seen) == 4:
            break
    assert len(seen) == 4  # every block was frozen and unfrozen again at least once
    for p in model.parameters():
        if p.requires_grad:
            assert torch.isfinite(opt.state[p]["exp_avg"]).all()


def test_lazy_reinit_matches_fresh_adamw():
    # a parameter whose state was dropped restarts AdamW exactly like a fresh optimizer
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1)
    for _ in range(3):
        opt_a.zero_grad()
        a(torch.ones(3)).sum().backward()
        opt_a.step()
    b.load_state_dict(a.state_dict())
    for p in a.parameters():
        opt_a.state.pop(p)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1)
    for m, o in ((a, opt_a), (b, opt_b)):
        o.zero_grad()
        m(torch.ones(3)).sum().backward()
        o.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
        assert int(opt_a.state[pa]["step"]) == 1


# ---------------------------------------------------------------- the pair


def test_pair_shared_or_independent():
    assert pair_seeds(0, share=True)[0] == pair_seeds(0, share=True)[1] == pair_seeds(0, False)[0]
    assert pair_seeds(0, share=False)[0] != pair_seeds(0, share=False)[1]
    w, u = tiny_llama(n_layers=6), tiny_llama(n_layers=6)
    lw, lu = make_lisa_pair(w, u, n_active=2, interval=1, seed=0, share=True)
    assert all(lw.apply(t) == lu.apply(t) for t in range(10))
    lw, lu = make_lisa_pair(w, u, n_active=2, interval=1, seed=0, share=False)
    assert any(lw.apply(t) != lu.apply(t) for t in range(10))
    with pytest.raises(LisaError, match="same number of blocks"):
        make_lisa_pair(w, tiny_llama(n_layers=4), n_active=2, share=True)
