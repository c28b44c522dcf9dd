"""The thin core: the ScaleBiO step, its distribution interface, LISA, toys, baselines' steps."""

__all__ = [
    "baselines",
    "bilevel",
    "blocks",
    "distributed",
    "lisa",
    "masters",
    "problem",
    "toy",
    "toy_runs",
]
