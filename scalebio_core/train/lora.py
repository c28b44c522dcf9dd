"""LoRA (PEFT) on the model copies, the alternative to LISA: only the adapter matrices train.

By default (`lora_base: shared`) u and w are two adapters on one frozen base model, held once
(`add_shared_lora`, `AdapterView`); `lora_base: copies` builds two whole PEFT models instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..core.blocks import find_blocks
from ..errors import ConfigError


def lora_targets(model: nn.Module, path: str | None = None) -> list[str]:
    """Names of the linear layers inside the decoder blocks (found generically)."""
    _, blocks = find_blocks(model, path)
    names = {
        n.rsplit(".", 1)[-1]
        for n, m in blocks.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    }
    if not names:
        raise ConfigError("no linear layers in the decoder blocks for LoRA: pass lora_targets.")
    return sorted(names)


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: list | None = None,
    path: str | None = None,
    adapter: str = "default",
) -> nn.Module:
    """Wrap a causal LM with PEFT LoRA adapters (rank, alpha, targets), named `adapter`."""
    targets = list(targets) if targets else lora_targets(model, path)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():  # GPT-2's Conv1D: PEFT notes fan_in_fan_out, then sets it
        warnings.simplefilter("ignore", UserWarning)
        return get_peft_model(model, config, adapter_name=adapter)


# ------------------------------------------------------------------ u and w on one base

COPY_NAMES = ("w", "u")


def _tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_tensors(layer: BaseTunerLayer, name: str) -> list[torch.Tensor]:
    """The parameters of adapter `name` in one tuner layer (LoRA A and B, embeddings, DoRA)."""
    out: list[torch.Tensor] = []
    for attr in layer.adapter_layer_names:
        part = getattr(layer, attr, None)
        if part is None or name not in part:
            continue
        item = part[name]
        out.extend(item.parameters() if isinstance(item, nn.Module) else [item])
    return out


def add_shared_lora(
    model: nn.Module, rank: int, alpha: float, targets: list | None = None, path: str | None = None
) -> nn.Module:
    """One frozen base with two LoRA adapters, "w" and "u", both trainable; u starts equal to w.

    Adapter w is drawn exactly as `add_lora` draws its one adapter (so the run is the two-copy
    run's); u's draw happens with the RNG state saved and restored, then u takes w's values."""
    peft = add_lora(model, rank, alpha, targets, path, adapter="w")
    with torch.random.fork_rng(devices=[]):
        peft.add_adapter("u", peft.peft_config["w"])
    with torch.no_grad():
        for layer in _tuner_layers(peft):
            for pw, pu in zip(_adapter_tensors(layer, "w"), _adapter_tensors(layer, "u")):
                if not pw.is_meta:  # an empty model (meta) gets its values by broadcast
                    pu.copy_(pw)
    for layer in _tuner_layers(peft):
        for name in COPY_NAMES:
            for q in _adapter_tensors(layer, name):
                q.requires_grad_(True)
    return peft


class AdapterView(nn.Module):
    """u or w of a run with LoRA on one shared base (`add_shared_lora`): the shared PEFT model
    seen with this copy's adapter active.

    Every use of the view (its forward, and any attribute it does not hold itself, such as
    `get_output_embeddings`) first activates its adapter and its train/eval mode on the shared
    model; the adapters' `requires_grad` never changes (PEFT's `set_adapter` would flip it, which
    FSDP2 does not follow after sharding), the adapter that is not active simply takes no part.
    `parameters()` and `state_dict()` are this adapter's tensors only: each optimizer holds its
    own copy's adapter, and a checkpoint holds the adapters (the base is frozen and is rebuilt
    from the model on resume). The shared model is held outside the module tree, so moving or
    walking a view never touches the other copy's adapter twice.
    """

    def __init__(self, shared: nn.Module, name: str):
        super().__init__()
        if name not in COPY_NAMES:
            raise ValueError(f"adapter name must be one of {COPY_NAMES}, not {name!r}.")
        self.__dict__["shared"] = shared  # not a submodule (see the class docstring)
        self.__dict__["_layers"] = _tuner_layers(shared)
        self.adapter = name
        self.training = shared.training

    def activate(self) -> nn.Module:
        """Make this view's adapter and mode the shared model's; returns the shared model."""
        shared = self.__dict__["shared"]
        if getattr(shared, "_scalebio_active", None) != self.adapter:
            for layer in self.__dict__["_layers"]:
                layer._active_adapter = self.adapter
            shared.base_model.active_adapter = self.adapter
            shared.__dict__["_scalebio_active"] = self.adapter
        if shared.training != self.training:
            shared.train(self.training)
        return shared

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.activate()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "shared" not in self.__dict__:
                raise
            return getattr(self.activate(), name)

    def train(self, mode: bool = True) -> AdapterView:
        self.training = mode
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterView:
        self.__dict__["shared"]._apply(fn, recurse)
        return self

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        mine = {
            id(q)
            for layer in self.__dict__["_layers"]
            for q in _adapter_tensors(layer, self.adapter)
        }
        for n, q in self.__dict__["shared"].named_parameters(prefix, recurse, remove_duplicate):
            if id(q) in mine:
                yield n, q

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        """The shared model's modules (finding its decoder blocks works on a view)."""
        return self.__dict__["shared"].named_modules(*args, **kwargs)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(())

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {n: q.detach() for n, q in self.named_parameters()}

    def load_state_dict(self, sd: Mapping[str, Any], strict: bool = True, assign: bool = False):
        params = dict(self.named_parameters())
        if set(sd) != set(params):
            raise ConfigError(
                f"the checkpoint's adapter {self.adapter} does not match this run's LoRA "
                f"({len(sd)} tensors saved, {len(params)} here): resume with the config the run "
                "was started with (lora_rank, lora_targets, lora_base)."
            )
        with torch.no_grad():
            for n, q in params.items():
                q.copy_(sd[n])
        return None


def shared_views(shared: nn.Module) -> tuple[AdapterView, AdapterView]:
    """(w, u): the two views of a model made by `add_shared_lora`."""
    return AdapterView(shared, "w"), AdapterView(shared, "u")


def unique_parameters(*models: nn.Module) -> list[nn.Parameter]:
    """Every parameter the models hold, once each (a shared base counted once)."""
    seen: dict[int, nn.Parameter] = {}
    for m in models:
        m = m.__dict__.get("shared", m) if isinstance(m, AdapterView) else m
        for q in m.parameters():
            seen.setdefault(id(q), q)
    return list(seen.values())
