"""The CPU memory allocator (glibc): keep freed memory for reuse in training, or hand it back.

On CPU, PyTorch allocates every tensor with the C library's malloc and frees it when the last
reference goes. glibc hands large blocks (above an adaptive threshold of at most 32 MiB, e.g. a
GPT-2 token-embedding gradient or the logits of a batch) straight back to the OS, and trims the top
of its heap when more than twice that threshold is free there. The next allocation of the same
size then touches fresh pages, and the kernel zero-fills each 4 KiB page on first touch (a page
fault). A ScaleBiO step frees and reallocates more memory per step than plain fine-tuning (two
models' activations and gradients, alive at different times), and on the CPU machine measured in
benchmarks/RESULTS.md ("Step cost (cpu_malloc=system)") these page faults make w's backward passes
1.5-1.8× slower than u's identical one: hundreds of thousands of faults per step, counted by
`resource.getrusage().ru_minflt`.

`keep_freed_memory()` sets, for the process, glibc's mmap and trim thresholds to 2 GiB (mallopt
M_MMAP_THRESHOLD, M_TRIM_THRESHOLD; the most an int holds): a block freed by one pass stays in
malloc's heap and the next pass reuses it without faults. On that machine the step then faults
no page once warm, and w's passes take as long as u's. The cost is resident memory: the heap does
not shrink after its peak (the next step needs that memory again anyway), and it can keep a few
freed copies of a large block that an aligned request of the same size cannot reuse (glibc's
per-thread cache holds the small remainders between them; the waste is bounded). The memory
benchmark measures it per configuration (its `cpu_malloc=keep` column; GPT-2 small, full
ScaleBiO: a peak of 5110 MiB against 4293 MiB of live tensors). The trainer applies it on CPU
unless `cpu_malloc: system` is set; it changes no result, only time and resident memory.
Elsewhere (not glibc, GPUs) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP = 2**31 - 1  # bytes (mallopt takes an int): neither mmap nor trim below 2 GiB

_applied: str | None = None


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library (OSError where there is none to load)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def release_freed_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc), so the resident set
    tracks the live bytes (the memory probe measures from there)."""
    gc.collect()
    try:
        libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


def keep_freed_memory() -> str:
    """Set glibc to keep freed memory (once per process); returns what was done, for the log."""
    global _applied
    if _applied is not None:
        return _applied
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _applied = f"cpu_malloc=keep: not glibc ({platform.system()}), allocator left as it is"
        return _applied
    try:
        c = libc()
        ok = c.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(KEEP)) == 1
        ok = c.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(KEEP)) == 1 and ok
    except (OSError, AttributeError) as e:
        _applied = f"cpu_malloc=keep: mallopt unavailable ({e}), allocator left as it is"
        return _applied
    _applied = (
        "cpu_malloc=keep: glibc keeps freed memory for reuse (mmap and trim thresholds 2 GiB)"
        if ok
        else "cpu_malloc=keep: glibc refused mallopt, allocator left as it is"
    )
    return _applied
