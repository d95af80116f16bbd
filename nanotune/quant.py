"""QLoRA's 4-bit NormalFloat (NF4): the frozen base of a LoRA run in about a quarter of its bf16 memory.

How a weight is stored (Dettmers et al. 2023, "QLoRA", section 3):

1. Blocks. The weight is flattened and cut into blocks of 64 values; each block is divided by
   its absolute maximum (the block's *scale*), so every value lies in [-1, 1].
2. Levels. Each value becomes the index (0..15) of the nearest of 16 fixed levels, `NF4_LEVELS`:
   quantiles of the normal distribution, because trained weights are close to normal, so each
   level is used about equally often (a uniform grid would waste levels on the rare tails).
   Two indices are packed into one byte, the first value in the high nibble (as bitsandbytes
   and torchao both pack them).
3. Double quantisation. One fp32 scale per 64 weights would cost 0.5 bits per weight, so the
   scales are quantised too: their mean is subtracted, and in groups of 256 each is stored as
   int8 against the group's own fp32 absmax, round(127 * s / absmax) (the paper's eq. 1).

Cost: 4 + 8/64 + 32/(64 * 256) = 4.127 bits per weight, 0.258x of bf16. Dequantising runs the
steps backwards: weight = level[index] * (code * absmax / 127 + mean), computed in fp32 and
cast once to the compute dtype.

The layer (`NF4Linear`) keeps only those tensors. Its forward dequantises the weight, multiplies
and drops it; its backward (`NF4LinearFunction`) dequantises it again rather than keeping it,
so a full-precision weight exists for one layer at a time, never for the model. The weight is
frozen, so the backward returns the gradient of the input only: LoRA's adapters beside it get
theirs through their own path (lora.py). How close the result is to bitsandbytes and torchao,
and why not closer, is in tests/test_quant.py.

Names. A quantised `q_proj` keeps its HF path, and its `weight` becomes a small module holding
the 4-bit form: `q_proj.weight.packed`, `.scale_codes`, `.scale_absmax`, `.scale_mean`. All four
are frozen `nn.Parameter`s of integer dtypes, so FSDP2 shards them like any other parameter and
neither FSDP's mixed precision nor `model.to(dtype)` (which cast every floating-point tensor)
can round them; the two fp32 statistics are kept as their bits in int32 for that reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 64  # weights per scale
SCALE_BLOCK_SIZE = 256  # scales per int8 group of the double quantisation
METHOD = "nf4"

# The 16 NF4 levels, as the QLoRA paper lists them (appendix E) and bitsandbytes stores them:
# 8 quantiles of N(0, 1) above zero, 7 below, and an exact zero, scaled to [-1, 1]
# (tests/test_quant.py rebuilds them from the normal quantiles).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# Values per step of (de)quantisation: bounds the temporaries (indices, fp32 values) to a few MB
# whatever the size of the weight.
CHUNK = 1 << 20
# Weight values per slab of rows that NF4LinearFunction dequantises and multiplies at once (8 MB in bf16).
LINEAR_ROWS_CHUNK = 1 << 22


@dataclass
class NF4:
    """A weight in NF4 with double-quantised scales: what `quantize_nf4` makes and `dequantize_nf4` reads.

    The flattened weight is padded with zeros to whole blocks of 64; the padding dequantises to
    zero and is cut off again.
    """

    packed: torch.Tensor  # (n_blocks * 32,) uint8: two level indices per byte, the first in the high nibble
    scale_codes: torch.Tensor  # (n_blocks,) int8: each block's absmax, minus the mean, against its group's absmax
    scale_absmax: torch.Tensor  # (n_groups,) fp32: the absmax of each group of 256 centred scales
    scale_mean: torch.Tensor  # (1,) fp32: the mean of all block scales
    shape: tuple[int, ...]  # the weight's own shape, e.g. (out, in)


def nf4_sizes(numel: int) -> tuple[int, int]:
    """(n_blocks, n_groups) for a weight of `numel` values."""
    n_blocks = math.ceil(numel / BLOCK_SIZE)
    return n_blocks, math.ceil(n_blocks / SCALE_BLOCK_SIZE)


def _levels(device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


_BYTE_LEVELS: dict[torch.device, torch.Tensor] = {}


def _byte_levels(device: torch.device) -> torch.Tensor:
    """(256, 2): the two levels a byte packs, the high nibble's first. Dequantising is then one
    gather per byte, where unpacking first costs two shifts, two gathers and an interleave.

    Made once per device and kept: building it from Python numbers on a GPU is a copy from the
    host, which would make every layer of every step wait for the GPU.
    """
    if device not in _BYTE_LEVELS:
        levels = _levels(device)
        _BYTE_LEVELS[device] = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)
    return _BYTE_LEVELS[device]


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor) -> NF4:
    """`weight` (any shape, any float dtype) in NF4, on its own device, in chunks of `CHUNK` values.

    Each value is scaled by its block's absmax, as `value * (1 / absmax)` as bitsandbytes does
    (so the indices agree bit for bit), and mapped to the nearest level: `bucketize` against the
    midpoints between levels, a value exactly on a midpoint going to the lower level.
    """
    shape, numel = tuple(weight.shape), weight.numel()
    n_blocks, n_groups = nf4_sizes(numel)
    flat = weight.detach().reshape(-1)
    levels = _levels(weight.device)
    midpoints = (levels[:-1] + levels[1:]) / 2  # (15,)
    packed = torch.empty(n_blocks * BLOCK_SIZE // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=weight.device)
    blocks_per_chunk = CHUNK // BLOCK_SIZE
    for first in range(0, n_blocks, blocks_per_chunk):
        last = min(first + blocks_per_chunk, n_blocks)
        values = flat[first * BLOCK_SIZE : last * BLOCK_SIZE].float()
        values = F.pad(values, (0, (last - first) * BLOCK_SIZE - values.numel()))  # the last block, padded
        blocks = values.view(last - first, BLOCK_SIZE)  # (b, 64)
        block_absmax = blocks.abs().amax(dim=1)  # (b,)
        scaled = (blocks * (1.0 / block_absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
        indices = torch.bucketize(scaled.reshape(-1), midpoints, out_int32=True).to(torch.uint8)  # (b * 64,)
        packed[first * BLOCK_SIZE // 2 : last * BLOCK_SIZE // 2] = (indices[0::2] << 4) | indices[1::2]
        absmax[first:last] = block_absmax
    scale_codes, scale_absmax, scale_mean = _quantize_scales(absmax, n_groups)
    return NF4(packed, scale_codes, scale_absmax, scale_mean, shape)


def _quantize_scales(absmax: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantisation: (int8 codes, fp32 absmax per group of 256, fp32 mean) of the block scales."""
    mean = absmax.mean().reshape(1)
    centred = F.pad(absmax - mean, (0, n_groups * SCALE_BLOCK_SIZE - absmax.numel()))  # the last group, padded
    groups = centred.view(n_groups, SCALE_BLOCK_SIZE)  # (g, 256)
    group_absmax = groups.abs().amax(dim=1)  # (g,)
    # code = round(s * 127 / absmax), eq. 1 of the paper. A group of equal scales has absmax 0: its
    # codes are 0 whatever the factor, which only has to stay finite.
    factor = 127.0 / group_absmax.clamp(min=1e-30)
    codes = (groups * factor[:, None]).round().clamp(-127, 127).to(torch.int8)
    return codes.reshape(-1)[: absmax.numel()], group_absmax, mean


def dequantize_scales(nf4: NF4) -> torch.Tensor:
    """The block scales back in fp32: code / (127 / absmax) + mean. (n_blocks,)"""
    n_blocks = nf4.scale_codes.numel()
    factor = 127.0 / nf4.scale_absmax.float().clamp(min=1e-30)  # the very division quantisation used
    group = torch.arange(n_blocks, device=nf4.scale_codes.device) // SCALE_BLOCK_SIZE
    return nf4.scale_codes.float() / factor[group] + nf4.scale_mean.float()


@torch.no_grad()
def dequantize_nf4(nf4: NF4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight back from NF4, in `dtype` (computed in fp32, cast once)."""
    return dequantize_blocks(nf4.packed, dequantize_scales(nf4), nf4.shape, dtype)


def dequantize_blocks(packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """level[index] * scale of each block, in chunks of `CHUNK` values: the 4-bit half of dequantising.

    `scales` (n_blocks,) fp32 are the block absmaxes, double-quantised or not.
    """
    n_blocks = scales.numel()
    byte_levels = _byte_levels(packed.device)
    out = torch.empty(n_blocks * BLOCK_SIZE, dtype=dtype, device=packed.device)
    blocks_per_chunk = CHUNK // BLOCK_SIZE
    for first in range(0, n_blocks, blocks_per_chunk):
        last = min(first + blocks_per_chunk, n_blocks)
        chunk = packed[first * BLOCK_SIZE // 2 : last * BLOCK_SIZE // 2]  # (b * 32,) bytes
        pairs = byte_levels[chunk.int()]  # (b * 32, 2): the high nibble's level first
        values = pairs.view(last - first, BLOCK_SIZE) * scales[first:last, None]  # (b, 64)
        out[first * BLOCK_SIZE : last * BLOCK_SIZE] = values.reshape(-1).to(dtype)
    return out[: math.prod(shape)].view(shape)


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class NF4Weight(nn.Module):
    """One frozen weight in NF4, standing where the linear layer's `weight` Parameter stood.

    `shape` is the weight's (out, in); `dtype` the compute dtype it dequantises to (the dtype the
    rest of the model is kept in). The fp32 statistics are stored as their bits in int32 (see the
    module docstring) and read back through `nf4()`.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.shape, self.dtype = tuple(shape), dtype
        n_blocks, n_groups = nf4_sizes(math.prod(shape))
        self.packed = _frozen(torch.empty(n_blocks * BLOCK_SIZE // 2, dtype=torch.uint8, device=device))
        self.scale_codes = _frozen(torch.empty(n_blocks, dtype=torch.int8, device=device))
        self.scale_absmax = _frozen(torch.empty(n_groups, dtype=torch.int32, device=device))  # fp32 bits
        self.scale_mean = _frozen(torch.empty(1, dtype=torch.int32, device=device))  # fp32 bits

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype | None = None) -> NF4Weight:
        module = cls(weight.shape, dtype or weight.dtype, device="meta")
        for name, tensor in as_parameters(quantize_nf4(weight)).items():
            setattr(module, name, _frozen(tensor))
        return module

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def nf4(self) -> NF4:
        return NF4(self.packed, self.scale_codes, self.scale_absmax.view(torch.float32),
                   self.scale_mean.view(torch.float32), self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.nf4(), dtype or self.dtype)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}, nf4 blocks of {BLOCK_SIZE}, double-quantised scales"


def as_parameters(nf4: NF4) -> dict[str, torch.Tensor]:
    """The tensors of `nf4` under NF4Weight's parameter names, as they are stored (fp32 as int32 bits)."""
    return {"packed": nf4.packed, "scale_codes": nf4.scale_codes,
            "scale_absmax": nf4.scale_absmax.view(torch.int32), "scale_mean": nf4.scale_mean.view(torch.int32)}


class NF4LinearFunction(torch.autograd.Function):
    """y = x W^T, W dequantised from NF4 in the forward and again in the backward, a slab of rows at a time.

    What autograd would do by itself with `F.linear(x, dequantize(...))` is keep the dequantised
    W alive until the backward: a full-precision copy of every layer at the peak, the memory
    QLoRA exists to save. Here only the 4-bit tensors are saved (they are the parameters, not
    copies). W is frozen, so the backward gives the input's gradient alone: dL/dx = dL/dy W.
    Within one call W is dequantised a slab of rows (`LINEAR_ROWS_CHUNK` values) at a time and
    used at once, so not even one layer's W exists whole: the temporaries are a few MB of the
    same sizes, which the allocator reuses (whole dequantised weights of tens of MB, allocated
    and freed in every layer, leave glibc's heap holding memory it does not give back).
    """

    @staticmethod
    def forward(ctx, x, packed, scale_codes, scale_absmax, scale_mean, shape, dtype):
        ctx.save_for_backward(packed, scale_codes, scale_absmax, scale_mean)
        ctx.shape, ctx.dtype = shape, dtype
        nf4 = NF4(packed, scale_codes, scale_absmax, scale_mean, shape)
        scales = dequantize_scales(nf4)
        # (..., in) -> (..., rows) per slab, then (..., out); under autocast in the autocast dtype
        outputs = [F.linear(x, _dequantize_rows(nf4, scales, rows, dtype)) for rows in _row_slabs(shape)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    @staticmethod
    def backward(ctx, grad_output):
        nf4 = NF4(*ctx.saved_tensors, ctx.shape)
        scales = dequantize_scales(nf4)
        grad_input = None
        for first, last in _row_slabs(ctx.shape):
            weight = _dequantize_rows(nf4, scales, (first, last), grad_output.dtype)  # (rows, in)
            part = grad_output[..., first:last] @ weight  # (..., rows) @ (rows, in) -> (..., in)
            grad_input = part if grad_input is None else grad_input.add_(part)
        return grad_input, None, None, None, None, None, None


def _row_slabs(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """(first, last) row ranges of about LINEAR_ROWS_CHUNK values; a multiple of 64 rows starts on a block."""
    out_features, in_features = shape
    rows = max(BLOCK_SIZE, LINEAR_ROWS_CHUNK // in_features // BLOCK_SIZE * BLOCK_SIZE)
    return [(first, min(first + rows, out_features)) for first in range(0, out_features, rows)]


def _dequantize_rows(nf4: NF4, scales: torch.Tensor, rows: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Rows first..last-1 of the weight. (rows, in)"""
    (first, last), in_features = rows, nf4.shape[1]
    first_block, end_block = first * in_features // BLOCK_SIZE, math.ceil(last * in_features / BLOCK_SIZE)
    packed = nf4.packed[first_block * BLOCK_SIZE // 2 : end_block * BLOCK_SIZE // 2]
    return dequantize_blocks(packed, scales[first_block:end_block], (last - first, in_features), dtype)


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for an NF4 weight."""
    nf4 = weight.nf4()
    y = NF4LinearFunction.apply(x, nf4.packed, nf4.scale_codes, nf4.scale_absmax, nf4.scale_mean, nf4.shape,
                                weight.dtype)
    return y if bias is None else y + bias.to(y.dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4: y = x W^T + b, W dequantised per call.

    The bias (Qwen2's q/k/v have one) stays in the compute dtype, frozen.
    """

    def __init__(self, weight: NF4Weight, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", bias)
        if bias is not None:
            bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> NF4Linear:
        """`linear` quantised; on the meta device, an empty layer of the right shapes (to load into)."""
        dtype = dtype or linear.weight.dtype
        if linear.weight.is_meta:
            weight = NF4Weight(linear.weight.shape, dtype, device="meta")
        else:
            weight = NF4Weight.quantize(linear.weight, dtype)
        return cls(weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, nf4"


# ----------------------------------------------------------------------------------------------
# A model's linear layers in NF4
# ----------------------------------------------------------------------------------------------

ALL_LINEAR = "all-linear"


def _name_matches(name: str, patterns: list[str] | str) -> bool:
    """The rule of LoRA targets (PEFT's): one string is a regular expression over the whole path; a
    list entry equals the path or its end after a dot. "all-linear" matches every linear layer."""
    if patterns == ALL_LINEAR or list(patterns) == [ALL_LINEAR]:
        return True
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantize_linears(model: nn.Module, targets: list[str] | str = ALL_LINEAR, dtype: torch.dtype | None = None) -> list[str]:
    """Replace the chosen `nn.Linear`s of `model.model.layers` by `NF4Linear`, in place; return their names.

    Only the blocks' layers: embeddings, norms and `lm_head` (which the fused loss reads
    directly) stay as they are, in the model's dtype. On the meta device the new layers are
    empty shells of the right shapes, which `checkpoint.load_pretrained` fills (`QuantizeOnLoad`).
    `dtype`: the compute dtype (None = each weight's own). Layers already in NF4 are left alone.
    """
    linears = {name: module for name, module in model.model.layers.named_modules(prefix="model.layers")
               if isinstance(module, nn.Linear)}
    chosen = [name for name in linears if _name_matches(name, targets)]
    for name in chosen:
        parent_name, child_name = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child_name, NF4Linear.from_linear(linears[name], dtype))
    return chosen


def unmatched_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The entries of `targets` that match no NF4 layer of `model` (a typo in the config)."""
    names = [name for name, module in model.named_modules() if isinstance(module, NF4Linear)]
    if isinstance(targets, str) or list(targets) == [ALL_LINEAR]:
        return [] if names else [targets if isinstance(targets, str) else ALL_LINEAR]
    return [t for t in targets if not any(_name_matches(name, [t]) for name in names)]


def quantization_record(model: nn.Module) -> dict | None:
    """How the base was quantised, for adapter_config.json (None: not quantised).

    `targets` names the quantised layers as LoRA names its targets, so that `merge.py lora
    --into-dequantized` can rebuild exactly the weights the adapter was trained against.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, NF4Linear)]
    if not names:
        return None
    return {"method": METHOD, "block_size": BLOCK_SIZE, "double_quant": True, "scale_block_size": SCALE_BLOCK_SIZE,
            "scale_codes": "int8 absmax", "targets": sorted({name.rsplit(".", 1)[-1] for name in names})}


class QuantizeOnLoad:
    """The hook `checkpoint.load_pretrained(..., quantizer=...)` calls so that each chosen linear
    weight goes into NF4 the moment it is read: peak memory is the 4-bit model plus one tensor.

    `prepare` swaps the chosen layers of the meta-built model for empty NF4 shells; `convert`
    turns one tensor read from disk into the shell's parameters (or returns None: not ours).
    Quantisation starts from the tensor as stored on disk, before any dtype conversion.
    """

    def __init__(self, targets: list[str] | str = ALL_LINEAR, dtype: torch.dtype | None = None):
        self.targets, self.dtype = targets, dtype
        self.weight_names: set[str] = set()

    def prepare(self, model: nn.Module) -> None:
        self.weight_names = {f"{name}.weight" for name in quantize_linears(model, self.targets, self.dtype)}

    def convert(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if name not in self.weight_names:
            return None
        return {f"{name}.{key}": value for key, value in as_parameters(quantize_nf4(tensor)).items()}
