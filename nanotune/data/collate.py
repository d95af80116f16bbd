"""Samples -> batches: a stack of fixed-length blocks, or padding to the longest sample.

Packed pretraining and packed SFT rows are all `seq_len` long and stack as they are;
unpacked SFT conversations differ in length and are right-padded per micro-batch.
"""

from __future__ import annotations

import torch

from ..loss import IGNORE_INDEX


def collate_blocks(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Blocks are all seq_len long, so a batch is a stack: dict of (B, T) LongTensors."""
    return {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}


class PaddingCollator:
    """Samples -> {"input_ids", "labels"} (B, T), right-padded to the longest, rounded up.

    No attention mask: attention is causal and the padding comes after the real tokens, so no real
    token ever sees it, and its labels are -100. Rounding T up to a multiple of 8 keeps matmul
    shapes friendly and limits the number of distinct shapes (`torch.compile` recompiles per shape).
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8):
        if pad_id is None:
            raise ValueError("PaddingCollator needs a pad id (tokenizer.pad_id is EOS when there is no pad piece)")
        self.pad_id = pad_id
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    def __call__(self, samples: list[dict]) -> dict:
        longest = max(len(s["input_ids"]) for s in samples)
        T = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(samples), T), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels}
