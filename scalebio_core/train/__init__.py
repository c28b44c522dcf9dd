"""A run around the core: config, models, set-up, the one loop, recipes, checkpoints, pipeline."""

__all__ = [
    "build",
    "checkpoint",
    "config",
    "convergence",
    "identity",
    "loop",
    "lora",
    "losses",
    "malloc",
    "models",
    "pipeline",
    "probe",
    "recompute",
    "runs",
    "trainer",
]
