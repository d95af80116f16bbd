"""nanotune: a lightweight, pure-PyTorch reference trainer for LLaMA-family models."""

__version__ = "0.1.0"
