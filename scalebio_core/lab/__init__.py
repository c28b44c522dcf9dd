"""What the notebooks use: widgets, plots, preset runs, results, planted mixture, rehearsal."""

__all__ = [
    "experiments",
    "paths",
    "planted",
    "plots",
    "rehearsal",
    "results",
    "widgets",
]
