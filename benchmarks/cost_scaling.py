"""Cost scaling (issue 6): ScaleBiO step time and peak memory against model size (about 1M to
124M parameters) and against the number of sources K (2 to 64, at a fixed small model).

    .venv/bin/python benchmarks/cost_scaling.py --out benchmarks/RESULTS.md   # ~2-3 min on 2 cores
    .venv/bin/python benchmarks/cost_scaling.py --tiny                        # code path, seconds

Every point is one fresh subprocess: `build.setup` (fp32, eager, AdamW, full ScaleBiO, union
sampler, val_batch_size = batch_size), `--warmup` untimed `trainer.run_step`s, then `--steps` timed
ones; the step time is their median. Models are random-init GPT-2 shapes of growing width and depth
with the embedded tokenizer's vocabulary (2048), and GPT-2 small itself (vocab 50257, 124M) as the
largest; data are generated (short prompt, long response) records that fill max_length, so every
batch is exactly batch × max_length tokens (default 2 × 128, training and validation alike).
The K sweep writes K source files of the same records at the "5M" shape (its K = 2 point is the
size sweep's "5M" point): the data per step stay the batch size, only the λ-gradient (O(K)) and
the per-source bookkeeping grow.

Memory, two measures per point, both explicit:
* state MiB: exact bytes of the parameters, gradients and optimizer state of u and w after the
  last step (λ and its optimizer are K floats and are ignored);
* peak MiB: the measured peak resident set of the child during the timed steps (VmHWM, reset via
  /proc/self/clear_refs before them) minus its resident set after the imports, before any model
  was built: state + activations + allocator slack, comparable with the state column.
Fitted log-log slopes (least squares of log y on log x) are given per sweep; the figure goes to
figures/cost_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    machine_lines,
    peak_kib,
    reset_peak,
    save_data,
    save_model,
    status_kib,
    write_section,
)

SIZES = {  # name: GPT2Config shape
    "1M": {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 2048},
    "5M": {"n_layer": 6, "n_embd": 256, "n_head": 8, "vocab_size": 2048},
    "26M": {"n_layer": 8, "n_embd": 512, "n_head": 8, "vocab_size": 2048},
    "87M": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 2048},
    "124M": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257},
}
SOURCES = (2, 4, 8, 16, 32, 64)
K_SHAPE = "5M"
TINY_SIZES = {
    "tiny-a": {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 512},
    "tiny-b": {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512},
}
TINY_SOURCES = (2, 4)
SECTION = "Cost scaling"
MIB = 2**20


# ------------------------------------------------------------------ the child


def child(spec: dict) -> dict:  # runs in a fresh subprocess
    import accelerate  # noqa: F401  (imports first: the baseline holds no model bytes)
    import torch
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    from step_cost import train_config

    from scalebio_core.core.lisa import optimizer_state_bytes
    from scalebio_core.train.build import setup
    from scalebio_core.train.losses import LMFns
    from scalebio_core.train.trainer import run_step

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    before = status_kib("VmRSS") / 1024
    cfg = train_config(
        Path(spec["model"]), Path(spec["data"]), Path(spec["out"]), spec["batch"], spec["seq"]
    )
    s = setup(cfg)
    fns = LMFns()
    for i in range(spec["warmup"]):
        run_step(s, i, fns)
    reset = reset_peak()
    times, cpu = [], []
    for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        run_step(s, i, fns)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = peak_kib(reset) / 1024
    models = (s.state.w, s.state.u)
    state = sum(
        p.numel() * p.element_size()
        + (0 if p.grad is None else p.grad.numel() * p.grad.element_size())
        for m in models
        for p in m.parameters()
    )
    state += optimizer_state_bytes(s.state.opt_w) + optimizer_state_bytes(s.state.opt_u)
    return {
        "params": sum(p.numel() for p in s.state.w.parameters()),
        "k": len(s.names),
        "seconds": float(np.median(times)),
        "times": times,
        "cpu_seconds": float(np.median(cpu)),
        "load": os.getloadavg()[0],
        "state_mib": state / MIB,
        "peak_mib": peak - before,
        "peak_reset": reset,
        "threads": torch.get_num_threads(),
    }


def run_child(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({spec}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the sweeps


def slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def sweep(a, tmp: Path) -> tuple[list[dict], list[dict]]:
    sizes = TINY_SIZES if a.tiny else SIZES
    ks = TINY_SOURCES if a.tiny else tuple(a.sources)
    base = {
        "batch": a.batch,
        "seq": a.seq,
        "warmup": a.warmup,
        "steps": a.steps,
        "threads": a.threads,
    }
    words = max(200, 2 * a.seq)
    data2 = save_data(tmp / "data_k2", sources=2, n=8, words=words)
    by_size = []
    for name, shape in sizes.items():
        model = save_model(tmp / f"model_{name}", shape, positions=max(256, a.seq))
        r = run_child({**base, "model": str(model), "data": str(data2), "out": str(tmp / "run")})
        by_size.append({"name": name, "shape": shape, **r})
        print(f"  size {name}: {r['seconds']:.3f} s/step, peak {r['peak_mib']:.0f} MiB", flush=True)
        if name != (list(sizes)[0] if a.tiny else K_SHAPE):
            (model / "model.safetensors").unlink(missing_ok=True)
    k_name = list(sizes)[0] if a.tiny else K_SHAPE
    model = tmp / f"model_{k_name}"
    by_k = []
    for k in ks:
        same = [r for r in by_size if r["name"] == k_name and r["k"] == k]
        if same:  # the identical configuration was measured in the size sweep
            by_k.append(same[0])
            continue
        data = save_data(tmp / f"data_k{k}", sources=k, n=8, words=words)
        r = run_child({**base, "model": str(model), "data": str(data), "out": str(tmp / "run")})
        by_k.append({"name": k_name, **r})
        print(f"  K = {k}: {r['seconds']:.3f} s/step, peak {r['peak_mib']:.0f} MiB", flush=True)
    return by_size, by_k


def figure(by_size: list[dict], by_k: list[dict], slopes: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalebio_core.lab.plots import plot_loglog, save_figure

    # one unit per axis (seconds, then GiB); a row shares its y range, so the flat K sweep reads
    # as flat beside the size sweep
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharey="row")
    for col, rows, key, xlabel, title in (
        (0, by_size, "params", "parameters per model copy", "against model size"),
        (1, by_k, "k", "number of sources K", f"against K ({by_k[0]['name']} model)"),
    ):
        x = [r[key] for r in rows]
        plot_loglog(
            axes[0, col],
            {"step time": (x, [r["seconds"] for r in rows])},
            xlabel,
            "seconds per step",
            f"ScaleBiO step time {title}",
            slopes={"step time": slopes[key]["time"]},
        )
        plot_loglog(
            axes[1, col],
            {
                "peak memory": (x, [r["peak_mib"] / 1024 for r in rows]),
                "u, w state (exact)": (x, [r["state_mib"] / 1024 for r in rows]),
            },
            xlabel,
            "GiB",
            f"ScaleBiO memory {title}",
            slopes={"peak memory": slopes[key]["peak"], "u, w state (exact)": slopes[key]["state"]},
        )
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax in axes[:, 1]:
        ax.yaxis.set_tick_params(labelleft=True)
        ax.set_xticks([r["k"] for r in by_k])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    return save_figure(fig, "cost_scaling")


def table(rows: list[dict], key: str) -> list[str]:
    first = "params | shape" if key == "params" else "K"
    out = [
        f"| {first} | s/step (median) | IQR (s) | CPU s/step | load | state MiB (exact) "
        "| peak MiB (measured) |",
        "|---:|" + ("---|" if key == "params" else "") + "---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        q1, q3 = np.percentile(r["times"], [25, 75])
        if key == "params":
            sh = r["shape"]
            x = f"{r['params'] / 1e6:.2f}M | {sh['n_layer']} × {sh['n_embd']}, "
            x += f"vocab {sh['vocab_size']}"
        else:
            x = str(r["k"])
        out.append(
            f"| {x} | {r['seconds']:.3f} | {q1:.3f}–{q3:.3f} | {r['cpu_seconds']:.3f} | "
            f"{r['load']:.1f} | {r['state_mib']:.0f} | "
            f"{r['peak_mib']:.0f} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(json.loads(argv[1]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="two tiny models, K = 2, 4: seconds")
    ap.add_argument("--batch", type=int, default=2, help="training (= validation) batch size")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sample (all samples fill it)")
    ap.add_argument("--sources", type=int, nargs="+", default=list(SOURCES), help="K values")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per point")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per point first")
    ap.add_argument("--threads", type=int, help="torch threads in the children (default: torch's)")
    ap.add_argument("--out", type=Path, help=f"write/replace the '## {SECTION}' section here")
    ap.add_argument("--no-figure", action="store_true", help="skip figures/cost_scaling.png")
    a = ap.parse_args(argv)
    if a.tiny:
        a.seq, a.batch, a.steps, a.warmup = min(a.seq, 32), min(a.batch, 2), 2, 1
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        by_size, by_k = sweep(a, Path(tmp))
    total = time.perf_counter() - t0
    slopes = {
        key: {
            m: slope([r[key] for r in rows], [r[col] for r in rows])
            for m, col in (("time", "seconds"), ("peak", "peak_mib"), ("state", "state_mib"))
        }
        for key, rows in (("params", by_size), ("k", by_k))
    }
    fig = None if a.no_figure else figure(by_size, by_k, slopes)
    threads = by_size[0]["threads"]
    mem = "VmHWM reset before the timed steps" if by_size[0]["peak_reset"] else "ru_maxrss"
    lines = [
        f"Full ScaleBiO (u and w, AdamW, fp32), batch {a.batch} × {a.seq} tokens for training "
        f"and the same for validation, union sampler; one fresh subprocess per point "
        f"({threads} torch threads), {a.warmup} warm-up + {a.steps} timed steps, median. "
        "state = exact bytes of parameters + gradients + AdamW state of u and w; peak = measured "
        f"peak RSS during the timed steps ({mem}) above the RSS after the imports. CPU s/step = "
        "process time of the child (all its threads), median; load = the machine's 1-minute load "
        "average after the point (other work on the shared cores inflates the wall times).",
        "",
        "Against model size (K = 2):",
        "",
        *table(by_size, "params"),
        f"| **log-log slope** | | {slopes['params']['time']:.2f} | | | | "
        f"{slopes['params']['state']:.2f} | {slopes['params']['peak']:.2f} |",
        "",
        f"Against the number of sources K ({by_k[0]['name']} model, {by_k[0]['params'] / 1e6:.2f}M "
        "parameters):",
        "",
        *table(by_k, "k"),
        f"| **log-log slope** | {slopes['k']['time']:.2f} | | | | {slopes['k']['state']:.2f} | "
        f"{slopes['k']['peak']:.2f} |",
        "",
        f"Figure: {'not written' if fig is None else 'figures/cost_scaling.png'}.",
    ]
    text = "\n".join(lines)
    print(text)
    print(f"\nTotal wall time: {total:.0f} s")
    if a.out:
        write_section(
            a.out, SECTION, [*machine_lines(), f"- total wall time: {total:.0f} s", "", text]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
