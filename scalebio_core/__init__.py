"""ScaleBiO: first-order bilevel data reweighting (Pan et al., arXiv 2406.19976), thin core."""

from __future__ import annotations

from .bilevel import (
    BilevelConfig,
    BilevelState,
    ConfigError,
    NonFiniteLossError,
    init_state,
    lam_grad,
    scalebio_step,
    warmup_cosine,
    weighted_lower_loss,
)
from .problem import BilevelProblem, BilevelResult, loglog_slope, solve

__version__ = "0.1.0"

__all__ = [
    "BilevelConfig",
    "BilevelProblem",
    "BilevelResult",
    "BilevelState",
    "ConfigError",
    "NonFiniteLossError",
    "init_state",
    "lam_grad",
    "loglog_slope",
    "scalebio_step",
    "solve",
    "warmup_cosine",
    "weighted_lower_loss",
]
