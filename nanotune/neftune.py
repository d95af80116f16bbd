"""NEFTune: uniform noise added to the input embeddings while fine-tuning (Jain et al., 2023).

Noise of size alpha / sqrt(T * C) on every embedding makes SFT generalise better; it is applied in
training mode only, so evaluation and generation see the clean embeddings. It is a forward hook on
`embed_tokens` that the training loop installs, not an option of the model: the model stays the
plain LLaMA, and the noise is drawn from the global RNG at the same point of the forward as ever,
so seeded runs repeat bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def add_neftune_noise(model: nn.Module, alpha: float) -> RemovableHandle:
    """Add NEFTune noise to `model.model.embed_tokens`'s output in training mode; return the hook's
    handle (`handle.remove()` takes the noise away again). alpha must be positive (5 is usual)."""
    if alpha <= 0:
        raise ValueError(f"NEFTune alpha must be positive, not {alpha} (install no hook for 0)")

    def add_noise(embed_tokens: nn.Module, inputs, embeddings: torch.Tensor) -> torch.Tensor | None:
        if not embed_tokens.training:
            return None  # the output as it is
        T, C = embeddings.shape[-2:]  # embeddings (B, T, C)
        scale = alpha / math.sqrt(T * C)
        return embeddings + torch.empty_like(embeddings).uniform_(-scale, scale)

    return model.model.embed_tokens.register_forward_hook(add_noise)
