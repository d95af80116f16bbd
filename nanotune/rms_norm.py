"""RMSNorm, weight * x / rms(x), with a backward that keeps the input alone.

Autograd keeps, per norm, the fp32 input and the normalised x (and the weight's product), two
(N, C) tensors for a computation that one (N, C) tensor and one number per row can redo: the
input x and its 1 / rms. `rms_norm` saves those and recomputes x / rms(x) in the backward, one
elementwise pass. LLaMA has two norms per layer (Qwen3 two more: q_norm and k_norm over each
head), so the saving counts in every layer.

The arithmetic is transformers' own, in the same order (fp32 inside, cast back before the
weight), so bf16 results match HF's as the plain expression does; `RMSNorm` (model.py) uses the
plain expression without gradients and `rms_norm_reference` is what the tests hold this to.
"""

from __future__ import annotations

import torch


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        # x (..., C), weight (C,)
        x32 = x.float()
        inverse_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        ctx.save_for_backward(x, weight, inverse_rms)
        return weight * (x32 * inverse_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):  # (..., C)
        x, weight, inverse_rms = ctx.saved_tensors
        normalised32 = x.float() * inverse_rms  # (..., C) x / rms(x), recomputed
        normalised = normalised32.to(x.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_y * normalised).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)  # (C,)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d(x * r)/dx with r = rms(x)^-1: r * (g - n * mean(g * n)), g the gradient reaching n = x * r.
            g = (grad_y * weight).float()  # (..., C)
            grad_x = (g - normalised32 * (g * normalised32).mean(-1, keepdim=True)).mul_(inverse_rms).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, for x (..., C) and weight (C,)."""
    return _RMSNorm.apply(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same as transformers writes it, autograd doing the backward."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)
