"""Training data: embedded corpora, formats and tokenization, batch samplers, the tokenizer."""

__all__ = [
    "corpora",
    "data",
    "sampling",
    "tokenizer",
]
