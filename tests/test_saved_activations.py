"""The SwiGLU and RMSNorm backwards that keep fewer activations (swiglu.py, rms_norm.py) and RoPE's
in fewer passes (rope.py): the same values and gradients as autograd through the plain
expressions, with less saved for the backward (RoPE: no more than cos and sin)."""

import pytest
import torch

from nanotune.rope import apply_rotary, apply_rotary_reference
from nanotune.rms_norm import rms_norm, rms_norm_reference
from nanotune.swiglu import swiglu_mlp, swiglu_reference


def saved_bytes(function, *inputs) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of function(*inputs), inputs excluded."""
    storages = {}
    own = {t.untyped_storage().data_ptr() for t in inputs}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in own:
            storages[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(*inputs)
    return sum(storages.values())


def leaves(*shapes, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_()
            for shape, scale in shapes]


def gradients(function, inputs, upstream):
    for tensor in inputs:
        tensor.grad = None
    output = function(*inputs)
    output.backward(upstream)
    return output.detach(), [tensor.grad.clone() for tensor in inputs]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_swiglu_equals_the_plain_expression_and_saves_less(dtype, tolerance):
    x, gate, up, down = leaves(((2, 9, 16), 1.0), ((40, 16), 0.3), ((40, 16), 0.3), ((16, 40), 0.3), dtype=dtype, seed=0)
    upstream = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours, ours_grads = gradients(swiglu_mlp, [x, gate, up, down], upstream)
    reference, reference_grads = gradients(swiglu_reference, [x, gate, up, down], upstream)
    torch.testing.assert_close(ours, reference, atol=tolerance, rtol=tolerance)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)
    # Autograd keeps g, silu(g), u and their product (4 x N x I); swiglu_mlp keeps g and u.
    element = x.element_size()
    assert saved_bytes(swiglu_reference, x, gate, up, down) == 4 * 18 * 40 * element
    assert saved_bytes(swiglu_mlp, x, gate, up, down) == 2 * 18 * 40 * element


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_equals_the_plain_expression_and_saves_less(dtype, tolerance):
    x, weight = leaves(((3, 7, 32), 2.0), ((32,), 1.0), dtype=dtype, seed=2)
    upstream = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    ours, ours_grads = gradients(lambda a, w: rms_norm(a, w, 1e-5), [x, weight], upstream)
    reference, reference_grads = gradients(lambda a, w: rms_norm_reference(a, w, 1e-5), [x, weight], upstream)
    torch.testing.assert_close(ours, reference, atol=tolerance, rtol=tolerance)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)
    # rms_norm keeps one number per row besides its input; autograd at least one more (N, C) tensor.
    ours_saved = saved_bytes(lambda a, w: rms_norm(a, w, 1e-5), x, weight)
    assert ours_saved == 21 * 4  # the fp32 1/rms of each of the 21 rows
    assert saved_bytes(lambda a, w: rms_norm_reference(a, w, 1e-5), x, weight) >= ours_saved + 21 * 32 * x.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_the_plain_expression_bit_for_bit_and_saves_only_cos_and_sin(dtype):
    """On q as the model hands it over: a (B, T, H, D) projection seen as (B, H, T, D), not contiguous."""
    projection, angles = leaves(((2, 5, 3 * 8), 1.0), ((2, 5, 4), 3.0), dtype=dtype, seed=4)
    angles = torch.cat((angles, angles), -1).detach()  # (B, T, D), rotate-half layout as rotary_cos_sin gives
    cos, sin = angles.cos(), angles.sin()
    upstream = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(5)).to(dtype)

    def rotated(function):
        return lambda p: function(p.view(2, 5, 3, 8).transpose(1, 2), cos, sin)

    ours, (ours_grad,) = gradients(rotated(apply_rotary), [projection], upstream)
    reference, (reference_grad,) = gradients(rotated(apply_rotary_reference), [projection], upstream)
    assert torch.equal(ours, reference) and torch.equal(ours_grad, reference_grad)
    assert saved_bytes(rotated(apply_rotary), projection) == 2 * cos.untyped_storage().nbytes()


def test_the_model_takes_the_fast_paths_only_where_they_equal_the_plain_ones():
    from helpers import tiny_model

    from nanotune import swiglu

    calls = []
    real = swiglu._SwiGLU.apply
    swiglu._SwiGLU.apply = lambda *args: calls.append(1) or real(*args)
    try:
        model = tiny_model(seed=0)
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids)  # training: the fast path, once per layer
        assert len(calls) == model.config.num_hidden_layers
        with torch.no_grad():
            model(ids)  # inference: the plain expression
        assert len(calls) == model.config.num_hidden_layers
        biased = tiny_model(seed=0, mlp_bias=True)
        biased(ids, labels=ids)  # bias on the projections: the plain expression
        assert len(calls) == model.config.num_hidden_layers
    finally:
        swiglu._SwiGLU.apply = real
