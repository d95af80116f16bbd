"""The whole LLaMA model in one file: RMSNorm, attention, MLP, block, model (RoPE: rope.py; which
tokens see which: attention_plan.py; the KV cache of generation: kv_cache.py).

Module and parameter names follow the HuggingFace LLaMA layout (`model.embed_tokens`,
`model.layers.0.self_attn.q_proj`, `model.norm`, `lm_head`), so a HF checkpoint's state dict loads
with no renaming table and adapters trained here load in PEFT and back. The LLaMA-like families
(Mistral, Qwen2, Qwen3) are switches of the config read here (model_config.FAMILIES): q/k/v bias,
q/k norms, and a sliding window per layer that every attention path honours.

Three things this file does that a first LLaMA implementation usually does not:

* Packed sequences. `document_ids` (B, T) marks which document each token belongs to; attention is
  block-diagonal causal and positions restart at 0 per document, worked out once per forward
  (`AttentionPlan` in attention_plan.py, one per distinct sliding window) and shared by the layers.
* A loss that never builds the (B, T, V) logits. With `labels`, `forward` returns the *sum* of the
  token cross-entropies, chunk by chunk (loss.py); the caller divides by the global target count.
  `hidden_states` stops before the lm_head, for objectives that call loss.py themselves.
* A pre-allocated KV cache (`KVCache`, kv_cache.py) for generation.

What is applied *to* the model lives outside it: NEFTune noise (neftune.py, a forward hook),
activation checkpointing (activation_checkpointing.py), torch.compile and FSDP.

Shapes: B batch, T time (tokens of this forward), C hidden size (channels), V vocabulary,
  H query heads, H_kv key/value heads, D head dim, S keys attended to (cached + new tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .loss import IGNORE_INDEX, LogitsWorkspace, linear_cross_entropy_sum  # noqa: F401 (IGNORE_INDEX re-exported)
from .attention_plan import (  # noqa: F401 (re-exported: make_attention_plan, block_diagonal_causal_mask)
    AttentionPlan, attend, block_diagonal_causal_mask, make_attention_plan, resolve_packed_attention)
from .kv_cache import KVCache  # noqa: F401 (re-exported)
from .model_config import LlamaConfig
from .rms_norm import rms_norm, rms_norm_reference
from .swiglu import swiglu_mlp
from .rope import apply_rotary, rope_inverse_frequencies, rotary_cos_sin  # noqa: F401 (re-exported)


# ---- Building blocks --------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as HF does, so bf16 runs match). With
    gradients on, `rms_norm` (rms_norm.py) keeps only the input for the backward."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query attention: H query heads share H_kv key/value heads (H_kv = H is plain MHA)."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        C, D, qkv_bias = config.hidden_size, config.head_dim, config.qkv_bias
        self.q_proj = nn.Linear(C, self.n_heads * D, bias=qkv_bias)
        self.k_proj = nn.Linear(C, self.n_kv_heads * D, bias=qkv_bias)
        self.v_proj = nn.Linear(C, self.n_kv_heads * D, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * D, C, bias=config.attention_bias)
        self.qk_norm = config.family.qk_norm  # Qwen3: each head's q and k normed over D, before RoPE
        if self.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(D, config.rms_norm_eps), RMSNorm(D, config.rms_norm_eps)

    def forward(self, x, cos, sin, plan: AttentionPlan, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, H_kv, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, H_kv, S, D), S = cached + T
        y = attend(q, k, v, plan)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Training with plain bias-free projections goes through
    `swiglu_mlp`, which saves less for the backward (swiglu.py); anything else runs the expression."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, I, bias=bias)
        self.up_proj = nn.Linear(C, I, bias=bias)
        self.down_proj = nn.Linear(I, C, bias=bias)

    def forward(self, x):
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if torch.is_grad_enabled() and all(type(p) is nn.Linear and p.bias is None for p in projections):
            return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One transformer layer: x + attn(norm(x)), then x + mlp(norm(x)). Activation checkpointing
    and torch.compile are applied to blocks from outside (activation_checkpointing.py)."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, plan: AttentionPlan, kv_cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, kv_cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class LlamaBody(nn.Module):
    """The `model.` prefix of HF names: embeddings, the layers and the final norm."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---- The model --------------------------------------------------------------------------------


class Llama(nn.Module):
    """LLaMA (and its families) with HF parameter names. `forward` returns logits, or the summed loss
    given labels.

    Options (how it computes, never what) are constructor arguments, fixed for the model's life,
    so `forward` reads nothing that another file assigned:
      packed_attention   "auto" (flex on CUDA, spans on the CPU), "spans", "mask" or "flex": how
                         packed rows attend (AttentionPlan; compiled blocks: resolve_packed_attention).
      loss_chunk_tokens  tokens per chunk of the fused lm_head + cross-entropy (loss.py).
    """

    def __init__(self, config: LlamaConfig, packed_attention: str = "auto", loss_chunk_tokens: int = 512):
        super().__init__()
        if packed_attention not in ("auto", "spans", "mask", "flex"):
            raise ValueError(f"packed_attention must be auto, spans, mask or flex, not {packed_attention!r}")
        self.config = config
        self.packed_attention = packed_attention
        self.loss_chunk_tokens = loss_chunk_tokens
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.logits_workspace = LogitsWorkspace()  # the loss's CPU buffer, reused from step to step

    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, ones for norms (HF's init)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                weight = torch.empty(module.weight.shape).normal_(0.0, std, generator=generator)
                with torch.no_grad():
                    module.weight.copy_(weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids, position_ids=None, document_ids=None, labels=None, kv_cache=None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or with labels (B, T) the summed token loss ().

        `labels[t]` is the target of position t, already shifted (the token that follows t, or -100).
        `document_ids` (B, T): packed documents; attention stays within a document, and positions
        restart at 0 per document unless `position_ids` is given.
        """
        x = self.hidden_states(input_ids, position_ids, document_ids, kv_cache)  # (B, T, C)
        if labels is None:
            return self.lm_head(x)  # (B, T, V)
        return linear_cross_entropy_sum(x, self.lm_head.weight, labels, self.loss_chunk_tokens, self.logits_workspace)

    def hidden_states(self, input_ids, position_ids=None, document_ids=None, kv_cache=None,
                      attention_mask=None) -> torch.Tensor:
        """input_ids (B, T) -> the final normed hidden states (B, T, C): `forward` without the lm_head,
        for objectives that call loss.py with `self.lm_head.weight` themselves (per-sequence
        log-probs). Under FSDP2, register it with `register_fsdp_forward_method` like a forward.
        `attention_mask` (B, 1, T, T) bool, True = may attend: any other pattern (a prompt shared by
        two replies), used as it is; give `position_ids` with it."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = self._default_positions(B, T, document_ids, kv_cache, input_ids.device)
        windows = self.config.layer_windows  # one plan per distinct sliding window (None: full)
        if attention_mask is not None:  # a given pattern, narrowed to each window by position
            distance = position_ids[:, None, :, None] - position_ids[:, None, None, :]  # (B, 1, T, T)
            plans = {w: AttentionPlan("mask", mask=attention_mask if w is None else attention_mask & (distance < w))
                     for w in set(windows)}
        else:
            plans = {w: make_attention_plan(document_ids, kv_cache, T, self.packed_attention, w, input_ids.device)
                     for w in set(windows)}

        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        seq_len = T if kv_cache is None else kv_cache.length + T
        if (self.config.rope_scaling or {}).get("rope_type") == "dynamic":
            seq_len = int(position_ids.max()) + 1  # dynamic NTK depends on the longest position
        cos, sin = rotary_cos_sin(self.config, position_ids, x.dtype, seq_len)  # (B, T, D) each
        for block, window in zip(self.model.layers, windows):
            x = block(x, cos, sin, plans[window], kv_cache)
        x = self.model.norm(x)
        if kv_cache is not None:
            kv_cache.advance()
        return x

    @staticmethod
    def _default_positions(B, T, document_ids, kv_cache, device):
        if kv_cache is not None:
            return torch.arange(kv_cache.length, kv_cache.length + T, device=device).expand(B, T)
        if document_ids is None:
            return torch.arange(T, device=device).expand(B, T)
        return positions_from_document_ids(document_ids)


def positions_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Position of every token within its document run: [7,7,7,9,9] -> [0,1,2,0,1]. (B, T)."""
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    is_start = torch.ones_like(document_ids, dtype=torch.bool)
    is_start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    run_start = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - run_start
