"""Experiment presets: `configs/<name>.yaml` holds one mapping per preset (smoke, quick, paper).

Presets override, never fork: every preset of a file runs the same code with other numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bilevel import ConfigError
from .runs import load_yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESET_NAMES = ("smoke", "quick", "paper")


def load_preset(name: str, preset: str, config_dir: Path | None = None) -> dict[str, Any]:
    """The `preset` section of `configs/<name>.yaml`, merged over its `defaults` section."""
    path = (config_dir or CONFIG_DIR) / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(
            f"no preset file {path}: run from a checkout of the repository, or pass "
            "config_dir=… pointing at its configs/ folder."
        )
    data = load_yaml(path.read_text()) or {}
    if preset not in data:
        known = sorted(k for k in data if k != "defaults")
        raise ConfigError(f"{path.name} has no preset {preset!r}; known presets: {known}.")
    return {**data.get("defaults", {}), **data[preset]}
