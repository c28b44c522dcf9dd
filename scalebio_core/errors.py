"""The errors of the package (each message names the problem and the fix) and config checks.

Every error a user can cause is a `ValueError` (or, for a NaN loss, a `FloatingPointError`)
whose message says what is wrong and what to do; `TrainingStopped` adds where the run stopped and
what it kept. The config dataclasses validate themselves with `check_types` and `check_all`.
"""

from __future__ import annotations

import dataclasses
import numbers
import signal
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the fix."""


class DataError(ValueError):
    """Bad training data or settings; the message names the file/line/source and the fix."""


class ModelError(ValueError):
    """A model or tokenizer cannot be loaded or used as asked; the message names the fix."""


class LisaError(ValueError):
    """LISA cannot be set up as asked; the message names the problem and the fix."""


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; no parameter was updated in the step that found it."""

    def __init__(self, message: str, step: int, metrics: dict[str, float]):
        super().__init__(message)
        self.step = step
        self.metrics = metrics


class TrainingStopped(RuntimeError):
    """Training stopped on a problem (e.g. a NaN loss); the run directory says where it stopped."""


class Interrupted(TrainingStopped):
    """A signal (SIGINT, SIGTERM) stopped the work; the message says what was kept and how to go
    on. `final`: the message is complete (else a raw one, from the signal handler)."""

    def __init__(self, message: str, signum: int, final: bool = True):
        super().__init__(message)
        self.signum, self.final = signum, final

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The conventional status of a process stopped by the signal: 128 + its number."""
        return 128 + self.signum


_KINDS = {bool: bool, int: numbers.Integral, float: numbers.Real, str: str}


def check_types(config: Any, prefix: str = "") -> None:
    """Each field of a config dataclass whose default is a number, flag or name holds a value of
    that type (a YAML typo gives text), or of one of the types in its metadata's "kinds"; fields
    with None, list or dict defaults are not checked.
    Messages name the field as `prefix` + its name (the key a run config sets)."""
    owner = type(config).__name__
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), type(f.default)
        kinds = f.metadata.get("kinds", (kind,))  # a field that takes a number or a word
        if any(k not in _KINDS for k in kinds):
            continue
        if not any(
            isinstance(value, _KINDS[k]) and (k is bool or type(value) is not bool) for k in kinds
        ):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(
                f"{owner}: {prefix}{f.name} must be of type {names} (like {f.default!r}); "
                f"got {value!r}."
            )


def check_all(owner: str, checks: Iterable[tuple[bool, str]]) -> None:
    """Raise ConfigError("<owner>: <message>.") for the first check that fails."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{owner}: {message}.")
