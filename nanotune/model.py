"""The whole LLaMA model in one file: config, RMSNorm, rotary embedding, attention, MLP, block, model.

Module and parameter names follow the HuggingFace LLaMA layout (`model.embed_tokens`,
`model.layers.0.self_attn.q_proj`, `model.norm`, `lm_head`), so a HF checkpoint's state dict loads
with no renaming table and adapters trained here load in PEFT and back.

Three things this file does that a first LLaMA implementation usually does not:

* Packed sequences. `document_ids` (B, T) marks which document each token belongs to; attention is
  then block-diagonal causal (a token sees only earlier tokens of its own document) and positions
  restart at 0 for each document. The structure is worked out once per forward
  (`AttentionPlan`) and shared by every layer.
* A loss that never builds the (B, T, V) logits. With `labels`, `forward` returns the *sum* of the
  token cross-entropies, computed chunk by chunk (`linear_cross_entropy_sum`). The caller divides
  by the number of target tokens of the whole global batch.
* A pre-allocated KV cache (`KVCache`) for generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # the label of a position that carries no loss (PyTorch's and HF's convention)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class LlamaConfig:
    """The shape of a LLaMA model, with HF `config.json` field names.

    `rope_scaling` is None or a dict with `rope_type` in {"linear", "dynamic", "llama3"} and its
    parameters (`factor`; for llama3 also `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`). transformers 5 calls the same thing `rope_parameters`
    (with `rope_theta` inside); `from_hf_dict` reads both spellings.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (no GQA)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Keys of config.json that we do not model but must give back unchanged on save.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; give head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            scaling["rope_type"] = rope_type
            scaling.pop("type", None)
            scaling.pop("rope_theta", None)
            if rope_type == "default":
                self.rope_scaling = None
            elif rope_type in ("linear", "dynamic", "llama3"):
                if "factor" not in scaling:
                    raise ValueError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
                if rope_type == "llama3":
                    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                        if key not in scaling:
                            raise ValueError(f"rope_scaling of type 'llama3' needs {key!r}")
                self.rope_scaling = scaling
            else:
                raise ValueError(
                    f"unsupported rope_scaling type {rope_type!r}: expected none, linear, dynamic or llama3"
                )

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "LlamaConfig":
        """Build from the dict of a HF `config.json` (transformers 4.x or 5.x spelling)."""
        hf = dict(hf)
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral", None):
            raise ValueError(f"config.json has model_type {model_type!r}; nanotune reads LLaMA models")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"config.json has hidden_act {act!r}; LLaMA uses silu")
        rope = hf.pop("rope_parameters", None)
        if rope and "rope_theta" in rope:
            hf.setdefault("rope_theta", rope["rope_theta"])
        if rope and rope.get("rope_type", "default") != "default":
            hf.setdefault("rope_scaling", rope)
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in hf.items() if k in known}
        extra = {k: v for k, v in hf.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def to_hf_dict(self) -> dict:
        """The dict to write as `config.json`; transformers 4.x and 5.x both load it."""
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        out.pop("rope_parameters", None)
        out["model_type"] = "llama"
        out["architectures"] = ["LlamaForCausalLM"]
        out["hidden_act"] = "silu"
        out.setdefault("attention_dropout", 0.0)
        out.setdefault("pretraining_tp", 1)
        return out

    @property
    def n_params(self) -> int:
        """Parameter count, computed from the shape alone (no model needed)."""
        C, V, L = self.hidden_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = C * q + 2 * C * kv + q * C
        mlp = 3 * C * self.intermediate_size
        head = 0 if self.tie_word_embeddings else V * C
        return V * C + L * (attn + mlp + 2 * C) + C + head


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as HF does, so bf16 runs match)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)


def rope_inverse_frequencies(config: LlamaConfig, seq_len: int) -> torch.Tensor:
    """The rotation speed of each pair of head dimensions, (D/2,), for each `rope_scaling` type.

    * none: theta^(-2i/D), the original RoPE.
    * linear: every frequency divided by `factor` (positions squeezed `factor` times).
    * dynamic (NTK-aware): when the sequence is longer than `max_position_embeddings`, the base is
      raised so the lowest frequency still fits; shorter sequences use the original frequencies.
      The choice is made from `seq_len` (the largest position + 1) on every forward, statelessly.
    * llama3: low frequencies divided by `factor`, high ones kept, a smooth ramp in between.
    Computed in float32 on the CPU, exactly as transformers does, so logits match to the last bits.
    """
    D = config.head_dim
    base = config.rope_theta
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "dynamic" and seq_len > config.max_position_embeddings:
        factor = scaling["factor"]
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (D / (D - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))  # (D/2,)
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rotary_cos_sin(config: LlamaConfig, position_ids: torch.Tensor, dtype: torch.dtype, seq_len: int):
    """cos and sin of every position's rotation angles, each (B, T, D), shared by all layers."""
    inv_freq = rope_inverse_frequencies(config, seq_len).to(position_ids.device)
    angles = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, D): HF's rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles of its positions; the rotate-half convention of HF.

    The two halves of the head dimension form the (real, imaginary) pairs: dimension i pairs with
    i + D/2 (Meta's original code interleaves them instead; HF checkpoints permute q/k weights so
    that rotate-half gives the same result).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------
# Attention: how tokens may see each other, decided once per forward
# ----------------------------------------------------------------------------------------------


@dataclass
class AttentionPlan:
    """Which tokens each token attends to, worked out once per forward and used by every layer.

    kind:
      "causal"  every row is one causal sequence: SDPA with `is_causal=True`, no mask tensor.
      "spans"   packed rows on the CPU: SDPA with `is_causal=True` on each document span alone.
                Measured on 2 CPU cores, 1024 tokens in 8 documents: 0.27x the time of causal
                attention over the whole row, versus 0.9x for a dense block-diagonal mask,
                because the work between documents is never done.
      "mask"    a boolean mask (B, 1, T, S): True where attention is allowed (KV cache with
                padding, or packed rows when spans are not wanted).
      "flex"    packed rows on CUDA: `flex_attention` with a block mask that skips whole tiles
                between documents.

    "auto" picks flex on CUDA and spans on the CPU, except when the blocks are compiled
    (`train.compile`): the span boundaries are Python integers, which `torch.compile` bakes into
    the graph as constants, so every new packing would recompile the block. A mask is a tensor
    of a fixed shape instead, and one compiled graph serves every batch.
    """

    kind: str
    spans: list[list[tuple[int, int]]] | None = None  # per row: (start, end) of each document
    mask: torch.Tensor | None = None  # (B, 1, T, S) bool
    block_mask: Any = None


def document_spans(document_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Runs of equal document id per row: [[(0, 5), (5, 12), ...], ...]. One host copy per forward."""
    ids = document_ids.cpu()
    B, T = ids.shape
    change = torch.ones(B, T, dtype=torch.bool)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]
    spans = []
    for row in change:
        starts = row.nonzero().flatten().tolist()
        ends = starts[1:] + [T]
        spans.append(list(zip(starts, ends)))
    return spans


def block_diagonal_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: token t may see token s iff s <= t and both belong to the same document."""
    T = document_ids.shape[1]
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return (same_document & causal).unsqueeze(1)


def make_attention_plan(
    document_ids: torch.Tensor | None,
    kv_cache: "KVCache | None",
    T: int,
    packed_attention: str,
    blocks_compiled: bool = False,
) -> AttentionPlan:
    if kv_cache is not None:
        return kv_cache.attention_plan(T)
    if document_ids is None:
        return AttentionPlan("causal")
    if packed_attention == "auto":
        if document_ids.is_cuda and _flex_available():
            packed_attention = "flex"
        else:
            packed_attention = "mask" if blocks_compiled else "spans"  # see AttentionPlan
    if packed_attention == "spans":
        return AttentionPlan("spans", spans=document_spans(document_ids))
    if packed_attention == "mask":
        return AttentionPlan("mask", mask=block_diagonal_causal_mask(document_ids))
    if packed_attention == "flex":
        return AttentionPlan("flex", block_mask=_flex_block_mask(document_ids))
    raise ValueError(f"packed_attention must be auto, spans, mask or flex, not {packed_attention!r}")


def _flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex_block_mask(document_ids: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (kv_idx <= q_idx)

    B, T = document_ids.shape
    return create_block_mask(same_document_causal, B, None, T, T, device=document_ids.device)


_compiled_flex_attention = None


def _flex_attention(q, k, v, block_mask):
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex_attention is None:
        # flex_attention is only fast compiled; compile it once for the process.
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, D) over k, v (B, H_kv, S, D) under `plan`."""
    gqa = k.shape[1] != q.shape[1]
    if plan.kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    if plan.kind == "mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, enable_gqa=gqa)
    if plan.kind == "spans":
        return attend_per_document(q, k, v, plan.spans, gqa)
    if plan.kind == "flex":
        return _flex_attention(q, k, v, plan.block_mask)
    raise ValueError(f"unknown attention plan {plan.kind!r}")


def attend_per_document(q, k, v, spans: list[list[tuple[int, int]]], gqa: bool) -> torch.Tensor:
    """Causal SDPA run on each document span of each row alone: q (B, H, T, D) -> (B, H, T, D).

    The rows are taken apart with `unbind` and the documents with `split`, not by indexing
    (q[b:b+1, :, s:e]): the backward of an index is a zero-filled tensor of q's full size per
    piece, summed into q's gradient, which for 4 rows of 8 documents cost more than the attention
    itself; the backward of split and unbind is one concatenation.
    """
    rows = []
    for q_row, k_row, v_row, row_spans in zip(q.unbind(0), k.unbind(0), v.unbind(0), spans):  # (H, T, D) each
        lengths = [end - start for start, end in row_spans]
        pieces = [
            F.scaled_dot_product_attention(q_doc[None], k_doc[None], v_doc[None], is_causal=True, enable_gqa=gqa)[0]
            for q_doc, k_doc, v_doc in zip(q_row.split(lengths, 1), k_row.split(lengths, 1), v_row.split(lengths, 1))
        ]  # (H, T_d, D) each
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.stack(rows)


class KVCache:
    """Pre-allocated keys and values of every layer, for generation without recomputing the prefix.

    Buffers are (B, H_kv, max_len, D) per layer, allocated once; a forward of T new tokens writes
    positions [length, length + T) and attends over [0, length + T). `key_padding` (B, max_len)
    marks real tokens, so left-padded batches never attend to the padding.
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

    def attention_plan(self, T: int) -> AttentionPlan:
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; asked for {self.length + T}")
        self._pending = T
        S = self.length + T
        has_padding = not bool(self.key_is_real[:, :S].all())
        if self.length == 0 and not has_padding:
            return AttentionPlan("causal")
        if T == 1 and not has_padding:
            return AttentionPlan("mask", mask=None)  # one new token sees everything stored
        device = self.key_is_real.device
        query_position = torch.arange(self.length, S, device=device)[:, None]  # (T, 1)
        key_position = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = (key_position <= query_position)[None] & self.key_is_real[:, None, :S]  # (B, T, S)
        # A padded query row would see nothing and give NaN; let it see itself (its output is unused).
        allowed = allowed | (key_position == query_position)[None]
        return AttentionPlan("mask", mask=allowed.unsqueeze(1))

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


class Attention(nn.Module):
    """Grouped-query attention: H query heads share H_kv key/value heads (H_kv = H is plain MHA)."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        C, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(C, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, C, bias=bias)

    def forward(self, x, cos, sin, plan: AttentionPlan, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, H_kv, S, D), S = cached + T
        y = attend(q, k, v, plan)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, I, bias=bias)
        self.up_proj = nn.Linear(C, I, bias=bias)
        self.down_proj = nn.Linear(I, C, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One transformer layer: x + attn(norm(x)), then x + mlp(norm(x)).

    `checkpoint_activations` (set by `train.apply_activation_checkpointing`) drops this block's
    activations in the forward and recomputes them in the backward: about one extra forward of
    compute for memory that no longer grows with the number of layers.
    """

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.checkpoint_activations = False

    def forward(self, x, cos, sin, plan: AttentionPlan, kv_cache: KVCache | None = None):
        if self.checkpoint_activations and torch.is_grad_enabled() and kv_cache is None:
            return checkpoint(self._forward, x, cos, sin, plan, None, use_reentrant=False)
        return self._forward(x, cos, sin, plan, kv_cache)

    def _forward(self, x, cos, sin, plan, kv_cache):
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


# ----------------------------------------------------------------------------------------------
# The loss without (B, T, V) logits
# ----------------------------------------------------------------------------------------------


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_t CE(hidden_t @ weight.T, label_t) over chunks of tokens, gradients made in the forward.

    For each chunk: logits (n, V) in fp32, log-sum-exp, target logit; if gradients are wanted, the
    softmax minus the one-hot target is turned at once into the gradients of hidden and weight
    (the two matmuls the backward would have done), and the chunk's logits are dropped. Peak extra
    memory is one chunk of logits instead of all (B, T, V) of them in fp32, and nothing is
    recomputed. backward only scales the stored gradients by the incoming scalar.

    Passes over the (n, V) chunk are what cost here besides the three matmuls, so they are
    counted: max, subtract in place, exp in place, sum, scale in place (five), where
    `torch.logsumexp` followed by a softmax took eight and two allocations of (n, V). On 2 CPU
    cores chunks of 1024 and 4096 tokens ran at the same speed and 256 or 512 a few percent slower
    (more accumulations into the (V, C) weight gradient); 1024 tokens is 131 MB of fp32 logits at
    V = 32000. Measured with `benchmarks/train_step.py --loss-chunk-tokens N`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, grad_enabled, workspace):
        # hidden (N, C), weight (V, C), labels (N,); workspace None or (>= min(N, chunk_size), V) fp32
        need_hidden_grad = grad_enabled and hidden.requires_grad
        need_weight_grad = grad_enabled and weight.requires_grad
        N = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = None  # (V, C) fp32; the first chunk's matmul creates it (no 65 MB zero fill)
        for start in range(0, N, chunk_size):
            h = hidden[start : start + chunk_size]  # (n, C)
            y = labels[start : start + chunk_size]  # (n,)
            is_target = y != IGNORE_INDEX  # (n,)
            safe_y = y.clamp(min=0)
            if workspace is None:
                logits = (h @ weight.t()).float()  # (n, V)
            elif h.dtype == torch.float32:
                logits = torch.mm(h, weight.t(), out=workspace[: len(h)])  # (n, V)
            else:
                logits = workspace[: len(h)].copy_(h @ weight.t())  # (n, V)
            target_logit = logits.gather(1, safe_y[:, None]).squeeze(1)  # (n,), before logits are overwritten
            row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            exp = logits.sub_(row_max).exp_()  # (n, V), in place: the softmax numerators
            row_sum = exp.sum(dim=-1)  # (n,)
            log_normaliser = row_max.squeeze(1) + row_sum.log()  # (n,) = logsumexp of the logits
            total += ((log_normaliser - target_logit) * is_target).sum()
            if not (need_hidden_grad or need_weight_grad):
                continue
            # d loss / d logits = softmax - one_hot(target); rows without a target get zero.
            d_logits = exp.mul_((is_target / row_sum)[:, None])  # (n, V) softmax, 0 on ignored rows
            d_logits[torch.arange(len(y), device=y.device), safe_y] -= is_target.to(d_logits.dtype)
            d_logits = d_logits.to(h.dtype)
            if need_hidden_grad:
                torch.mm(d_logits, weight, out=grad_hidden[start : start + chunk_size])  # (n, C)
            if need_weight_grad:
                grad_weight = _accumulate_weight_grad(grad_weight, d_logits, h)  # (V, C)
        if need_weight_grad and grad_weight is None:  # no token at all
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        # Kept on ctx (not save_for_backward) so that backward may scale them in place.
        ctx.grads = (grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy_sum: backward may run only once (retain_graph is not supported)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # scaled in place below: a second backward would scale them twice
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _accumulate_weight_grad(grad_weight, d_logits, h):
    """grad_weight (V, C) fp32 += d_logits.T @ h; in fp32 the sum happens inside the matmul (addmm_),
    which saves writing and re-reading a (V, C) temporary per chunk."""
    if grad_weight is None:
        return (d_logits.t() @ h).float()
    if d_logits.dtype == grad_weight.dtype:
        return grad_weight.addmm_(d_logits.t(), h)
    return grad_weight.add_((d_logits.t() @ h).float())


def target_rows_only(hidden: torch.Tensor, labels: torch.Tensor):
    """hidden (N, C), labels (N,) -> only the rows that have a target.

    An SFT batch trains only the replies: the prompt and the padding (often half the tokens or
    more) carry label -100 and need no lm_head row, which is the largest matmul of a small model.
    Dropping them first makes the loss cost scale with target tokens, not tokens. Selecting rows
    needs their count on the host: free on the CPU, a device sync on CUDA, so the caller uses this
    on the CPU only. The gradient of the dropped rows is zero (autograd's index_select backward).
    """
    is_target = labels != IGNORE_INDEX  # (N,)
    keep = is_target.nonzero().squeeze(1)  # (n,)
    if len(keep) == len(labels):
        return hidden, labels
    return hidden.index_select(0, keep), labels.index_select(0, keep)


def linear_cross_entropy_sum(hidden, weight, labels, chunk_size: int = 1024, workspace=None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `labels` (-100 = ignored), chunked.

    `workspace`: None, or a fp32 tensor of at least (min(N, chunk_size), V) to hold each chunk's
    logits (see `Llama.logits_workspace`); nothing in it outlives the call.
    """
    C = hidden.shape[-1]
    hidden, labels = hidden.reshape(-1, C), labels.reshape(-1)  # (N, C), (N,)
    if hidden.device.type == "cpu":
        hidden, labels = target_rows_only(hidden, labels)
    # Inside an autograd.Function's forward grad mode is always off: decide here whether to make grads.
    grad_enabled = torch.is_grad_enabled()
    return _LinearCrossEntropySum.apply(hidden, weight, labels, chunk_size, grad_enabled, workspace)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class Llama(nn.Module):
    """LLaMA with HF parameter names. `forward` returns logits, or the summed loss given labels.

    Options set as attributes, read by `forward`:
      packed_attention  "auto" (flex on CUDA, per-document spans on the CPU), "spans", "mask", "flex"
      blocks_compiled   set by `train.apply_block_options` when the blocks are torch.compiled:
                        "auto" then uses a mask, not spans, on the CPU (see AttentionPlan)
      loss_chunk_tokens tokens per chunk of the fused lm_head + cross-entropy
      neftune_alpha     NEFTune: uniform noise of size alpha / sqrt(T * C) added to the input
                        embeddings in training mode (0 = off). Helps SFT generalise.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.packed_attention = "auto"
        self.blocks_compiled = False
        self.loss_chunk_tokens = 1024
        self._logits_workspace: torch.Tensor | None = None  # see logits_workspace
        self.neftune_alpha = 0.0

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

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or with labels (B, T) the summed token loss ().

        `labels[t]` is the target of position t, already shifted (the token that follows t, or -100).
        `document_ids` (B, T): packed documents; attention stays within a document, and positions
        restart at 0 per document unless `position_ids` is given.
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = self._default_positions(B, T, document_ids, kv_cache, input_ids.device)
        plan = make_attention_plan(document_ids, kv_cache, T, self.packed_attention, self.blocks_compiled)

        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if self.training and self.neftune_alpha > 0:
            scale = self.neftune_alpha / math.sqrt(T * x.shape[-1])
            x = x + torch.empty_like(x).uniform_(-scale, scale)
        seq_len = T if kv_cache is None else kv_cache.length + T
        if (self.config.rope_scaling or {}).get("rope_type") == "dynamic":
            seq_len = int(position_ids.max()) + 1  # dynamic NTK depends on the longest position
        cos, sin = rotary_cos_sin(self.config, position_ids, x.dtype, seq_len)  # (B, T, D) each
        for block in self.model.layers:
            x = block(x, cos, sin, plan, kv_cache)
        x = self.model.norm(x)
        if kv_cache is not None:
            kv_cache.advance()

        if labels is None:
            return self.lm_head(x)  # (B, T, V)
        chunk = self.loss_chunk_tokens
        workspace = self.logits_workspace(min(chunk, B * T), x.device)
        return linear_cross_entropy_sum(x, self.lm_head.weight, labels, chunk, workspace)

    def logits_workspace(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """A (rows, V) fp32 buffer for the loss's chunk of logits, kept from one step to the next.

        What it saves is the operating system's work: a fresh (1024, 32000) fp32 tensor is a
        fresh 131 MB mmap, and every page of it faults and is zeroed on first touch, ~80 ms per
        step of the issue's shape on 2 CPU cores (about 4% of the step). One buffer pays that
        once. CPU only: CUDA's caching allocator already reuses freed memory. The buffer is a
        plain attribute, not a registered buffer: never saved, never moved by `.to()`.
        """
        if device.type != "cpu":
            return None
        vocab_size = self.lm_head.weight.shape[0]  # the head's rows: right after a vocabulary resize too
        old = self._logits_workspace
        if old is None or old.shape[0] < rows or old.shape[1] != vocab_size:
            self._logits_workspace = old = None  # free the old buffer before allocating the new one
            self._logits_workspace = torch.empty(rows, vocab_size, dtype=torch.float32)
        return self._logits_workspace

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
