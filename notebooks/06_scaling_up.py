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
# # 06 · Scaling up: will my configuration fit, and how do I launch it?
#
# **Question.** How much memory per GPU does ScaleBiO need for GPT-2, Llama-3-8B, GPT-NeoX-20B or
# Yi-34B with full training, LISA or LoRA, which configuration of the trainer fits on a given node,
# and what do I launch?
#
# The paper (quoted) reports that ScaleBiO with LISA scales to 34B parameters on eight A40 GPUs
# (48 GB; v1, with FSDP full shard and CPU offload for Yi-34B) and speaks of ~30B on 8×H100 (v2).
# The memory model here (`scalebio_core/plan/memory.py`) predicts a *run config*: its options are the
# trainer's own fields (sharding, offload, `precision`, `gradient_checkpointing`,
# `attn_implementation`, LISA, LoRA), and a configuration the trainer refuses is refused here with
# the trainer's message. It counts parameters exactly from each model's config on PyTorch's meta
# device and adds gradients, AdamW state, activations and logits per GPU (the GPU activation term
# is an estimate from the literature), and the host memory per node of building the copies.
#
# Status (honest): the trainer replicates $u$ and $w$ (DDP-style), shards both with FSDP2 (LISA
# works; rank 0 alone loads the model, the other ranks receive their shards), or makes them two
# DeepSpeed engines (ZeRO 1–3; LISA refused); it runs gradient checkpointing and 16-bit weights
# with fp32 masters (`bf16-weights`). All of it is tested with 2 processes over gloo on CPU
# (`tests/test_distributed.py`, `tests/test_scaleup.py`); none of it has run on GPUs yet. At
# `smoke`/`quick` the same configuration runs below on a tiny model of each architecture.
#

# %% tags=["parameters"]
PRESET = "quick"  # "smoke" / "quick": tiny same-architecture runs here; "paper": print the launch
SEED = 0

# %%
import matplotlib.pyplot as plt

from scalebio_core.lab.plots import plot_memory_check, plot_memory_vs_size, save_figure
from scalebio_core.lab.widgets import scaling_planner
from scalebio_core.plan.memory import GIB, PAPER_MODELS, model_shape, plan

shapes = {m: model_shape(m) for m in PAPER_MODELS}
for m, s in shapes.items():
    print(f"{m:>28}: {s.params / 1e9:6.2f}B parameters, {len(s.block_params)} blocks")

# %% [markdown]
# ## Plan a run
#
# The planner asks what `python -m scalebio_core memory` asks, through the same function
# (`scaleout.plan_run`) and with the same defaults: eight 48 GiB GPUs, 10% of each GPU (and of the
# host memory per node, when it is given) kept free, and as the run config the `paper` preset of
# `configs/noisy.yaml` (its batch and length, in the boxes) with the chosen model and options. With
# *search* ticked it finds the cheapest configuration that fits (sharding, CPU offload, precision
# and gradient checkpointing, in that order of cost), as `--search` does; unticked it predicts the
# options chosen (CPU offload only for sharded runs: the trainer offloads shards). It shows the
# equivalent `memory` command and the command that launches the plan; the button writes the run
# config, the accelerate config and `launch.sh` into the absolute folder it shows
# (`runs/launch/<model>/`). Every command it prints runs as printed from any directory: absolute
# paths, and this environment's Python. The claim below asks the planner's default question and
# gets the same answer.
#
# Before a GPU node sees the plan, rehearse it here: the `--rehearse` command the widget prints
# after writing runs the written plan at smoke size on this CPU (a tiny random model of the same
# architecture, the same engine over two gloo processes, stand-ins for hub data, four steps; CPU
# offload, bf16 GPU kernels and more than two processes are what it cannot rehearse).

# %%
planner = scaling_planner()
planner

# %% [markdown]
# ## Memory against model size
#
# Eight GPUs, FSDP full shard, micro-batch 1 × 1024 tokens, gradient checkpointing, optimizer state
# offloaded to the CPU (the paper's setting for Yi-34B), 16-bit weights with fp32 masters of the
# trainable parameters (`precision: bf16-weights`), for full training of both copies, LISA with 2
# active blocks and LoRA of rank 128. Each line is a run config the trainer accepts
# (`memory.plan`). The figure is drawn below, beside the check of the model against
# measured peaks.

# %%
from scalebio_core.plan.scaleout import plan_config

paper = {"gpus": 8, "gpu_gib": 48}
fsdp = {"fsdp": True, "fsdp_offload": True, "gradient_checkpointing": True,
        "precision": "bf16-weights"}
modes = {"full": {}, "LISA (2 blocks)": {"lisa_active": 2}, "LoRA (r = 128)": {"lora_rank": 128}}
table = {k: [plan(plan_config(None, {**fsdp, **extra, "model": m}, 8), **paper,
                  shape=shapes[m]).peak / GIB for m in PAPER_MODELS]
         for k, extra in modes.items()}
for k, v in table.items():
    print(f"{k:>16}: " + ", ".join(f"{m.split('/')[-1]} {x:.1f} GiB" for m, x in zip(PAPER_MODELS, v)))

# %% [markdown]
# ## The memory model against measured peaks, here
#
# No GPU is measured here, so the curves above are predictions. What can be measured is the same
# model on this CPU: `benchmarks/memory.py` runs two real ScaleBiO steps of the trainer in a fresh
# process for each configuration and records the peak resident memory above the process before the
# models were built, beside `memory.predict` for that configuration (one process, fp32, eager
# activations). The cell calls that benchmark on random-init GPT-2 models (4 blocks, vocabulary
# 2048) of growing width, for full training and LISA with 2 blocks.

# %%
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from scalebio_core.lab.experiments import benchmark

memory_bench = benchmark("memory")
configs = {row[0]: row for row in memory_bench.CONFIGS}  # (name, run-config fields, target)
checked = {"full": configs["full ScaleBiO"],
           "LISA (2 blocks)": configs["LISA 2 blocks, embeddings + head train"]}
widths = [64] if PRESET == "smoke" else [128, 256, 512, 1024]
params, measured, predicted = [], {m: [] for m in checked}, {m: [] for m in checked}
for n_embd in tqdm(widths, desc="model widths"):
    shape = {"n_layer": 4, "n_embd": n_embd, "n_head": 4, "vocab_size": 2048}
    with tempfile.TemporaryDirectory() as tmp:
        rows = memory_bench.run(shape, 2, Path(tmp), with_keep=False, configs=tuple(checked.values()))
    params.append(rows[0]["params"])
    for mode, r in zip(checked, rows):
        measured[mode].append(r["measured_mib"])
        predicted[mode].append(r["pred"]["total"])
errors = {m: np.array(measured[m]) / np.array(predicted[m]) - 1 for m in checked}
missed = np.concatenate([np.array(measured[m]) - np.array(predicted[m]) for m in checked])
for i, n in enumerate(params):
    print(f"{n / 1e6:6.2f}M parameters: " + "; ".join(
        f"{m} measured {measured[m][i]:.0f} MiB, predicted {predicted[m][i]:.0f} MiB "
        f"({errors[m][i]:+.0%})" for m in checked))
print(f"measured minus predicted: {missed.min():.0f} to {missed.max():.0f} MiB at every width")

fig, ax = plt.subplots(1, 2, figsize=(14, 5))
plot_memory_vs_size(ax[0], {m: s.params for m, s in shapes.items()}, table,
                    title="Predicted per GPU (8 GPUs, FSDP, offload, bf16 weights)")
plot_memory_check(ax[1], params, measured, predicted,
                  title="Checked here: one CPU process, fp32 (benchmarks/memory.py)")
print(save_figure(fig, "06_scaling_up"))

# %% [markdown]
# ## The paper's claim with real options
#
# The cheapest configuration the trainer runs that fits Yi-34B with LISA (2 blocks) on eight 48 GB
# GPUs, 10% of each kept free, and the same search on four: the planner's question at its
# defaults (`scaleout.plan_run`, the `--search` of the memory command, with `--config noisy --preset
# paper`). Sharding, CPU offload, precision and gradient checkpointing are tried in order of cost.

# %%
from scalebio_core.plan.scaleout import plan_run
from scalebio_core.train.config import load_preset

base = load_preset("noisy", "paper")  # the planner's base run config
claim = {}
for gpus in (8, 4):
    answer = plan_run("01-ai/Yi-34B", gpus, 48, base, {"lisa_active": 2}, search=True)
    claim[gpus] = answer.plan
    print(answer.text())

# %% [markdown]
# ## The same configuration on a tiny model of each architecture, here
#
# LISA, gradient checkpointing and bf16 weights with fp32 masters, through the same trainer.

# %%
from scalebio_core.lab.experiments import run_preset, runs_root
from scalebio_core.train.models import save_tiny_model
from scalebio_core.train.runs import load_trajectory, read_jsonl

archs = {"gpt2": "gpt2", "meta-llama/Meta-Llama-3-8B": "llama",
         "EleutherAI/gpt-neox-20b": "gpt_neox", "01-ai/Yi-34B": "llama"}
tiny = {}
if PRESET != "paper":
    for arch in sorted(set(archs.values())):
        path = runs_root() / "tiny_models" / arch
        if not (path / "config.json").exists():
            save_tiny_model(arch, path, seed=SEED)
        run = run_preset("lisa", PRESET, seed=SEED, model=str(path), tokenizer=str(path),
                         lisa_active=1, lisa_interval=2, steps=6 if PRESET == "smoke" else 20,
                         gradient_checkpointing=True, precision="bf16-weights",
                         progress=False, out_dir=str(runs_root() / f"scaling_{arch}_{PRESET}"))
        tiny[arch] = load_trajectory(run)
        blocks = sorted({b for r in read_jsonl(run / "trajectory.jsonl") for b in r["lisa_w"]})
        print(f"tiny {arch}: L1 {tiny[arch]['L1'][0]:.3f} -> {tiny[arch]['L1'][-1]:.3f}; "
              f"blocks w trained in turn: {blocks}")
else:
    print("paper preset: rehearse the planner's written plan here (memory --rehearse DIR), then "
          "launch it on the GPU node with the command the planner printed")

# %% [markdown]
# ## Expectations

# %%
from scalebio_core.lab.results import report

lisa, full = table["LISA (2 blocks)"], table["full"]
assert all(a < b for a, b in zip(lisa, full)), "LISA must need less memory than full training"
assert claim[8] is not None and claim[8].fits, "no accepted configuration fits Yi-34B on 8 × 48 GiB"
assert planner.planned.plan.peak == claim[8].peak, "the planner and the claim disagree"
if PRESET != "paper":
    assert all(t["L1"][-1] < t["L1"][0] for t in tiny.values()), "a tiny run did not learn"
assert all(a < b for a, b in zip(measured["LISA (2 blocks)"], measured["full"])), \
    f"LISA's measured peak is not below full training's: {measured}"
if PRESET != "smoke":  # the benchmark's own tolerance, at the largest width measured here
    assert all(abs(e[-1]) <= memory_bench.TOLERANCE for e in errors.values()), \
        f"the memory model misses the measured peak at {params[-1] / 1e6:.2g}M parameters: {errors}"
print(f"Yi-34B with LISA on 8 × 48 GiB: predicted {claim[8].peak / GIB:.1f} GiB per GPU "
      f"(paper: fits on 48 GB A40s); on 4: "
      + (f"{claim[4].peak / GIB:.1f} GiB" if claim[4] else "no accepted configuration fits"))

report("06_scaling_up", PRESET,
       f"Predicted by the memory model (not measured on a GPU): Yi-34B with LISA needs "
       f"{claim[8].peak / GIB:.1f} GiB per GPU on 8 × 48 GiB; "
       + (f"{claim[4].peak / GIB:.1f} GiB on 4. " if claim[4] else "no accepted configuration fits 4. ")
       + f"Measured on this CPU at {params[-1] / 1e6:.2g}M parameters: "
       + ", ".join(f"{m} {measured[m][-1]:.0f} MiB against {predicted[m][-1]:.0f} predicted "
                   f"({errors[m][-1]:+.0%})" for m in checked)
       + f"; the model misses {missed.min():.0f}–{missed.max():.0f} MiB at every width.")

# %% [markdown]
# **Result.** The sentence above holds this run's numbers. The GPU predictions come from the memory
# model; the paper's claim that Yi-34B trains with LISA on eight 48 GB A40s is quoted. On this CPU
# the measured peak exceeds the prediction by tens of MiB at every width, an amount that grows far
# slower than the model (what the model does not count; not yet attributed), so the relative error
# is large for a model of a few MiB and small from tens of millions of parameters on. The weight, gradient
# and optimizer terms match the trainer's tensors exactly (`tests/test_memory.py`); the GPU
# activation term has not been checked against a GPU yet.
