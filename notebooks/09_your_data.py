# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · Your data
#
# **Question.** Given a folder of your own JSON Lines files, does one run with the default settings
# give weights that you can resample with, and how does a model fine-tuned on the resampled data
# compare with one fine-tuned on a uniform mixture, on a test set that no step has seen?
#
# The folder holds one file per training source (`.jsonl`, `.json` or `.txt`; Alpaca, ShareGPT,
# prompt/response or plain text records), a validation set (`validation.jsonl`, or `val.*`,
# `dev.*`) and a test set (`test.jsonl`). Any other name with a held-out word in it
# (`alpaca_test.jsonl`) is refused, because its role would be a guess. A `manifest.json` with
# `{"roles": {"sources": [...], "validation": "...", "test": "..."}}` names the roles explicitly.
#
# Nothing is tuned here. The learning rates are the defaults for the model: 2e-3 for a randomly
# initialised embedded model, 1e-5 for a pretrained one. `max_length` is `auto`: the 95th
# percentile of the records' token lengths, rounded up to a multiple of 16. Each preset sets only
# the sizes (`configs/your_data.yaml`).
#
# With `DATA_DIR = None` the package writes an example folder from the embedded noisy corpus: six
# sources whose answers are corrupted at rates 0, 0.2, …, 1.0, a clean validation set and a clean
# test set drawn apart from both. Point `DATA_DIR` at your own folder to run the same cells on
# your data.

# %% tags=["parameters"]
PRESET = "quick"  # "smoke" (tests), "quick" (CPU, ~3 min), "paper" (GPT-2, a GPU)
SEED = 0
DATA_DIR = None  # your folder; None: an example folder written from an embedded corpus

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt

from scalebio_core.lab.experiments import (
    finetune,
    preset_config,
    run_preset,
    runs_root,
    seconds_text,
    training_seconds,
)
from scalebio_core.lab.plots import plot_weights, save_figure
from scalebio_core.lab.widgets import weight_viewer
from scalebio_core.train.convergence import VERDICT
from scalebio_core.train.pipeline import write_example_folder
from scalebio_core.train.runs import load_trajectory

# the example folder's size and the fine-tunings', per preset (the run's sizes: configs/your_data.yaml)
SIZES = {
    "smoke": {"n_per_source": 40, "n_val": 24, "n": 200, "sft_steps": 6},
    "quick": {"n_per_source": 500, "n_val": 200, "n": 3000, "sft_steps": 250},
    "paper": {"n_per_source": 2000, "n_val": 500, "n": 10000, "sft_steps": 1000},
}[PRESET]
if DATA_DIR is None:
    DATA_DIR = write_example_folder(
        runs_root() / f"example_data_{PRESET}", "noisy",
        n_per_source=SIZES["n_per_source"], n_val=SIZES["n_val"], seed=SEED,
    )
DATA_DIR = Path(DATA_DIR)
for f in sorted(DATA_DIR.iterdir()):
    print(f"{f.name:24s} {sum(1 for _ in f.open()) if f.suffix == '.jsonl' else '':>6}")

# %% [markdown]
# ## One run with the defaults
#
# The cell below runs what this command runs (add `--preset quick` sizes as `key=value`):
#
# ```bash
# python -m scalebio_core train data_dir=DATA_DIR out_dir=runs/mine
# ```
#
# It first prints the start table: per source its file, its records, those dropped (an empty
# response, or a prompt that fills `max_length`), the samples and tokens kept, and the share cut at
# `max_length`; the validation and test sets get a row each, and the chosen `max_length` and why
# come last. A progress bar with the time to go follows, and the convergence verdict ends the run.
#
# The run's folder is named by the preset and a key of everything that made it: the config and
# the SHA-256 of every file of the folder it reads. Another folder, or the same folder with a file
# changed, gets a run of its own. Run the cell again and the finished run is reused: it says so,
# with the time its steps took, and shows its table again.

# %%
cfg = preset_config("your_data", PRESET, data_dir=str(DATA_DIR), seed=SEED)
print(f"model {cfg.model}: lr_w = lr_u = {cfg.bilevel.lr_w} (the model's default), "
      f"lr_lam {cfg.bilevel.lr_lam}, max_length {cfg.max_length}, {cfg.steps} steps, "
      f"batch {cfg.batch_size}")
run_dir = run_preset("your_data", PRESET, progress=True, data_dir=str(DATA_DIR), seed=SEED)
run_seconds = training_seconds(run_dir)  # the steps' own time, from timing.jsonl
took = seconds_text(run_seconds)
traj = load_trajectory(run_dir)
weights = traj["weights"]
verdict = json.loads((run_dir / VERDICT).read_text())
print({k: round(v, 4) for k, v in weights.items()})
print(verdict["text"])

# %% [markdown]
# ## Is a weight a finding?
#
# A weight means something only if it moved further than chance would move it, and if the model
# can see what the sources differ in. On your data the run measures the first itself: each source
# is split at random into two halves that the run weighs as sources of their own. The halves of
# one source hold the same kind of data, so their weights differ by chance alone; from those
# differences comes the null band, $1/K \pm t\cdot s$ ($s$: the root mean square of the K half
# differences, $t$: Student's t at 95 % with K degrees of freedom). A source above the band holds
# more weight than chance gives, one below less, one inside cannot be told from the rest by this
# run. For the second, the verdict says when the model is a randomly initialised one (it separates
# sources by form: language, format, length; not by correctness) and, where the answers are
# checkable, how often the trained model answers the target's questions beside chance. The band
# is shaded in the figure below.

# %%
band = verdict.get("null_band")
if band is None:
    print("no null band in this run (the start table says why)")
else:
    print(f"null band {band['low']:.3f} … {band['high']:.3f}")
    for name, v in band["sources"].items():
        print(f"  {name:16s} {v['weight']:.3f}  halves {v['halves'][0]:.3f} + "
              f"{v['halves'][1]:.3f}  {v['where']}")
sight = verdict.get("model_sight") or {}
if "accuracy" in sight:
    print(f"the trained model answers {sight['accuracy']:.0%} of {sight['n']} target questions; "
          f"chance (the most common answer): {sight['chance']:.0%}")

# %% [markdown]
# ## From weights to a fine-tuned model
#
# `weights.json` resamples the sources: `python -m scalebio_core resample --run RUN --n N` draws
# `round(N·p_s)` records of each source. A fresh model is then fine-tuned on those records
# (`python -m scalebio_core sft --data RUN/resampled.jsonl --out FOLDER data_dir=DATA_DIR`), and
# another on the same number of records drawn uniformly over the sources. Both are scored on
# `test.jsonl`, which neither the weights nor the fine-tunings have seen. Each fine-tuning is kept
# in a folder named by the run, the weights, the sizes and the test set: a finished one is read
# back (and says so), never one of another folder.

# %%
uniform = {n: 1 / len(weights) for n in weights}
results = {}
sft_cfg = cfg.replace(steps=SIZES["sft_steps"])
for name, w in (("ScaleBiO", weights), ("uniform", uniform)):
    results[name] = finetune(run_dir, sft_cfg, name, w, SIZES["n"], seed=SEED)
for name, r in results.items():
    print(f"{name:9s} held-out loss {r['target_loss']:.4f} on {r['n_test']} test records")

# %%
fig, ax = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
plot_weights(ax[0], traj["p"], traj["names"], steps=traj["step"],
             title=f"Weights of the folder's sources ({PRESET} preset, default settings)")
if band is not None:  # what chance alone gives, from the halves of each source
    ax[0].axhspan(band["low"], band["high"], color="0.85", zorder=0, label="null band")
    ax[0].legend(fontsize=8, ncol=2)
names = list(results)
losses = [results[n]["target_loss"] for n in names]
bars = ax[1].bar(names, losses, color=["tab:blue", "tab:gray"], width=0.6)  # axis from zero
ax[1].bar_label(bars, fmt="%.3f", padding=3)
ax[1].set_ylim(0, max(losses) * 1.15)
ax[1].set_ylabel("loss on test.jsonl (lower is better)")
ax[1].set_title(f"Fine-tuned on the resampled data\n(ScaleBiO {losses[0] - losses[1]:+.3f} "
                "against uniform, one seed)")
fig.tight_layout()
print(save_figure(fig, "09_your_data"))

# %% [markdown]
# ## Inspect the run
#
# The weight viewer replays the run: its weights and losses step by step, and the verdict.

# %%
weight_viewer(run_dir)

# %% [markdown]
# ## Expectations
#
# These checks hold for the example folder; on a folder of your own only the first two apply.

# %%
from scalebio_core.lab.results import report

assert load_trajectory(run_dir)["names"] == sorted(weights), "the sources are the folder's files"
assert verdict["verdict"] in ("too short", "not moved", "moving", "drifting", "settled")
example = (DATA_DIR / "manifest.json").exists() and "noise_0.0" in weights
if example and PRESET != "smoke":
    assert weights["noise_0.0"] > weights["noise_1.0"], weights
    assert band["sources"]["noise_0.0"]["where"] == "above", band  # the clean source is a finding
gain = results["uniform"]["target_loss"] - results["ScaleBiO"]["target_loss"]
print(f"run: {took} of training steps; {verdict['verdict']}; held-out loss ScaleBiO "
      f"{results['ScaleBiO']['target_loss']:.4f}, uniform {results['uniform']['target_loss']:.4f} "
      f"({gain:+.4f} in ScaleBiO's favour)")

beyond = ""
if band is not None:
    sides = {w: [n for n, v in band["sources"].items() if v["where"] == w] for w in ("above", "below")}
    said = [f"{w} the null band: {', '.join(ns)}" for w, ns in sides.items() if ns]
    said[1:] = [s.replace(" the null band", " it") for s in said[1:]]
    beyond = "; " + ("; ".join(said) if said else "every source inside the null band")
report("09_your_data", PRESET,
       f"Weights {verdict['verdict']} after {took}{beyond}; held-out loss ScaleBiO "
       f"{results['ScaleBiO']['target_loss']:.4f} vs uniform "
       f"{results['uniform']['target_loss']:.4f} (one seed).")

# %% [markdown]
# **Result.** The numbers printed above are this run's (`make reproduce` regenerates them). At
# `quick` the default run moves p only a little in its steps: the verdict above says whether p
# settled. How much the fine-tuning gains over uniform is printed above, for one seed. It is not
# averaged over seeds, so read it as one draw.
