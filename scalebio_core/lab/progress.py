"""How a notebook shows a run while it trains: a widget bar (tqdm's notebook bar: the steps, the
time spent and the time to go, the latest loss) instead of the trainer's plain lines on stderr,
which are meant for a log file. `experiments.run_preset` drives it through the trainer's
callback; on a terminal the trainer's own bar is kept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import files

TABLE = "table.txt"
"""The run's start table (its sources and held-out sets, `data.source_table`), as the run printed
it: saved by `run_preset` so that a reused run can show it again."""

SHOWN = ("L1", "loss", "target_loss")
"""The row's first loss of these is shown beside the bar (ScaleBiO's L1, DoReMi's loss)."""


def in_notebook() -> bool:
    """Whether the code runs in a Jupyter kernel (JupyterLab, papermill), where a widget shows,
    rather than in a terminal or a plain Python process."""
    try:  # IPython is there only with the notebooks extra; without it, no kernel either
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class RunProgress:
    """A training callback (`train(..., callback=…)`) that, at its first step, saves the run's
    start table to `<run_dir>/table.txt` and, with `bar`, prints it and opens a notebook bar
    that it advances at every step; `then` (e.g. a `widgets.LivePlot`) is called after it.
    `close()` ends the bar (red when the run stopped short)."""

    def __init__(
        self,
        run_dir: str | Path,
        total: int,
        desc: str,
        bar: bool = True,
        then: Callable | None = None,
    ):
        self.run_dir, self.total, self.desc = Path(run_dir), total, desc
        self.show, self.then = bar, then
        self.bar: Any = None
        self.started = False

    def __call__(self, row: dict, setup: Any = None) -> None:
        if not self.started:
            self.started = True
            table = getattr(setup, "table", "")
            if table:
                files.write_text(self.run_dir / TABLE, table + "\n")
                if self.show:
                    print(table, flush=True)
            if self.show:
                from tqdm.notebook import tqdm  # in a kernel only: it needs ipywidgets

                start = int(row.get("step", 0))
                self.bar = tqdm(total=self.total, initial=start, desc=self.desc, unit="step")
        if self.bar is not None:
            self.bar.update(1)
            loss = next((k for k in SHOWN if isinstance(row.get(k), int | float)), None)
            if loss:
                self.bar.set_postfix_str(f"{loss} {row[loss]:.4f}", refresh=False)
        if self.then is not None:
            self.then(row, setup)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
