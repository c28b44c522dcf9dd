"""ScaleBiO: first-order bilevel data reweighting (Pan et al., arXiv 2406.19976), thin core."""

from __future__ import annotations

import os as _os

import torch as _torch

# transformers imports DeepSpeed (when installed) as it loads or saves a model; DeepSpeed then
# warns on every import that it fell back to the CPU. Where there is no GPU, say so up front.
if "DS_ACCELERATOR" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["DS_ACCELERATOR"] = "cpu"

from .core.bilevel import (
    BilevelConfig,
    BilevelState,
    init_state,
    lam_grad,
    scalebio_step,
    warmup_cosine,
    weighted_lower_loss,
)
from .core.problem import BilevelProblem, BilevelResult, loglog_slope, solve
from .errors import ConfigError, NonFiniteLossError

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
