"""QLoRA: LoRA over an NF4 base, from one layer to train_sft.py, FSDP, PEFT and merge.py.

Oracles: LoRA over the dequantised weight (a plain nn.Linear: forward and gradients within
1e-6); PEFT + transformers over the full-precision base (the adapter loads there); transformers
loading merge.py's output; an uninterrupted run (resume is exact); one process (FSDP, 2 ranks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import tiny_model
from nanotune.checkpoint import load_pretrained, save_pretrained
from nanotune.lora import LoRALinear, apply_lora, load_adapter, merged_copy, save_adapter, trainable_parameters
from nanotune.quant import NF4Linear, QuantizeOnLoad, quantize_linears

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6


def lora_pair(in_features=176, out_features=96, bias=True, r=4, seed=0):
    """The same LoRA layer twice: over an NF4 base, and over a plain layer holding its dequantised weight."""
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias)
    quantized = LoRALinear(NF4Linear.from_linear(base), r=r, scale=2.0)
    dense = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(quantized.weight.dequantize())
        if bias:
            dense.bias.copy_(base.bias)
    plain = LoRALinear(dense, r=r, scale=2.0)
    with torch.no_grad():
        quantized.lora_B.weight.normal_()  # B starts at zero: make the update count
        plain.lora_A.weight.copy_(quantized.lora_A.weight)
        plain.lora_B.weight.copy_(quantized.lora_B.weight)
    for layer in (quantized, plain):
        for name, parameter in layer.named_parameters():
            parameter.requires_grad_(".lora_" in f".{name}")
    return quantized, plain


def test_qlora_layer_forward_and_gradients_equal_lora_over_the_dequantised_weight():
    quantized, plain = lora_pair()
    x = torch.randn(3, 7, 176, generator=torch.Generator().manual_seed(1))
    outputs, input_grads = [], []
    for layer in (quantized, plain):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append(y)
        input_grads.append(xi.grad)
    torch.testing.assert_close(outputs[0], outputs[1], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(input_grads[0], input_grads[1], atol=TOLERANCE, rtol=0)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(quantized, name).weight.grad, getattr(plain, name).weight.grad,
                                   atol=TOLERANCE, rtol=0)
    assert all(not p.requires_grad for p in quantized.weight.parameters())


def test_backward_saves_the_4bit_tensors_not_a_dequantised_weight():
    """What autograd keeps between the forward and the backward: no (out, in) floating-point tensor."""
    quantized, _ = lora_pair(in_features=256, out_features=128, bias=False)
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = quantized(x)
    y.sum().backward()
    assert ((128 * 256 // 2,), torch.uint8) in saved
    assert not any(shape == (128, 256) and dtype.is_floating_point for shape, dtype in saved), saved


def test_nf4_layer_under_bf16_autocast_gives_bf16_outputs_and_an_input_gradient_of_the_input_dtype():
    quantized, plain = lora_pair(bias=True)
    x = torch.randn(2, 176, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = quantized(x)
        reference = plain(x.detach())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.float(), atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def quantized_tiny(seed=0, **overrides):
    model = tiny_model(seed=seed, **overrides)
    quantize_linears(model)
    return model


def test_a_model_quantised_on_load_equals_one_quantised_in_memory_and_keeps_embeddings_norms_head(tmp_path):
    model = tiny_model(intermediate_size=176)
    save_pretrained(model, tmp_path / "base", max_shard_size="60KB")
    loaded = load_pretrained(tmp_path / "base", dtype=torch.bfloat16, quantizer=QuantizeOnLoad(dtype=torch.bfloat16))
    in_memory = tiny_model(intermediate_size=176)
    quantize_linears(in_memory, dtype=torch.bfloat16)
    a, b = loaded.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith((".packed", ".scale_codes", ".scale_absmax", ".scale_mean")):
            assert torch.equal(a[name], b[name]), name
        else:
            assert a[name].dtype == torch.bfloat16 and torch.equal(a[name], b[name].to(torch.bfloat16)), name
    n_nf4 = sum(isinstance(m, NF4Linear) for m in loaded.modules())
    assert n_nf4 == 2 * 7 and isinstance(loaded.lm_head, nn.Linear)
    assert loaded.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16  # the compute dtype


def test_quantize_targets_choose_the_layers_and_modules_to_save_cannot_be_nf4():
    model = tiny_model()
    assert quantize_linears(model, ["gate_proj", "up_proj", "down_proj"]) == [
        f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")]
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear)
    with pytest.raises(ValueError, match="hold NF4 weights"):
        apply_lora(model, r=2, alpha=4, targets=["q_proj"], modules_to_save=["model.layers.0.mlp"])


def test_generation_of_a_qlora_model_equals_the_same_model_dequantised():
    from nanotune.generate import decode_without_cache, generate

    model = quantized_tiny()
    apply_lora(model, r=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for _, parameter in trainable_parameters(model):
            parameter.normal_(0, 0.05)
    model.eval()
    dense = merged_copy(model).eval()
    prompt = [3, 17, 42, 9]
    tokens = generate(model, prompt, max_new_tokens=8)
    assert tokens == generate(dense, prompt, max_new_tokens=8)
    assert tokens == decode_without_cache(model, prompt, max_new_tokens=8)
