"""`python -m scalebio_core …`: the command line of `cli.py`."""

from __future__ import annotations

from .cli import main
from .core.distributed import leave

leave(main())
