"""The package's warnings: one clean line each, `warning: <text>`, in a terminal and a notebook.

Every warning of scalebio_core goes through `warn`, as a `ScaleBiOWarning` (a `UserWarning`):
Python then shows it as the one line `warning: <text>` on stderr, without the source path, line
number and code line it shows for other warnings, and every time it is raised (a notebook cell
run twice says it twice), not once per place. Other libraries' warnings keep their own format.

Filter them as any warning: `warnings.filterwarnings("ignore", category=ScaleBiOWarning)` in
Python, `python -W ignore::UserWarning -m scalebio_core …` on the command line; tests catch them
with `pytest.warns(UserWarning)` (or `ScaleBiOWarning`).
"""

from __future__ import annotations

import warnings
from typing import Any

PREFIX = "warning: "


class ScaleBiOWarning(UserWarning):
    """A warning of scalebio_core: something worth knowing that does not stop the work; its text
    names the problem and the fix."""


def warn(text: str, stacklevel: int = 2) -> None:
    """Warn with `text` (one line, shown as `warning: <text>`), from the caller's place."""
    warnings.warn(text, ScaleBiOWarning, stacklevel=stacklevel + 1)


def line(message: Any) -> str:
    """The one line a warning of the package shows: `warning: <text>`, its whitespace (line
    breaks too) collapsed to single spaces."""
    return PREFIX + " ".join(str(message).split())


def _ours(category: Any) -> bool:
    return isinstance(category, type) and issubclass(category, ScaleBiOWarning)


def _format(format_other: Any) -> Any:
    def formatwarning(message, category, filename, lineno, line_=None):  # type: ignore[no-untyped-def]
        if _ours(category):
            return line(message) + "\n"
        return format_other(message, category, filename, lineno, line_)

    formatwarning.scalebio = True  # type: ignore[attr-defined]
    return formatwarning


def install() -> None:
    """Show the package's warnings as `warning: <text>` lines, each time they are raised: a
    `warnings.formatwarning` that formats ScaleBiOWarning alone (others as before), and an
    "always" filter for that category placed last (filters a user sets come first and win).
    Idempotent; done on import."""
    if not getattr(warnings.formatwarning, "scalebio", False):
        warnings.formatwarning = _format(warnings.formatwarning)
    if not any(f[0] == "always" and f[2] is ScaleBiOWarning for f in warnings.filters):
        warnings.filterwarnings("always", category=ScaleBiOWarning, append=True)


install()
