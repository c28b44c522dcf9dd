"""Planning a run on GPUs: the memory model and the scale-out planner (what fits, what to run)."""

__all__ = [
    "memory",
    "scaleout",
]
