"""Quality of each method's mixture: held-out target loss (and accuracy) after fine-tuning.

For each embedded corpus of notebooks 03–05, the weights of ScaleBiO, uniform, natural,
validation-only and DoReMi; a fresh model fine-tuned on `n` examples resampled by each, for the
same token budget, over several seeds; mean ± std of the target loss on a held-out draw of the
target distribution (and exact-match accuracy where answers are checkable). The table of notebook
07, from the command line:

    python benchmarks/quality.py --preset quick --runs build/runs --out benchmarks/RESULTS.md

Runs are cached in the runs folder (--runs, else $SCALEBIO_RUNS, else runs/): a rerun with the
same settings reads them back, so after `make reproduce` (which leaves notebook 07's runs in
build/runs) this takes seconds; from a fresh folder, about 25 minutes at quick on 2 CPU cores.
Settings: configs/baselines.yaml.

With --planted it reports instead, side by side in one run, how long each method needs to come
within a tolerance (0.05) of a *known* mixture: the planted-mixture comparison of notebook 10
(`scalebio_core.lab.planted`, configs/planted_comparison.yaml), ScaleBiO, DoReMi and uniform at two
planted mixtures and three seeds, DoReMi's reference phase counted in its seconds:

    python benchmarks/quality.py --planted --runs build/runs --out benchmarks/RESULTS.md

With --compute it reports quality per compute (issue 32; notebook 11 draws it): ScaleBiO, a
swarm of proxy runs (`method: swarm`) at several N, DoReMi and uniform, at three seeds, on the
planted mixture (distance ‖p − q‖ to the known answer) and on embedded corpora (held-out target
loss after fine-tuning on each method's mixture), against the compute each method spent:
tokens through forward–backward passes (+ ⅓ of the forward-only ones) and seconds
(`scalebio_core.lab.compute` says how each method's passes are counted;
configs/quality_compute.yaml the settings):

    python benchmarks/quality.py --compute --preset quick --runs build/runs_compute \
        --out benchmarks/RESULTS.md

Quick is shortened to fit about 15 minutes on 2 CPU cores: one planted mixture and one corpus
(multilingual; `--corpora multilingual informative noisy` adds the others, about 5 minutes
each), every method's run shorter than the presets' (150 steps on the planted mixture, 100 on a
corpus, the same for ScaleBiO and for each of DoReMi's two phases; the swarm's proxies 15 and 10
steps) and a smaller fine-tuning than --preset quick's default mode (1000 examples, 100,000
tokens). Paper holds both planted mixtures and the three corpora at the presets' lengths. Smoke
(two seeds, tiny runs of the planted mixture and informative) takes under a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_lines, write_section  # noqa: E402

from scalebio_core.lab import compute  # noqa: E402
from scalebio_core.lab.experiments import (  # noqa: E402
    compare_methods,
    comparison_spec,
    format_table,
    summarize,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quick", choices=("smoke", "quick", "paper"))
    ap.add_argument("--corpora", nargs="+", help="default: the preset's (configs/baselines.yaml)")
    ap.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (default: preset's)")
    ap.add_argument(
        "--runs",
        type=Path,
        help="runs folder to use and reuse (default: runs/, or "
        "$SCALEBIO_RUNS); `make reproduce` leaves notebook 07's in build/runs",
    )
    ap.add_argument("--out", type=Path, help="write/replace the Quality section of this file")
    ap.add_argument(
        "--planted",
        action="store_true",
        help="the time each method needs to come within 0.05 of a planted mixture (notebook 10)",
    )
    ap.add_argument(
        "--compute",
        action="store_true",
        help="quality against compute: ScaleBiO, swarm at several N, DoReMi, uniform (notebook 11)",
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.runs:
        os.environ["SCALEBIO_RUNS"] = str(args.runs.resolve())
    if args.planted:
        return planted_part(args)
    if args.compute:
        return compute_part(args)
    spec = comparison_spec(args.preset)
    if args.seeds:
        spec["seeds"] = args.seeds
    start = time.perf_counter()
    rows = []
    for corpus in args.corpora or spec["corpora"]:
        rows += compare_methods(corpus, args.preset, spec)
    summary = summarize(rows)
    lines = [format_table(summary), ""]
    for corpus in dict.fromkeys(r["corpus"] for r in summary):
        table = {s["method"]: s for s in summary if s["corpus"] == corpus}
        best = min(table, key=lambda m: table[m]["loss_mean"])
        sb = table.get("scalebio")
        if sb is not None:
            others = {
                m: s["loss_mean"] - sb["loss_mean"] for m, s in table.items() if m != "scalebio"
            }
            gaps = ", ".join(f"{m} {d:+.4f}" for m, d in others.items())
            lines.append(f"- {corpus}: lowest mean loss: **{best}**; others minus ScaleBiO: {gaps}")
    lines += ["", f"Wall time (incl. cached runs read back): {time.perf_counter() - start:.0f} s"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        intro = [
            f"Held-out target loss (mean ± std over seeds {spec['seeds']}) of a fresh model "
            f"fine-tuned on {spec['n']} examples resampled by each method's weights, "
            f"token budget {spec['token_budget']:,}; fine-tuning {spec['sft']}.",
            "",
        ]
        write_section(
            args.out,
            "Quality: fine-tuning on each method's mixture",
            [*machine_lines(), "", *intro, text],
        )
    return 0


def planted_part(args: argparse.Namespace) -> int:
    from scalebio_core.lab import planted

    spec = planted.comparison(args.preset)
    if args.seeds:
        spec["seeds"] = args.seeds
    start = time.perf_counter()
    rows = planted.run_all(args.preset, spec)
    summary = planted.summarize(rows, spec["tolerance"])
    text = "\n".join(
        [
            planted.format_table(summary),
            "",
            planted.result_sentence(summary) + ".",
            "",
            f"Wall time (incl. cached runs read back): {time.perf_counter() - start:.0f} s",
        ]
    )
    print(text)
    if args.out:
        intro = [
            f"configs/planted.yaml at {args.preset}, configs/planted_comparison.yaml: the "
            f"distance ‖p − p_planted‖ (Euclidean) of each method's product after each step; "
            f"'time to within {spec['tolerance']:g}': the seconds of training from which it "
            "stays within the tolerance to the end of the run (DoReMi's reference phase "
            "included; uniform costs nothing and starts where it ends). Seconds are the steps' "
            "own (timing.jsonl), on the machine below.",
            "",
        ]
        write_section(
            args.out,
            "Quality: time to reach a planted mixture",
            [*machine_lines(), "", *intro, text],
        )
    return 0


def compute_part(args: argparse.Namespace) -> int:
    spec = compute.settings(args.preset)
    if args.seeds:
        spec["seeds"] = args.seeds
    if args.corpora:
        spec["corpora"] = {c: (spec.get("corpora") or {}).get(c) or {} for c in args.corpora}
    start = time.perf_counter()
    rows = compute.run_all(args.preset, spec)
    summary = compute.summarize(rows)
    text = "\n".join(
        [
            compute.format_table(summary),
            "",
            *[f"- {line}." for line in compute.reading(summary, rows)],
            "",
            f"Wall time (incl. cached runs read back): {time.perf_counter() - start:.0f} s",
        ]
    )
    print(text)
    if args.out:
        intro = [
            f"configs/quality_compute.yaml at {args.preset}, seeds {spec['seeds']}. Quality: "
            "‖p − q‖ (Euclidean) to the planted mixture q; on a corpus, the held-out target "
            f"loss of a fresh model fine-tuned on {spec['finetune']['n']} examples resampled by "
            f"the method's weights for {spec['finetune']['token_budget']:,} tokens "
            f"({spec['finetune']['sft']}). Compute: tokens (real, unpadded) through "
            "forward–backward passes, + ⅓ of those through forward-only passes: a ScaleBiO step "
            "is three passes (u and w on the training batch, w on the validation batch); a "
            "DoReMi reference step one, a proxy step one and two forward-only; a swarm proxy "
            "step one, and each proxy's score a forward-only pass over the validation set; "
            "uniform none; the fine-tuning on the mixture, the same for all, is not counted. "
            "The swarm at N is the first N proxies of the largest N's run, fitted alone. "
            "Seconds: the steps' own (and the swarm's fit), on the machine below, shared with "
            "other work. Steps: ScaleBiO T; DoReMi reference + proxy; swarm N × proxy steps.",
            "",
            "What each method got (no method was tuned here; all share the model, batch, lr_w "
            "and schedule of the corpus preset):",
            "",
            *compute.budgets(rows),
            "",
        ]
        write_section(
            args.out,
            "Quality per compute: ScaleBiO, swarm, DoReMi, uniform",
            [*machine_lines(), "", *intro, text],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
