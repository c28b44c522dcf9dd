"""Shared by the benchmark scripts: the machine description and RESULTS.md sections."""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import re
import shlex
import sys
from pathlib import Path


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines() -> list[str]:
    """Command, date and machine, as markdown bullet lines."""
    import torch

    return [
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- platform: {platform.platform()}, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores",
    ]


def write_section(path: Path, title: str, lines: list[str]) -> None:
    """Write `## title` and `lines` into the markdown file `path`, replacing that section (up to
    the next `## ` heading) when it exists, else appending it; other sections are kept."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = "\n".join([f"## {title}", "", *lines]).rstrip() + "\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


# ------------------------------------------------ resident memory (Linux /proc)


def status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now; VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> bool:
    """Restart VmHWM from the present resident set (/proc/self/clear_refs); False where the
    kernel does not allow it (then only the process's lifetime peak, ru_maxrss, is known)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kib(reset: bool) -> int:
    """The peak resident set in KiB: since `reset_peak` when it succeeded, else the lifetime
    peak of the process (ru_maxrss)."""
    if reset:
        return status_kib("VmHWM")
    import resource  # lazy: only the fallback reads it

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes there, KiB on Linux


# ------------------------------------------------ models and data of the LLM benchmarks

WORDS = (
    "river stone light paper garden window music number winter market silver yellow morning "
    "quiet travel simple letter forest orange bridge planet little summer engine animal "
    "question answer circle middle family people history moment water"
)


def save_model(path: Path, shape: dict, positions: int = 256, seed: int = 0) -> Path:
    """A random-init GPT-2 of `shape` (no dropout) plus the embedded tokenizer, in `path`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from scalebio_core.sources import tokenizer as tok_mod

    tok = tok_mod.get_tokenizer(min(shape["vocab_size"], 2048))
    config = GPT2Config(
        **shape,
        n_positions=positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_data(
    path: Path,
    sources: int = 2,
    n: int = 16,
    words: int = 200,
    seed: int = 0,
    prompt: str = "Go:",
    prompt_words: int = 2,
) -> Path:
    """`sources` training files and a validation file of (short prompt, long response) records;
    with `words` ≥ max_length every sample is truncated to exactly max_length tokens."""
    r = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    names = [f"s{i:02d}" for i in range(sources)] + ["validation"]
    for name in names:
        with open(path / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                text = prompt + " " + " ".join(r.choices(WORDS, k=prompt_words))
                response = " ".join(r.choices(WORDS, k=words))
                f.write(json.dumps({"prompt": text, "response": response}) + "\n")
    return path
