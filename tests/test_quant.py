"""nanotune/quant.py's NF4 against its two oracles: bitsandbytes and torchao, on the same weights.

What agrees exactly, and why the rest cannot:

* The 4-bit codes. Both libraries and nanotune scale a block by its exact fp32 absmax before
  choosing a level, so the packed bytes are compared byte for byte. With bitsandbytes they are
  identical (the same table, the same `x * (1 / absmax)`, the same midpoints, ties to the lower
  level). torchao's table is the paper's rounded to 4 decimals (-0.6962 for -0.69619...), which
  moves each midpoint by at most 5e-5: a value of x / absmax that close to a midpoint may take the
  other level there, and only such values may.
* Dequantising with exact scales is bit for bit bitsandbytes' (fp32 level * fp32 absmax).
* The double-quantised scales differ by design, not by error: bitsandbytes stores them in its
  8-bit dynamic (non-linear) code, torchao as int8 with a factor 128 / absmax, and nanotune as
  the paper's absmax int8, round(127 * s / absmax). Each rounds a scale by at most half a step of
  its own code, so an element may differ by |level| * (the two scale errors, each measured from
  that library's own output) plus, for torchao, its table's 5e-5 * scale; the tests hold every
  element to that bound, and nanotune's scale error to half an int8 step.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from nanotune import quant
from nanotune.quant import (
    BLOCK_SIZE, NF4_LEVELS, SCALE_BLOCK_SIZE, NF4Weight, dequantize_blocks, dequantize_nf4, dequantize_scales,
    quantize_nf4,
)

TORCHAO_TABLE_ROUNDING = 5e-5  # torchao's NF4 levels are the paper's rounded to 4 decimals
FP32_SLACK = 1e-6  # relative: the few fp32 roundings between two computations of the same value


def weight(shape, seed=0, std=0.02) -> torch.Tensor:
    """Roughly what a trained linear weight looks like: normal, with a few large outliers."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator) * std
    w.view(-1)[:: 997] *= 8
    return w


def exact_scales(w: torch.Tensor) -> torch.Tensor:
    flat = torch.nn.functional.pad(w.reshape(-1).float(), (0, -w.numel() % BLOCK_SIZE))
    return flat.view(-1, BLOCK_SIZE).abs().amax(dim=1)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Byte -> (high nibble, low nibble), the first value in the high one."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)


def torchao_to_nf4():
    """torchao's `to_nf4`, wherever this version keeps it (it moved out of torchao.dtypes in 0.1x)."""
    for module in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:
            return importlib.import_module(module).to_nf4
        except ImportError:
            continue
    pytest.skip("torchao is not installed (pip install -e .[test])")


def test_nf4_levels_are_the_normal_quantiles_of_the_paper():
    """QLoRA's construction (bitsandbytes' create_normal_map): 8 quantiles of N(0, 1) above zero
    from 1 - delta up to 0.5, 7 below, and zero, scaled by the largest. delta = 0.9677083 as in bnb."""
    offset = 0.9677083
    above = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    below = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([above, below, torch.zeros(1, dtype=torch.float64)]).sort().values
    levels = levels / levels.max()
    torch.testing.assert_close(torch.tensor(NF4_LEVELS, dtype=torch.float64), levels, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(128, 256), (64, 176), (3, 50)])
def test_packed_codes_equal_bitsandbytes_byte_for_byte(shape):
    """(64, 176): blocks of 64 run across rows; (3, 50): a last, partial block (padded by nanotune)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    w = weight(shape)
    ours = quantize_nf4(w)
    for compress in (False, True):  # the codes come from the exact scales either way
        packed, _ = functional.quantize_4bit(w, blocksize=BLOCK_SIZE, compress_statistics=compress, quant_type="nf4")
        assert torch.equal(ours.packed[: packed.numel()], packed.reshape(-1))
    assert torch.equal(unpack(ours.packed)[w.numel():], torch.full((ours.packed.numel() * 2 - w.numel(),), 7,
                                                                     dtype=torch.uint8))  # padding is level 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantised_with_exact_scales_equals_bitsandbytes_bit_for_bit(dtype):
    """Shapes whose rows are whole blocks: bitsandbytes' CPU kernel (0.50.2) dequantises (64, 176)
    wrongly (its vectorised path assumes a block never spans two rows; its torch fallback agrees
    with us), so the comparison uses rows of 256 as every real model's in_features are."""
    functional = pytest.importorskip("bitsandbytes.functional")
    w = weight((128, 256)).to(dtype)
    packed, state = functional.quantize_4bit(w, blocksize=BLOCK_SIZE, compress_statistics=False, quant_type="nf4")
    theirs = functional.dequantize_4bit(packed, state, quant_type="nf4")
    ours = quantize_nf4(w)
    assert torch.equal(state.absmax, exact_scales(w))
    assert torch.equal(dequantize_blocks(ours.packed, state.absmax, w.shape, dtype), theirs)


def test_double_quantised_nf4_equals_bitsandbytes_within_each_ones_scale_rounding():
    functional = pytest.importorskip("bitsandbytes.functional")
    w = weight((256, 512))
    packed, state = functional.quantize_4bit(w, blocksize=BLOCK_SIZE, compress_statistics=True, quant_type="nf4")
    theirs = functional.dequantize_4bit(packed, state, quant_type="nf4")
    their_scales = functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    ours = quantize_nf4(w)
    our_scales, exact = dequantize_scales(ours), exact_scales(w)
    torch.testing.assert_close(ours.scale_mean, torch.as_tensor(state.offset).reshape(1), atol=1e-9, rtol=1e-6)
    assert torch.equal(ours.packed, packed.reshape(-1))

    level = dequantize_blocks(ours.packed, torch.ones_like(exact), w.shape).abs()  # |level| of each element
    per_block = (our_scales - exact).abs() + (their_scales - exact).abs()
    bound = level * per_block.repeat_interleave(BLOCK_SIZE).view(w.shape) + FP32_SLACK * w.abs().max()
    difference = (dequantize_nf4(ours) - theirs).abs()
    assert (difference <= bound).all(), (difference - bound).max()
    assert difference.max() > 0  # the two scale codes do differ: the bound is doing the work


def test_double_quantised_scales_are_within_half_an_int8_step_of_the_exact_ones():
    w = weight((300, 448))  # 2100 blocks: 8 whole groups of 256 and a partial one
    ours = quantize_nf4(w)
    n_blocks = math.ceil(w.numel() / BLOCK_SIZE)
    assert ours.scale_codes.numel() == n_blocks and ours.scale_absmax.numel() == math.ceil(n_blocks / SCALE_BLOCK_SIZE)
    half_step = (ours.scale_absmax / 254).repeat_interleave(SCALE_BLOCK_SIZE)[:n_blocks]
    error = (dequantize_scales(ours) - exact_scales(w)).abs()
    assert (error <= half_step * (1 + FP32_SLACK) + 1e-9).all()
    assert ours.scale_codes.abs().max() == 127  # each group's extreme scale uses the full int8 range


def test_nf4_equals_torchao_where_the_tables_agree():
    to_nf4 = torchao_to_nf4()
    w = weight((256, 512))
    theirs = to_nf4(w, BLOCK_SIZE, SCALE_BLOCK_SIZE)
    ours = quantize_nf4(w)
    exact = exact_scales(w)

    # Codes: identical except where x / absmax lies within the table's rounding of a midpoint.
    our_codes, their_codes = unpack(ours.packed), unpack(theirs.quantized_data)
    scaled = (w.reshape(-1, BLOCK_SIZE) / exact[:, None]).reshape(-1)
    levels = torch.tensor(NF4_LEVELS)
    midpoints = (levels[:-1] + levels[1:]) / 2
    near_a_midpoint = (scaled[:, None] - midpoints).abs().min(dim=1).values <= TORCHAO_TABLE_ROUNDING
    differ = our_codes != their_codes
    assert not (differ & ~near_a_midpoint).any()
    assert differ.sum() <= near_a_midpoint.sum() and differ.float().mean() < 1e-3

    # Values, where the codes agree: within the two scale roundings and torchao's table rounding.
    their_scales = theirs.dequantize_scalers(theirs.quantized_scalers, theirs.quantization_factor,
                                             theirs.scaler_block_size)
    per_block = (dequantize_scales(ours) - exact).abs() + (their_scales - exact).abs()
    level = dequantize_blocks(ours.packed, torch.ones_like(exact), w.shape).abs().reshape(-1)
    bound = (level * per_block.repeat_interleave(BLOCK_SIZE) + TORCHAO_TABLE_ROUNDING * their_scales.abs()
             .repeat_interleave(BLOCK_SIZE) + FP32_SLACK * w.abs().max())
    difference = (dequantize_nf4(ours).reshape(-1) - theirs.get_original_weight().reshape(-1)).abs()
    assert (difference[~differ] <= bound[~differ]).all()


def test_chunked_quantisation_equals_one_chunk(monkeypatch):
    w = weight((64, 176))
    whole = quantize_nf4(w)
    monkeypatch.setattr(quant, "CHUNK", 2 * BLOCK_SIZE)  # 88 chunks of two blocks
    chunked = quantize_nf4(w)
    for name in ("packed", "scale_codes", "scale_absmax", "scale_mean"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    assert torch.equal(dequantize_nf4(chunked), dequantize_nf4(whole))
    monkeypatch.undo()
    assert torch.equal(dequantize_nf4(chunked), dequantize_nf4(whole))


def test_round_trip_error_is_at_most_half_a_level_gap_and_zero_blocks_stay_zero():
    w = weight((128, 192))
    w[5] = 0.0  # three whole blocks of zeros
    ours = quantize_nf4(w)
    back = dequantize_nf4(ours)
    assert torch.equal(back[5], torch.zeros(192))
    levels = torch.tensor(NF4_LEVELS)
    largest_half_gap = (levels[1:] - levels[:-1]).max() / 2
    scales = dequantize_scales(ours).repeat_interleave(BLOCK_SIZE).view(w.shape)
    scale_error = (dequantize_scales(ours) - exact_scales(w)).abs().repeat_interleave(BLOCK_SIZE).view(w.shape)
    assert ((back - w).abs() <= largest_half_gap * scales + scale_error + 1e-7).all()
    relative = ((back - w).norm() / w.norm()).item()
    assert 0.05 < relative < 0.12, relative  # NF4's error on near-normal weights: about 9%


@pytest.mark.parametrize("w", [torch.zeros(4, 64), torch.full((1, 64), -0.5), torch.full((2, 64), 0.25)],
                         ids=["all zero", "one block", "equal scales"])
def test_degenerate_weights_come_back_exactly(w):
    """Scales all equal: the centred scales are all 0, and so is their group's absmax."""
    ours = quantize_nf4(w)
    assert torch.isfinite(dequantize_scales(ours)).all()
    assert torch.equal(dequantize_nf4(ours), w)  # +-absmax and 0 are levels, and the scale is the mean


def test_dequantised_in_bf16_is_the_fp32_dequantisation_rounded_once():
    ours = quantize_nf4(weight((64, 256)))
    assert torch.equal(dequantize_nf4(ours, torch.bfloat16), dequantize_nf4(ours).to(torch.bfloat16))


def test_nf4_weight_costs_4_127_bits_per_value_and_survives_model_to_dtype():
    w = weight((1024, 1024))
    module = NF4Weight.quantize(w, torch.float32)
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    assert n_bytes * 8 / w.numel() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel())
    before = module.dequantize()
    module.to(torch.bfloat16)  # casts floating-point tensors only: the NF4 tensors are integers
    assert all(not p.is_floating_point() for p in module.parameters())
    assert torch.equal(module.dequantize(torch.float32), before)
