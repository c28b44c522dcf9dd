"""The decoder blocks of a causal LM, found generically (no model-type branches): the largest
`nn.ModuleList` whose children all share one class, measured in parameters; the user may pass
the dotted path instead. LISA, LoRA, recomputation, FSDP's wrapping and the memory model all
ask here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import LisaError

PATH_HINT = "pass lisa_layers_path='…' (the dotted path of the decoder blocks), e.g. 'model.layers'"


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _candidates(model: nn.Module) -> list[tuple[str, nn.ModuleList, int]]:
    """Every non-empty ModuleList with parameters whose children all share one class."""
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(c) for c in mod}) == 1 and (n := _n_params(mod)) > 0:
                found.append((name, mod, n))
    return found


def _describe(cands: list[tuple[str, nn.ModuleList, int]]) -> str:
    if not cands:
        return "none"
    return ", ".join(f"'{n}' ({len(m)} × {type(m[0]).__name__}, {p:,} params)" for n, m, p in cands)


def _resolve(model: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted `path` under `model`, or under the model a wrapper (PEFT) holds."""
    roots = [model]
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        roots.append(get_base())
    for root in roots:
        mod: Any = root
        try:
            for part in path.split("."):
                mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        except (AttributeError, IndexError, TypeError):
            continue
        if isinstance(mod, nn.Module):
            return mod
    return None


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """(dotted path relative to `model`, the ModuleList of decoder blocks).

    Without `path`: the homogeneous ModuleList (all children of one class) holding the most
    parameters, e.g. GPT-2 `transformer.h`, Llama/Qwen2/Gemma2 `model.layers`, GPT-NeoX
    `gpt_neox.layers`; through a PEFT wrapper the returned path is the wrapper's own
    (`base_model.model.model.layers`). With `path` (relative to the model or to the model a PEFT
    wrapper holds) that module is used. Raises `LisaError` when nothing fits.
    """
    cands = _candidates(model)
    if path is None:
        if not cands:
            raise LisaError(
                f"could not find the decoder blocks of {type(model).__name__}: it has no "
                "nn.ModuleList whose children all share one class. If its blocks live elsewhere, "
                f"{PATH_HINT}."
            )
        # most parameters; ties go to the longer list, then to the outermost (shortest) path
        name, blocks, _ = max(cands, key=lambda c: (c[2], len(c[1]), -len(c[0])))
        return name, blocks

    mod = _resolve(model, path)
    if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
        what = "no such attribute" if mod is None else f"a {type(mod).__name__}, not a ModuleList"
        raise LisaError(
            f"lisa_layers_path='{path}' does not name the decoder blocks of "
            f"{type(model).__name__} ({what}). Candidate ModuleLists found: {_describe(cands)}."
        )
    name = next((n for n, m in model.named_modules() if m is mod), None)
    if name is None:  # reached through a forwarding __getattr__ but not registered as a child
        raise LisaError(
            f"lisa_layers_path='{path}' names a ModuleList that is not a registered submodule of "
            f"{type(model).__name__}. Candidate ModuleLists found: {_describe(cands)}."
        )
    return name, mod
