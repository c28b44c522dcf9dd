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
# # 10 · A planted mixture: does ScaleBiO find weights that are known?
#
# **Question.** When the right weights are known, and interior rather than a corner, does the
# learned p approach them? How fast, in steps and in seconds, and how does that compare with
# DoReMi and with the uniform mixture?
#
# The corpora of notebooks 03 to 05 have no known answer, and their learned weights end almost
# one-hot. Here the answer is planted (`corpora.planted_mixture`). Four training sources answer
# *the same* instruction records in four styles: `A: 42`, `B: 42`, `C: 42`, `D: 42` (one label
# token of the embedded tokenizer, then the same answer). The validation set is drawn from a known
# mixture q of the styles, for example 0.5 / 0.3 / 0.2 / 0, so `label_d` is a source that the
# target does not contain.
#
# **Why q is the right answer.** Nothing in a prompt says which label to write. A model trained
# on the mixture p therefore opens an answer with label s with probability p_s. The target's
# answers open with label s in a share q_s, so the label's part of the target loss is the
# cross-entropy −Σ_s q_s log p_s, which is smallest exactly at p = q (Gibbs' inequality). The rest
# of an answer is the same in every source. The right weights are therefore q, with 0 for
# `label_d`.
#
# **Methods** (settings: `configs/planted.yaml`, `configs/planted_comparison.yaml`):
#
# * **ScaleBiO**: the run config of the other notebooks; λ takes AdamW steps (the yaml says why);
# * **DoReMi** (Xie et al. 2023): a reference model on the uniform mixture, then a proxy with
#   Group DRO weights. It never reads the validation set, so one run per seed serves both
#   mixtures. Its weights exist only once the proxy starts, so its curves stay at uniform while
#   the reference trains, and the seconds include that phase, which a user pays for too;
# * **uniform**: 1/4 each, at no cost.
#
# The distance is ‖p − p_planted‖ (Euclidean) of each method's product after each step.
#

# %% tags=["parameters"]
PRESET = "quick"  # "smoke" (tests), "quick" (CPU, ~20 min), "paper" (GPT-2 from the hub, a GPU)
SEED = 0
OVERRIDES = {}  # run-config fields over the preset (the tests shrink `paper` to seconds)
SPEC = {}  # fields over the comparison (mixtures, seeds, methods, tolerance), likewise

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from scalebio_core.lab import planted
from scalebio_core.lab.experiments import preset_config
from scalebio_core.lab.plots import (
    plot_distance_runs,
    plot_planted_distance,
    plot_planted_weights,
    save_figure,
)
from scalebio_core.lab.widgets import run_comparer
from scalebio_core.sources.corpora import build_corpus, planted_weights

spec = {**planted.comparison(PRESET), **SPEC}
spec["seeds"] = [SEED + s for s in spec["seeds"]]
cfg = preset_config("planted", PRESET, **OVERRIDES)
corpus = build_corpus("planted", **cfg.corpus_args)
print(f"mixtures {spec['mixtures']} (order {list(corpus.sources)}), seeds {spec['seeds']}, "
      f"methods {spec['methods']}")
print(f"{cfg.steps} steps of batch {cfg.batch_size} on {cfg.model}; "
      f"{len(next(iter(corpus.sources.values())))} records per source")
record = {k: v for k, v in next(iter(corpus.sources.values()))[0].items() if k != "output"}
print("one record:", record)
for name, recs in corpus.sources.items():
    print(f"  {name}: {recs[0]['output']!r}")

# %% [markdown]
# ## The runs
#
# Every run is cached in the runs folder: a rerun reads it back. ScaleBiO runs once per mixture and
# seed, DoReMi once per seed.

# %%
rows = planted.run_all(PRESET, spec, overrides=OVERRIDES)
summary = planted.summarize(rows, spec["tolerance"])
display(Markdown(planted.format_table(summary)))
print(planted.result_sentence(summary))

# %%
mixtures = spec["mixtures"]
fig, axes = plt.subplots(len(mixtures), 3, figsize=(15, 4.2 * len(mixtures)), squeeze=False)
for i, mix in enumerate(mixtures):
    sel = [r for r in rows if r["mixture"] == mix]
    tag = planted.mixture_tag(mix).replace("-", " / ")
    plot_planted_distance(axes[i, 0], sel, "steps", spec["tolerance"],
                          title=f"planted {tag}: distance against steps")
    plot_planted_distance(axes[i, 1], sel, "seconds", spec["tolerance"],
                          title=f"planted {tag}: against seconds (DoReMi's reference included)")
    plot_planted_weights(axes[i, 2], [r for r in sel if r["method"] != "uniform"],
                         title=f"planted {tag}: final weights ({len(spec['seeds'])} seeds)")
fig.tight_layout()
print(save_figure(fig, "10_planted_mixture"))

# %% [markdown]
# ## Why the sources share their prompts
#
# The first version of this corpus drew a separate set of records for each source. A model can then
# learn *which prompt carries which label*: after a few epochs over its sources it writes the
# label it saw for that prompt, not one drawn from p. Both of ScaleBiO's models do this, their
# per-source losses stop depending on p, and the weights lose their signal. The cell below runs
# that version (`shared_prompts: false`) for the first mixture at the first seed, beside the run
# with shared prompts.

# %%
mix, seed = mixtures[0], spec["seeds"][0]
disjoint = {**OVERRIDES, "corpus_args": {**OVERRIDES.get("corpus_args", {}), "shared_prompts": False}}
runs_by = {
    "shared prompts": planted.method_run(PRESET, "scalebio", mix, seed, OVERRIDES),
    "a prompt set per source": planted.method_run(PRESET, "scalebio", mix, seed, disjoint, tag="disjoint"),
}
curves = {label: planted.product_curve(run_dir) for label, run_dir in runs_by.items()}
dist = {label: planted.distance(c["weights"], planted_weights(mix), c["names"])
        for label, c in curves.items()}
plot_distance_runs({label: (curves[label]["steps"], d) for label, d in dist.items()},
                   title=f"ScaleBiO, planted {planted.mixture_tag(mix).replace('-', ' / ')}, seed {seed}")
plt.show()
for label, d in dist.items():
    print(f"{label}: closest {float(d.min()):.3f} at step {int(d.argmin()) + 1}, "
          f"final {float(d[-1]):.3f}")

# %% [markdown]
# ## Inspect the runs
#
# ScaleBiO's weights step by step beside DoReMi's (reference, then proxy), for the first mixture
# and seed: pick a step with the slider.

# %%
run_comparer([planted.method_run(PRESET, m, mixtures[0], spec["seeds"][0], OVERRIDES)
              for m in ("scalebio", "doremi")])

# %% [markdown]
# ## Expectations

# %% tags=["expectations"]
import math

from scalebio_core.lab.results import report

for mix in mixtures:
    sel = {s["method"]: s for s in summary if s["mixture"] == mix}
    assert set(sel) == set(spec["methods"]), sel.keys()
    for r in rows:
        if r["mixture"] == mix:
            assert abs(sum(r["final"].values()) - 1) < 1e-6 and math.isfinite(r["final_distance"])
    uniform = sel["uniform"]["final_mean"]
    scalebio = [r["final_distance"] for r in rows if r["mixture"] == mix and r["method"] == "scalebio"]
    print(f"planted {mix}: ScaleBiO ends at {[round(d, 3) for d in scalebio]}, uniform at {uniform:.3f}")
    if PRESET != "smoke":
        assert max(scalebio) < uniform, f"planted {mix}: ScaleBiO does not end closer than uniform"

report("10_planted_mixture", PRESET, planted.result_sentence(summary) + ".")

# %% [markdown]
# **Result.** The table and the sentence under "The runs" hold the numbers of
# this run. At `quick` they show ScaleBiO's weights approaching both planted mixtures at every
# seed, inside the 0.05 tolerance well before the run ends. The part that remains is mostly
# `label_d`, whose right weight is 0 and which a softmax reaches only as its logit falls without
# bound. The verdicts say "drifting": λ's gradient still points one way when the cosine schedule
# stops λ, so a longer run continues towards q. The expectation cell asserts only the issue's
# claim, that ScaleBiO ends closer than uniform.
#
# DoReMi ends *farther* from the planted mixture than uniform. It never reads the target: its
# Group DRO weights go to the sources on which the proxy lags the reference. Here the four sources
# are equally hard, so those weights move on noise, and `label_d`, which the target lacks, is as
# likely to gain as any other. This is the expected behaviour of an objective that looks at the
# sources only, not a failure of the run. With a prompt set per source (the cell above), ScaleBiO
# comes closest early and then drifts away, as the models learn which prompt carries which label.
