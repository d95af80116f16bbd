"""Activation checkpointing per transformer block, applied to an unmodified model.

A checkpointed block keeps only its input in the forward and recomputes its activations in the
backward: about one extra forward of compute, for activation memory that no longer grows with
the number of layers. PyTorch's composable `checkpoint` installs this as forward hooks on each
block, so no module is wrapped and every parameter keeps its name (`model.layers.0.mlp...`): state
dicts, HF checkpoints, FSDP2 and LoRA see the same model. Apply it before torch.compile and FSDP.
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every block of `model.model.layers`; parameter names do not change.

    Under `torch.no_grad()` / `inference_mode()` (evaluation, generation with a KV cache) nothing
    is saved and nothing recomputed. A KV cache with gradients on is not supported: the backward's
    recomputation would write the cache a second time.
    """
    for block in model.model.layers:
        checkpoint(block)
