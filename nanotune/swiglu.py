"""The SwiGLU MLP, down(silu(gate(x)) * up(x)), with a backward that keeps two activations, not five.

Autograd saves what each op needs: gate's and up's input x, gate's output g, silu's output a,
up's output u, and their product h (down's input): four (N, I) tensors per layer besides x, where
I is about 2.7 C in LLaMA, which makes the MLP's the largest activations of a step (README's
performance section has the breakdown). `swiglu_mlp` saves x, g and u only and recomputes
a = silu(g) and h = a * u in the backward: two elementwise passes, no matmul, for half of the
(N, I) memory.

`MLP` (model.py) uses it only where it gives the same result as the plain expression: three plain
`nn.Linear` without bias, gradients on. Everything else (LoRA and QLoRA projections, biases,
inference) runs the plain expression, which stays the reference the tests hold this one to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, down_weight):
        # x (N, C); gate_weight, up_weight (I, C); down_weight (C, I)
        g = x @ gate_weight.t()  # (N, I)
        u = x @ up_weight.t()  # (N, I)
        h = F.silu(g).mul_(u)  # (N, I), freed after the forward
        ctx.save_for_backward(x, g, u, gate_weight, up_weight, down_weight)
        return h @ down_weight.t()  # (N, C)

    @staticmethod
    def backward(ctx, grad_y):  # (N, C)
        x, g, u, gate_weight, up_weight, down_weight = ctx.saved_tensors
        # Each (N, I) result written over a temporary that is no longer needed: a fresh (N, I)
        # tensor costs more than the multiply that fills it (its pages are faulted in first).
        a = F.silu(g)  # (N, I), recomputed
        grad_h = grad_y @ down_weight  # (N, I)
        grad_u = grad_h * a  # (N, I)
        h = a.mul_(u)  # (N, I): silu(g) * u, over a
        grad_down = grad_y.t() @ h if ctx.needs_input_grad[3] else None  # (C, I)
        del a, h
        # d silu(g)/dg, times the gradient reaching silu's output (grad_h * u), in one fused op.
        grad_g = torch.ops.aten.silu_backward.grad_input(grad_h.mul_(u), g, grad_input=grad_h)  # (N, I)
        grad_x = (grad_g @ gate_weight).addmm_(grad_u, up_weight)  # (N, C)
        grad_gate = grad_g.t() @ x if ctx.needs_input_grad[1] else None  # (I, C)
        grad_up = grad_u.t() @ x if ctx.needs_input_grad[2] else None  # (I, C)
        return grad_x, grad_gate, grad_up, grad_down


def swiglu_mlp(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
               down_weight: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for x (..., C) -> (..., C), bias-free weights as nn.Linear holds them."""
    shape = x.shape
    return _SwiGLU.apply(x.reshape(-1, shape[-1]), gate_weight, up_weight, down_weight).view(shape)


def swiglu_reference(x, gate_weight, up_weight, down_weight) -> torch.Tensor:
    """The plain expression, autograd doing the backward: what `swiglu_mlp` must equal."""
    return F.linear(F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight), down_weight)
