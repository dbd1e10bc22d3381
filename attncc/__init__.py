"""attncc: a compiler for linear-attention variants."""

__version__ = "0.1.0"
