"""The KV cache of generation: keys and values of every layer, pre-allocated once, so that each
new token runs alone through the model (T = 1) and attends to everything before it."""

from __future__ import annotations

import torch

from .attention_plan import AttentionPlan, causal_window
from .model_config import LlamaConfig


class KVCache:
    """Pre-allocated keys and values of every layer, for generation without recomputing the prefix.

    Buffers are (B, H_kv, max_len, D) per layer, allocated once; a forward of T new tokens writes
    positions [length, length + T) and attends over [0, length + T). `key_is_real` (B, max_len):
    left-padded batches never attend to the padding.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.key_is_real = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # tokens already stored
        self._pending = 0  # tokens of the forward in progress

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Mark padded positions of the prompt (attention_mask (B, T_prompt): 1 real, 0 pad)."""
        self.key_is_real[:, : attention_mask.shape[1]] = attention_mask.bool()

    def attention_plan(self, T: int, window: int | None = None) -> AttentionPlan:
        """The plan of T new tokens over the cache; a sliding window counts cache slots, which
        left padding does not break (a row's real tokens are consecutive slots)."""
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; asked for {self.length + T}")
        self._pending = T
        S = self.length + T
        has_padding = not bool(self.key_is_real[:, :S].all())
        if not has_padding and (window is None or S <= window):
            if self.length == 0:
                return AttentionPlan("causal")
            if T == 1:
                return AttentionPlan("mask", mask=None)  # one new token sees everything stored
        device = self.key_is_real.device
        query_position = torch.arange(self.length, S, device=device)[:, None]  # (T, 1)
        key_position = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = causal_window(query_position, key_position, window)[None] & self.key_is_real[:, None, :S]  # (B, T, S)
        # A padded query row would see nothing and give NaN; let it see itself (its output is unused).
        allowed = allowed | (key_position == query_position)[None]
        return AttentionPlan("mask", mask=allowed.unsqueeze(1))

    def select_rows(self, rows: torch.Tensor, max_len: int | None = None) -> KVCache:
        """A new cache holding rows `rows` (index (B_new,)) of this one, with room for `max_len`
        tokens (default: this cache's). Generation uses it twice: a prompt sampled G times is
        prefilled once and its row copied G times, and rows that have finished are dropped so that
        later steps compute only the rows still going."""
        max_len = self.max_len if max_len is None else max_len
        if max_len < self.length:
            raise ValueError(f"a cache of {max_len} tokens cannot hold the {self.length} stored")
        n = self.length

        def gathered(buffer):  # (B, H_kv, max_len, D) -> (B_new, H_kv, new max_len, D), the stored n copied
            out = buffer.new_zeros(len(rows), buffer.shape[1], max_len, buffer.shape[3])
            out[:, :, :n] = buffer[rows, :, :n]
            return out

        new = KVCache.__new__(KVCache)  # every field set below; no config needed to copy one
        new.keys, new.values = [gathered(k) for k in self.keys], [gathered(v) for v in self.values]
        new.key_is_real = self.key_is_real.new_ones(len(rows), max_len)  # (B_new, max_len)
        new.key_is_real[:, : min(max_len, self.max_len)] = self.key_is_real[rows, :max_len]
        new.max_len, new.length, new._pending = max_len, n, 0
        return new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this forward's k, v (B, H_kv, T, D) for `layer`; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self) -> None:
        """Called once the forward has run through every layer."""
        self.length += self._pending
        self._pending = 0
