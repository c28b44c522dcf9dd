"""Each notebook's result in one sentence, and the README's "result at quick" column from them.

A notebook's last code cell calls `report(name, preset, sentence)` with a sentence built from the
numbers of its run. It prints the sentence and writes `<results_dir>/<name>.json`.
`make reproduce` times every notebook into `<results_dir>/<name>.seconds`, then runs
``python -m scalebio_core.lab.results README.md``: it rewrites the last two cells ("result at
quick", "runtime at quick") of each notebook's row of the README table between `BEGIN` and
`END`, from the files of this run. The README's numbers then come from a command, not from a hand.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from .paths import project_dir

BEGIN = "<!-- results: begin (make reproduce rewrites the last two columns) -->"
END = "<!-- results: end -->"
README_PRESET = "quick"


def results_dir() -> Path:
    """`$SCALEBIO_RESULTS` if set, else `build/results/` at the repository root."""
    return project_dir("SCALEBIO_RESULTS", "build", "results")


def report(name: str, preset: str, sentence: str) -> None:
    """Print a notebook's result sentence and save it as `<results_dir>/<name>.json`."""
    sentence = " ".join(sentence.split())
    if not sentence:
        raise ValueError(f"{name}: the result sentence is empty")
    print(sentence)
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    record = {"notebook": name, "preset": preset, "sentence": sentence, "time": time.time()}
    path.write_text(json.dumps(record, indent=1) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _runtime(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


def update_readme(readme: Path, results: Path, preset: str = README_PRESET) -> list[str]:
    """Rewrite the README table's result and runtime cells from `results`; return the names.

    Rows are matched by the notebook name in their first cell (`` [`03_noisy_data`](...) ``).
    A notebook without a result of `preset` keeps its cells; a result of another preset is
    refused, so a smoke run never writes the quick column.
    """
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(
            f"{readme} lacks the markers {BEGIN!r} … {END!r} around the notebook table"
        )
    head, rest = text.split(BEGIN, 1)
    table, tail = rest.split(END, 1)
    updated, lines = [], []
    for line in table.split("\n"):
        m = re.match(r"\| \[`(\d\d_\w+)`\]", line)
        path = results / f"{m.group(1)}.json" if m else None
        if path is None or not path.exists():
            lines.append(line)
            continue
        record = json.loads(path.read_text())
        if record["preset"] != preset:
            raise ValueError(
                f"{path} holds a {record['preset']!r} result; the README shows {preset!r}. "
                f"Run `make reproduce` (PRESET={preset}) to regenerate it."
            )
        cells = line.strip().strip("|").split(" | ")
        seconds = results / f"{m.group(1)}.seconds"
        runtime = _runtime(float(seconds.read_text())) if seconds.exists() else cells[-1]
        cells[-2:] = [_cell(record["sentence"]), runtime]
        lines.append("| " + " | ".join(c.strip() for c in cells) + " |")
        updated.append(m.group(1))
    readme.write_text(head + BEGIN + "\n".join(lines) + END + tail)
    return updated


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m scalebio_core.lab.results README.md [RESULTS_DIR]", file=sys.stderr)
        return 2
    results = Path(args[1]) if len(args) == 2 else results_dir()
    names = update_readme(Path(args[0]), results)
    print(f"{args[0]}: result column rewritten for {len(names)} notebooks from {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
