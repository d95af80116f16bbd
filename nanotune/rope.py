"""Rotary position embedding (RoPE): the rotation of each position's q and k, with the scalings
`rope_scaling` names (linear, dynamic NTK, llama3), exactly as transformers computes them.

Kept apart from model.py, which re-exports all three functions, so the model file stays the model.
"""

from __future__ import annotations

import math

import torch

from .model_config import LlamaConfig


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

    Dimension i pairs with i + D/2 (Meta's original code interleaves the pairs; HF checkpoints
    permute the q/k weights so that rotate-half gives the same result). Eager, `_Rotary` computes
    `apply_rotary_reference` with fewer passes and temporaries; a compiled block gets the
    expression itself, which the compiler fuses into one kernel.
    """
    if torch.compiler.is_compiling():
        return apply_rotary_reference(x, cos, sin)
    return _Rotary.apply(x, cos, sin)


class _Rotary(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) added into the halves of
    the output (no rotated copy of x), and its backward: the rotation transposed, g * cos +
    cat(g2 * sin2, -g1 * sin1). The rotation is linear in x, so nothing of x is kept.

    Plain multiplies and adds, each rounded once as in the expression, so the result is the
    reference's bit for bit, whatever the row's layout (a fused multiply-add rounds differently
    in a kernel's vector body and its tail, and a token would then depend on its neighbours)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        # x (B, H, T, D); cos, sin (B, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
        half = x.shape[-1] // 2
        out = x * cos  # (B, H, T, D)
        product = torch.mul(x[..., half:], sin[..., :half])  # (B, H, T, D/2)
        out[..., :half] -= product  # x1 cos1 - x2 sin1
        out[..., half:] += torch.mul(x[..., :half], sin[..., half:], out=product)  # x2 cos2 + x1 sin2
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # (B, H, T, D)
        cos, sin = ctx.saved_tensors
        half = grad_out.shape[-1] // 2
        grad_x = grad_out * cos
        product = torch.mul(grad_out[..., half:], sin[..., half:])
        grad_x[..., :half] += product  # x1 reached out2 through sin2
        grad_x[..., half:] -= torch.mul(grad_out[..., :half], sin[..., :half], out=product)  # x2 reached out1 as -x2 sin1
        return grad_x, None, None


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The expression as transformers writes it, autograd doing the backward: what `apply_rotary` must equal."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
