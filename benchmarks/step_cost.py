"""Step cost (issue 6): wall time of one ScaleBiO step, full and with LISA (2 of 12 blocks), against
one plain fine-tuning step on the same model and the same training batch.

    .venv/bin/python benchmarks/step_cost.py --out benchmarks/RESULTS.md   # GPT-2 small, ~3 min
    .venv/bin/python benchmarks/step_cost.py --tiny                        # code path, seconds

Modes, each built by `build.setup` from one TrainConfig (fp32, eager, AdamW, the union sampler):

* scalebio  `trainer.run_step`: LISA draw (none), batches, `bilevel.scalebio_step` (u and w).
* checkpointed  scalebio with `gradient_checkpointing=true` (blocks and the head's loss
            recomputed in backward, `recompute.py`).
* lisa      scalebio with `lisa_active=2` (2 of 12 blocks train, redrawn every 20 steps; the
            embeddings, head and final norm train, as in the paper).
* plain     `baselines.plain_step` on w alone (`copies=1`), uniform p, the same per-source loss
            estimator, clipping and AdamW; its batch comes from `build.batches` for the same
            sampler indices as the ScaleBiO step's training batch.

ScaleBiO also reads a validation batch: its size is the training batch size (`val_batch_size =
batch_size`), so one step does three forward-backward passes of equal size (u on the training
batch, w on the validation batch, w on the training batch): 3.0× plain's single pass is the floor
of the forward-backward work. A step also does two optimizer steps (u's and w's) against plain's
one, and the λ update (K numbers), so with a pass P and an optimizer step O the step ratio is about
(3P + 2O)/(P + O): 3.0× when O is negligible, less when it is not. Targets: ScaleBiO ≤ 3.3× plain,
ScaleBiO with LISA 2/12 ≤ 2.3× plain; ScaleBiO with gradient checkpointing ≤ 1.4× ScaleBiO (issue
13: each backward replays the forward of its blocks and of the LM head's loss).

Model: a random-init GPT-2 of GPT-2-small shape (12 blocks, 768 hidden, 12 heads, vocab 50257:
124M parameters; no dropout), saved with the embedded offline tokenizer (2048 tokens; the model's
vocabulary is larger, as GPT-2's). Data: generated sources of (short prompt, long response)
records that all overflow max_length, so every batch is exactly batch × max_length tokens (default
2 × 128), training and validation alike; labels cover the response (the LM head runs there only).

Allocator: `--cpu-malloc keep` (default) runs all four modes with the trainer's CPU default, which
keeps freed memory in glibc's heap for the next step; `--cpu-malloc system` leaves glibc as it is
configured and writes its own section ("Step cost (cpu_malloc=system)"). The table counts page
faults per step: with glibc's defaults the ScaleBiO step returns memory to the OS and faults it
back in (see scalebio_core/train/malloc.py), which makes its w backward passes 1.5-1.8× slower
than u's on this machine.

Timing: one process holds the four setups and interleaves them, one turn of `--steps` steps per
mode per round, with the order rotated every round (a b c, b c a, c a b, …), for `--repeats`
rounds after `--warmup` untimed rounds. One process rather than alternating fresh ones: the three
modes then share the allocator, thread pool and, step by step, whatever else loads the machine,
and nothing is rebuilt between samples; the interleaving spreads any drift over all modes. The
table gives medians over the timed steps, the IQR (25th-75th percentile) and the ratio to plain
(of the medians, and the median of the per-round paired ratios). Every step is also split into
phases (forwards, backwards, clipping, optimizer steps, λ update, LISA draw, batch building) by
timers wrapped around those calls (microseconds of overhead); what is left is "other".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_lines, save_data, save_model, write_section  # noqa: E402

GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257}
TINY = {"n_layer": 12, "n_embd": 32, "n_head": 2, "vocab_size": 512}  # 12 blocks: LISA 2/12
MODES = ("scalebio", "checkpointed", "lisa", "plain")
TARGETS = {"scalebio": ("plain", 3.3), "lisa": ("plain", 2.3), "checkpointed": ("scalebio", 1.4)}
"""mode: (the mode its median is compared with, the largest ratio allowed)."""
LABELS = {
    "scalebio": "ScaleBiO full",
    "checkpointed": "ScaleBiO full + gradient checkpointing",
    "lisa": "ScaleBiO + LISA 2/12",
    "plain": "plain fine-tuning",
}
WORDS = (
    "river stone light paper garden window music number winter market silver yellow morning "
    "quiet travel simple letter forest orange bridge planet little summer engine animal "
    "question answer circle middle family people history moment water"
).split()
SECTION = "Step cost"


# ------------------------------------------------------------------ shared with cost_scaling.py


def train_config(model_dir: Path, data_dir: Path, out_dir: Path, batch: int, seq: int, **kw):
    """The TrainConfig of the benchmarks: val_batch_size = batch_size, union sampler, fp32."""
    from scalebio_core.train.config import TrainConfig

    return TrainConfig(
        model=str(model_dir),
        tokenizer="embedded",
        data_dir=str(data_dir),
        max_length=seq,
        batch_size=batch,
        val_batch_size=batch,
        sampler="union",
        steps=1000,
        lr_w=1e-5,
        lr_u=1e-5,
        lisa_interval=20,
        out_dir=str(out_dir),
        **kw,
    )


def quartiles(x: list[float]) -> tuple[float, float, float]:
    q = np.percentile(np.asarray(x, float), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


# ------------------------------------------------------------------ phase timers


class Phases:
    """Seconds per phase of the current step; the wrappers below add to it."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.now: dict[str, float] = defaultdict(float)
        self.backward_label = "backward"

    def timed(self, label: str | Callable[..., str], fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            name = label(*args) if callable(label) else label
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.now[name] += time.perf_counter() - t0

        return wrapper

    def take(self) -> dict[str, float]:
        out, self.now = dict(self.now), defaultdict(float)
        return out


def page_faults() -> int:
    """Minor page faults of this process so far (each a fresh 4 KiB page the kernel zero-fills)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@contextlib.contextmanager
def global_timers(ph: Phases) -> Iterator[None]:
    """Time every Tensor.backward (under the label of the last forward) and gradient clipping."""
    backward, clip = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_

    def timed_backward(t, *args, **kwargs):
        return ph.timed(ph.backward_label, backward)(t, *args, **kwargs)

    torch.Tensor.backward = timed_backward
    torch.nn.utils.clip_grad_norm_ = ph.timed("clip gradients", clip)
    try:
        yield
    finally:
        torch.Tensor.backward, torch.nn.utils.clip_grad_norm_ = backward, clip


def timed_fns(ph: Phases, u: torch.nn.Module | None, **kw):
    """LMFns whose forwards are timed; each sets the label of the backward that follows."""
    from scalebio_core.train.losses import LMFns

    class TimedFns(LMFns):
        def source_losses(self, model, batch):
            who = "u" if model is u else "w"
            ph.backward_label = f"{who} train backward"
            return ph.timed(f"{who} train forward", super().source_losses)(model, batch)

        def val_loss(self, model, batch):
            ph.backward_label = "w val backward"
            return ph.timed("w val forward", super().val_loss)(model, batch)

    return TimedFns(**kw)


# ------------------------------------------------------------------ the modes


def build(mode: str, model_dir: Path, data_dir: Path, tmp: Path, a, ph: Phases) -> Callable:
    """Set up `mode`; return step(i) -> None (one full step, batches included)."""
    from scalebio_core.core.baselines import plain_step
    from scalebio_core.train import build as builder
    from scalebio_core.train import trainer

    kw = {"lisa_active": 2} if mode == "lisa" else {}
    if mode == "checkpointed":
        kw["gradient_checkpointing"] = True
    kw["cpu_malloc"] = a.cpu_malloc
    cfg = train_config(model_dir, data_dir, tmp / mode, a.batch, a.seq, **kw)
    s = builder.setup(cfg, copies=1 if mode == "plain" else 2)
    st = s.state
    st.opt_w.step = ph.timed("w optimizer step", st.opt_w.step)
    st.opt_u.step = ph.timed("u optimizer step", st.opt_u.step)
    st.opt_lam.step = ph.timed("λ update", st.opt_lam.step)
    if s.lisa:
        for lz in s.lisa:
            lz.apply = ph.timed("LISA draw", lz.apply)
    fns = timed_fns(ph, None if mode == "plain" else st.u)
    models = {id(st.w): st.w, id(st.u): st.u}.values()

    def drop_grads() -> None:  # between turns: the next step reallocates them anyway
        for m in models:
            for p in m.parameters():
                p.grad = None

    if mode == "plain":
        p = torch.full((len(s.names),), 1.0 / len(s.names))

        def step(i: int) -> None:
            batch = ph.timed("build batches", builder.train_batch)(s, i)
            plain_step(st.w, st.opt_w, batch, fns, p, st.config, i, divisor=s.divisor)
    else:

        def step(i: int) -> None:
            trainer.run_step(s, i, fns, ph.timed("build batches", builder.step_batches)(s, i))

    step.drop_grads = drop_grads  # type: ignore[attr-defined]
    step.trainable = lambda: sum(  # type: ignore[attr-defined]
        p.numel() for p in st.w.parameters() if p.requires_grad
    )
    step.blocks = "2 of 12 (+ embeddings, head)" if mode == "lisa" else "all"  # type: ignore
    return step


def measure(a) -> dict:
    """Interleaved timing of the modes; per mode: step seconds and per-phase seconds."""
    shape = TINY if a.tiny else {**GPT2_SMALL, "n_embd": a.width, "n_head": a.heads}
    shape = {**shape, "n_layer": 12}
    if not a.tiny and a.vocab:
        shape["vocab_size"] = a.vocab
    cuda = torch.cuda.is_available()
    ph = Phases(torch.cuda.synchronize if cuda else lambda: None)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    faults: dict[str, list[int]] = {m: [] for m in MODES}
    phases: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp_name, global_timers(ph):
        tmp = Path(tmp_name)
        model_dir = save_model(tmp / "model", shape, positions=max(256, a.seq))
        data_dir = save_data(tmp / "data", sources=a.sources, words=max(200, 2 * a.seq))
        steps = {m: build(m, model_dir, data_dir, tmp, a, ph) for m in MODES}
        from scalebio_core.plan.memory import model_shape

        n_params = model_shape(str(model_dir)).params
        i = 0
        for rnd in range(a.warmup + a.repeats):
            order = MODES[rnd % len(MODES) :] + MODES[: rnd % len(MODES)]
            for mode in order:
                for k in range(a.steps):
                    ph.take()
                    ph.sync()
                    t0, c0, f0 = time.perf_counter(), time.process_time(), page_faults()
                    steps[mode](i + k)
                    ph.sync()
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                    df = page_faults() - f0
                    split = ph.take()
                    if rnd >= a.warmup:
                        times[mode].append(dt)
                        cpu[mode].append(dc)
                        faults[mode].append(df)
                        phases[mode].append({**split, "total": dt})
                steps[mode].drop_grads()
            i += a.steps
    return {
        "times": times,
        "cpu": cpu,
        "faults": faults,
        "phases": phases,
        "params": n_params,
        "shape": shape,
        "blocks": {m: steps[m].blocks for m in MODES},
        "trainable": {m: steps[m].trainable() for m in MODES},
    }


# ------------------------------------------------------------------ report

PHASE_ORDER = (
    "build batches",
    "LISA draw",
    "u train forward",
    "u train backward",
    "w val forward",
    "w val backward",
    "w train forward",
    "w train backward",
    "clip gradients",
    "u optimizer step",
    "w optimizer step",
    "λ update",
    "other",
)


def phase_medians(rows: list[dict]) -> dict[str, float]:
    """Median seconds per phase (missing = 0); 'other' = total − the timed phases, per step."""
    out = {}
    for name in PHASE_ORDER[:-1]:
        out[name] = float(np.median([r.get(name, 0.0) for r in rows]))
    timed = [sum(v for k, v in r.items() if k != "total") for r in rows]
    out["other"] = float(np.median([r["total"] - t for r, t in zip(rows, timed)]))
    return out


def report(res: dict, a) -> tuple[str, dict]:
    times, n = res["times"], len(res["times"]["plain"])
    med = {m: quartiles(times[m])[1] for m in MODES}
    paired = {m: float(np.median(np.asarray(times[m]) / np.asarray(times["plain"]))) for m in MODES}
    lines = [
        "| mode | blocks training | s/step (median) | IQR (s) | × plain (medians) "
        "| × plain (paired, median) | CPU s/step (median) | × plain (CPU) | page faults/step "
        "(median) | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    summary = {}
    for m in MODES:
        q1, q2, q3 = quartiles(times[m])
        ratio = q2 / med["plain"]
        c = float(np.median(res["cpu"][m]))
        c_ratio = c / float(np.median(res["cpu"]["plain"]))
        ref, target = TARGETS.get(m, (None, None))
        ref_ratio = q2 / med[ref] if ref else None
        met = "—" if target is None else ("yes" if ref_ratio <= target else "NO")
        summary[m] = {"median_s": q2, "iqr_s": q3 - q1, "ratio": ratio, "paired": paired[m]}
        lines.append(
            f"| {LABELS[m]} | {res['blocks'][m]} | {q2:.3f} | {q1:.3f}–{q3:.3f} | {ratio:.2f} | "
            f"{paired[m]:.2f} | {c:.3f} | {c_ratio:.2f} | "
            f"{int(np.median(res['faults'][m])):,} | "
            f"{'—' if target is None else f'{ref_ratio:.2f} × {LABELS[ref]} (≤ {target:.1f})'} "
            f"| {met} |"
        )
    pm = {m: phase_medians(res["phases"][m]) for m in MODES}
    plain_pass = pm["plain"]["w train forward"] + pm["plain"]["w train backward"]
    plines = [
        "| phase (median s) | " + " | ".join(LABELS[m] for m in MODES) + " |",
        "|---|" + "---:|" * len(MODES),
    ]
    for name in PHASE_ORDER:
        if all(pm[m][name] == 0 for m in MODES):
            continue
        plines.append(f"| {name} | " + " | ".join(f"{pm[m][name]:.4f}" for m in MODES) + " |")
    plines.append("| **step (median)** | " + " | ".join(f"{med[m]:.4f}" for m in MODES) + " |")

    def share(m: str, keys: tuple[str, ...]) -> float:
        return sum(pm[m][k] for k in keys) / med["plain"]

    passes = tuple(k for k in PHASE_ORDER if k.endswith(("forward", "backward")))
    opt = ("u optimizer step", "w optimizer step", "λ update")
    rest = tuple(k for k in PHASE_ORDER if k not in passes + opt)
    notes = []
    for m in ("scalebio", "lisa"):
        notes.append(
            f"- {LABELS[m]} = {summary[m]['ratio']:.2f}× plain: forward-backward passes "
            f"{share(m, passes):.2f}× + optimizer steps and λ {share(m, opt):.2f}× + clipping, "
            f"batches, LISA and other {share(m, rest):.2f}× (plain: passes "
            f"{share('plain', passes):.2f}×, optimizer {share('plain', opt):.2f}×, rest "
            f"{share('plain', rest):.2f}×)."
        )
    full_bwd = pm["scalebio"]["w train backward"]
    lisa_bwd = pm["lisa"]["w train backward"]
    full_fwd, lisa_fwd = pm["scalebio"]["w train forward"], pm["lisa"]["w train forward"]
    notes.append(
        f"- LISA 2/12: the backward of w on the training batch takes {lisa_bwd:.3f} s against "
        f"{full_bwd:.3f} s with every block training ({lisa_bwd / full_bwd:.2f}×; forward "
        f"{lisa_fwd / full_fwd:.2f}×): frozen blocks skip their weight gradients, but the "
        "activation gradients still flow back through all 12 blocks to the embeddings, which "
        f"train. The w optimizer step: {pm['lisa']['w optimizer step']:.3f} s against "
        f"{pm['scalebio']['w optimizer step']:.3f} s. One forward-backward pass of plain "
        f"fine-tuning: {plain_pass:.3f} s; its optimizer step: "
        f"{pm['plain']['w optimizer step']:.3f} s "
        f"({pm['plain']['w optimizer step'] / plain_pass:.2f}× a pass)."
    )
    f, b, o = (pm["plain"][k] for k in ("w train forward", "w train backward", "w optimizer step"))
    b_l, o_l = pm["lisa"]["w train backward"], pm["lisa"]["w optimizer step"]
    floor = {
        "scalebio": (3 * (f + b) + 2 * o) / (f + b + o),
        "lisa": (3 * (f + b_l) + 2 * o_l) / (f + b + o),
    }
    summary["floor"] = floor
    notes.append(
        f"- The floor this run's own pass costs imply (plain's forward F = {f:.3f} s, backward B = "
        f"{b:.3f} s, optimizer step O = {o:.3f} s; with LISA the backward B_L = {b_l:.3f} s and "
        f"the optimizer step O_L = {o_l:.3f} s): ScaleBiO (3F + 3B + 2O)/(F + B + O) = "
        f"{floor['scalebio']:.2f}× (measured {summary['scalebio']['ratio']:.2f}×), with LISA "
        f"(3F + 3B_L + 2O_L)/(F + B + O) = {floor['lisa']:.2f}× (measured "
        f"{summary['lisa']['ratio']:.2f}×). Forwards are not cheaper under LISA (every block "
        "runs), and a frozen block's backward still computes its activation gradients."
    )
    ck = med["checkpointed"] / med["scalebio"]
    bwd_keys = tuple(k for k in passes if k.endswith("backward"))
    ck_bwd = sum(pm["checkpointed"][k] for k in bwd_keys) / sum(pm["scalebio"][k] for k in bwd_keys)
    summary["checkpointed"]["vs_scalebio"] = ck
    notes.append(
        f"- Gradient checkpointing: {ck:.2f}× the ScaleBiO step (target ≤ "
        f"{TARGETS['checkpointed'][1]:.1f}×): each backward replays its blocks' forward and the "
        f"LM head's loss, chunk by chunk (the backwards take {ck_bwd:.2f}× those without)."
    )
    for m in ("scalebio", "lisa"):
        if summary[m]["ratio"] > TARGETS[m][1]:
            fwd = sum(pm[m][k] for k in passes if k.endswith("forward"))
            bwd = sum(pm[m][k] for k in passes if k.endswith("backward"))
            bwd_full = sum(pm["scalebio"][k] for k in passes if k.endswith("backward"))
            frac = res["trainable"][m] / res["params"]
            if m == "scalebio":
                notes.append(
                    f"- Target missed for {LABELS[m]} ({summary[m]['ratio']:.2f}× > 3.3×): "
                    f"passes {share(m, passes):.2f}×, optimizer steps + λ {share(m, opt):.2f}×, "
                    f"rest {share(m, rest):.2f}× (the split above)."
                )
                continue
            notes.append(
                f"- Target missed for {LABELS[m]} ({summary[m]['ratio']:.2f}× > "
                f"{TARGETS[m][1]:.1f}×). What costs the extra: the three forwards take {fwd:.2f} s "
                f"({fwd / med['plain']:.2f}× a plain step; every block still runs forward), the "
                f"three backwards {bwd:.2f} s ({bwd / med['plain']:.2f}×; "
                f"{bwd / bwd_full:.2f}× those with every block training, since activation "
                "gradients still cross all blocks), and the optimizer steps + λ "
                f"{share(m, opt):.2f}×: {res['trainable'][m] / 1e6:.1f}M of "
                f"{res['params'] / 1e6:.1f}M parameters per copy still train ({frac:.0%}: the "
                "embeddings and head train under LISA, and the token embedding is "
                f"{res['shape']['vocab_size']} × {res['shape']['n_embd']})."
            )
    sh = res["shape"]
    header = [
        f"Model: random-init GPT-2, {sh['n_layer']} blocks × {sh['n_embd']} hidden, {sh['n_head']} "
        f"heads, vocab {sh['vocab_size']} ({res['params'] / 1e6:.1f}M parameters), fp32. "
        f"Batch: {a.batch} × {a.seq} tokens for training and the same for validation "
        "(val_batch_size = batch_size: three equal forward-backward passes, 3.0× plain's one, "
        "plus two optimizer steps against one); "
        f"{a.sources} sources, union sampler. {a.repeats} interleaved rounds (order rotated) × "
        f"{a.steps} step(s) per mode after {a.warmup} warm-up round(s): {n} timed steps per mode.",
        f"CPU allocator: `cpu_malloc={a.cpu_malloc}` for all four modes"
        + (
            " (the trainer's default: glibc keeps freed memory for the next step; "
            "scalebio_core/train/malloc.py)."
            if a.cpu_malloc == "keep"
            else " (glibc's defaults: freed memory goes back to the OS and is faulted in again)."
        ),
        f"Load average (1 min) of the machine at the start / end: {res['load'][0]:.1f} / "
        f"{res['load'][1]:.1f} on {os.cpu_count()} logical cores (anything above the torch "
        "threads of this process is other work competing for the cores; the wall times and, "
        "less so, the CPU times (process time of all its threads) are then inflated and noisy).",
    ]
    text = "\n".join(
        [
            *header,
            "",
            *lines,
            "",
            "Where the time goes (median seconds per phase of a step):",
            "",
            *plines,
            "",
            *notes,
        ]
    )
    return text, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="12 blocks × 32 wide, 2 × 32: seconds")
    ap.add_argument("--width", type=int, default=768, help="hidden size (12 blocks always)")
    ap.add_argument("--heads", type=int, default=12, help="attention heads")
    ap.add_argument("--vocab", type=int, default=50257, help="model vocabulary (GPT-2: 50257)")
    ap.add_argument("--batch", type=int, default=2, help="training (= validation) batch size")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sample (all samples fill it)")
    ap.add_argument("--sources", type=int, default=2, help="training sources")
    ap.add_argument("--steps", type=int, default=1, help="consecutive steps per mode per round")
    ap.add_argument("--repeats", type=int, default=8, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument(
        "--cpu-malloc",
        choices=("keep", "system"),
        default="keep",
        help="the trainer's cpu_malloc (keep: its default; system: glibc as configured)",
    )
    ap.add_argument(
        "--out", type=Path, help=f"write/replace the '## {SECTION}' section (or its 'system' twin)"
    )
    a = ap.parse_args(argv)
    if a.tiny:
        a.seq, a.batch, a.repeats, a.warmup = min(a.seq, 32), min(a.batch, 2), 2, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    res = measure(a)
    res["load"] = (load0, os.getloadavg()[0])
    text, _ = report(res, a)
    total = time.perf_counter() - t0
    print(text)
    print(f"\nTotal wall time: {total:.0f} s")
    if a.out:
        write_section(
            a.out,
            SECTION if a.cpu_malloc == "keep" else f"{SECTION} (cpu_malloc=system)",
            [*machine_lines(), f"- total wall time: {total:.0f} s", "", text],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
