"""What a training step minimises, as the loop sees it: a summed loss and the units it is a sum over.

The loop never averages. For each micro-batch it asks the objective for

    count(batch)          the units this micro-batch contributes (target tokens, pairs, ...)
    loss(model, batch)    (the loss *summed* over those units, sums of any figures worth logging)

adds the counts of the whole global batch (all micro-batches, all ranks) and divides every summed
loss by that one number before the backward. The step's loss is then the mean over the global
batch's units however it is split, and gradient accumulation equals one big batch exactly. A
mean of per-micro-batch means would weight a unit of a short micro-batch more than one of a long
micro-batch (the accumulation bug of transformers #35856).

Pretraining and SFT are `TokenObjective` (units = target tokens); preference objectives plug in
the same way with units = pairs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .loss import IGNORE_INDEX


class TokenObjective:
    """Next-token cross-entropy over every position whose label is not -100."""

    unit = "target_tokens"

    def count(self, batch: dict) -> torch.Tensor:
        """Target tokens of this micro-batch, a 0-dim tensor (no host sync)."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed token cross-entropy, {}): the model sums inside its fused lm_head + loss."""
        return model(**batch), {}

    def summary(self, loss_sum: float, count: float, sums: dict[str, float]) -> dict:
        """The figures of a log line or an evaluation, from the sums of a window of steps."""
        loss = loss_sum / max(count, 1.0)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    def without_units(self, item: dict) -> dict:
        """`item` with nothing to learn (all labels -100): evaluation pads a rank's short share with it."""
        masked = dict(item)
        labels = item["labels"]
        masked["labels"] = torch.full_like(labels, IGNORE_INDEX) if torch.is_tensor(labels) else [IGNORE_INDEX] * len(labels)
        return masked
