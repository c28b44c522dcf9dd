"""The engines that spread a step over processes: DDP, FSDP2, DeepSpeed ZeRO."""

__all__ = [
    "engines",
    "sharding",
    "zero",
]
