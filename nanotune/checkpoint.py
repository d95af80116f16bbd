"""HuggingFace-format model folders in and out: `config.json` + safetensors shards (+ index).

Reading never holds two copies of the weights: the model is built on the meta device (shapes, no
storage) and each tensor read from disk is assigned into it as it arrives, shard by shard.
Writing goes tensor by tensor (each one made, written and dropped, whether it comes from a model,
a sharded FSDP model or merge.py's arithmetic), into a temporary folder that is renamed into place
only when every file is complete, so a crash never leaves a half-written model where a whole one was.

The names on disk are the names of our modules (`model.layers.0.self_attn.q_proj.weight`), so no
renaming table exists anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from . import distributed
from .files import replace_folder, temporary_folder
from .model import Llama, LlamaConfig

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
SUMS_FILE = "SHA256SUMS"  # the checksums of a folder's files, in the format `sha256sum` prints
# Tensors some checkpoints carry that are not weights (old HF versions saved the RoPE buffer).
IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A model folder that cannot be read: the message names the file and the tensors."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> LlamaConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected a HF-format model folder)")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json in this folder (is it a HF-format model?)")
    try:
        return LlamaConfig.from_hf_dict(json.loads(config_file.read_text(encoding="utf-8")))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}: invalid JSON ({error})") from None
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_file}: {error}") from None


def weight_files(path: str | os.PathLike) -> dict[Path, list[str] | None]:
    """The weight files of a model folder, each with the tensor names the index assigns it.

    Names are None where there is no index (a single file: its names are in its header).
    """
    path = Path(path)
    for index_name, single_name in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index_file = path / index_name
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{index_file}: not a valid index ({error!r})") from None
            files: dict[Path, list[str]] = {}
            for name, file_name in weight_map.items():
                file = path / str(file_name)
                if Path(str(file_name)).name != file_name or file_name in ("", ".", ".."):  # a bare file name only
                    raise CheckpointError(f"{index_file}: lists {file_name!r} for {name}: weights are read only "
                                          f"from files inside the model folder")
                files.setdefault(file, []).append(name)
            for file in files:
                if not file.exists():
                    raise CheckpointError(f"{index_file}: lists {file.name}, which is missing")
            return files
        if (path / single_name).exists():
            return {path / single_name: None}
    raise CheckpointError(
        f"{path}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
    )


def iter_file_tensors(file: Path, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one weight file, one tensor at a time for safetensors.

    The file is opened again for each tensor: a tensor read from an open file stays mapped to it,
    and the pages of every tensor read would stay resident until the file is closed (a whole
    shard, however many of its tensors were already converted or quantised and dropped).
    """
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                names = list(f.keys())
            for name in names:
                with safe_open(str(file), framework="pt", device=str(device)) as f:
                    tensor = f.get_tensor(name)
                yield name, tensor
        except Exception as error:  # safetensors raises its own SafetensorError for bad files
            if isinstance(error, CheckpointError):
                raise
            raise CheckpointError(f"{file}: cannot read safetensors file ({error})") from None
    else:
        try:
            state = torch.load(file, map_location=device, weights_only=True, mmap=True)
        except Exception as error:
            raise CheckpointError(f"{file}: cannot read PyTorch weights file ({error})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
        yield from state.items()


def expected_tensor_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a checkpoint for `config` must hold (built on meta, free)."""
    with torch.device("meta"):
        model = Llama(config)
    return {name: tensor.shape for name, tensor in model.state_dict(keep_vars=False).items() if not _is_tied_head(name, config)}


def _is_tied_head(name: str, config: LlamaConfig) -> bool:
    return config.tie_word_embeddings and name == "lm_head.weight"


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
    quantizer=None, **options
) -> Llama:
    """A `Llama` with the weights of a HF-format folder, in eval mode.

    dtype: convert every tensor to it (None keeps the dtype stored on disk). device: where the
    weights go (None = CPU). `options` are Llama's own (`packed_attention`, `loss_chunk_tokens`).
    quantizer: `quant.QuantizeOnLoad` for QLoRA: the chosen linear weights are quantised to NF4
    one by one as they are read, so their full-precision copies never exist together.
    Missing, unexpected and mis-shaped tensors are one error that lists them all, naming the folder.
    """
    path = Path(path)
    config = read_config(path)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Llama(config, **options)
        if quantizer is not None:
            quantizer.prepare(model)  # the chosen linear layers become empty NF4 shells
    expected = expected_tensor_shapes(config)
    loaded, unexpected, wrong_shape = set(), [], []
    for file in weight_files(path):
        shard = {}
        for name, tensor in iter_file_tensors(file, device):
            if IGNORED_TENSORS.search(name):
                continue
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied: the head is the embedding
            if name not in expected:
                unexpected.append(f"{name} (in {file.name})")
                continue
            if not tensor.is_floating_point():
                raise CheckpointError(f"{file}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; "
                                      f"model weights must be floating point (nothing is cast silently)")
            if tensor.shape != expected[name]:
                wrong_shape.append(f"{name}: {tuple(tensor.shape)} in {file.name}, model needs {tuple(expected[name])}")
                continue
            quantized = quantizer.convert(name, tensor) if quantizer is not None else None
            if quantized is not None:
                shard.update(quantized)  # the full-precision tensor is dropped here
            else:
                shard[name] = tensor.to(dtype) if dtype is not None else tensor
            loaded.add(name)
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    raise_on_mismatch(path, sorted(set(expected) - loaded), unexpected, wrong_shape)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def raise_on_mismatch(path, missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor, or nothing if all is well."""
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {'; '.join(wrong_shape)}")
    if problems:
        raise CheckpointError(f"{path}: " + " | ".join(problems))


# ----------------------------------------------------------------------------------------------
# Dtypes, by name
# ----------------------------------------------------------------------------------------------

# Both spellings of each dtype are accepted everywhere: configs say "bfloat16" (as config.json's
# `torch_dtype` does), command lines often say "bf16".
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}
# safetensors' names for the dtypes it stores; the format is raw little-endian bytes after a JSON header.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def parse_dtype(name: str) -> torch.dtype:
    """'bf16' or 'bfloat16' -> torch.bfloat16; any other name is an error listing the accepted ones."""
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20 (HF's convention: GB decimal, GiB binary)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read size {size!r}: expected e.g. '5GB', '500MB' or '2GiB'")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most `max_shard_bytes` (a bigger tensor alone)."""
    shards, current, current_bytes = [], [], 0
    for name, size in sizes.items():
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def write_safetensors(file: Path, specs: dict, get_tensor: Callable[[str], torch.Tensor]) -> None:
    """Write one safetensors file tensor by tensor: the header (names, shapes, byte offsets) first,
    from `specs` (name -> (shape, dtype)) alone, then each tensor's bytes as `get_tensor` makes it.

    Only the tensor being written is alive, so peak memory is one tensor, not one shard
    (`safetensors.torch.save_file` needs the whole shard in a dict first).
    """
    header, position = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, dtype) in specs.items():
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [position, position + size]}
        position += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))  # the file: header length, header, data
        f.write(header_bytes)
        for name, (shape, dtype) in specs.items():
            tensor = get_tensor(name).detach().to("cpu")
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:  # a bug here, never bad input
                raise RuntimeError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, header says {shape} {dtype}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor  # before the next one is made


def write_hf_checkpoint(
    path: str | os.PathLike,
    config_dict: dict,
    tensor_specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    get_tensor: Callable[[str], torch.Tensor],
    max_shard_size: int | str = "5GB",
    is_writer: bool = True,
    extra_files: Iterable[tuple[str, str]] = (),
    copy_files: Iterable[str | os.PathLike] = (),
    checksums: bool = False,
) -> None:
    """Write a HF-format folder, asking `get_tensor(name)` for one tensor at a time.

    The one HF writer: `save_pretrained` (and so the training loop's final save) and merge.py
    all write through it. `tensor_specs` (name -> (shape, dtype), in file order) fixes the shards
    and their headers before any tensor exists; each tensor is then made, written and dropped.
    Everything goes into `NAME.tmp`, renamed to `NAME` only when complete.

    Distributed: every rank calls this with the same specs, and `get_tensor` is called on every
    rank for the same names in the same order, so it may be a collective (gathering a sharded
    parameter); only `is_writer` writes.
    extra_files: (file name, text) pairs written beside the weights (generation_config.json...).
    copy_files: files copied in under their own names (tokenizer files...).
    checksums: also write SHA256SUMS of every other file, as `sha256sum` prints them.
    """
    path = Path(path)
    sizes = {name: torch.Size(shape).numel() * dtype.itemsize for name, (shape, dtype) in tensor_specs.items()}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    if not is_writer:
        for name in tensor_specs:  # the writer's order: the shards are consecutive runs of the specs
            get_tensor(name)
        return
    n = len(shards)
    file_names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    temporary = temporary_folder(path)
    try:
        _fill_model_folder(temporary, shards, file_names, sizes, tensor_specs, get_tensor, config_dict,
                           extra_files, copy_files, checksums)
    except BaseException:  # an error or Ctrl-C: no half-written folder is left behind
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    replace_folder(temporary, path)


def _fill_model_folder(temporary, shards, file_names, sizes, tensor_specs, get_tensor, config_dict,
                       extra_files, copy_files, checksums) -> None:
    n = len(shards)
    for names, file_name in zip(shards, file_names):
        write_safetensors(temporary / file_name, {name: tensor_specs[name] for name in names}, get_tensor)
    if n > 1:
        weight_map = {name: file_name for names, file_name in zip(shards, file_names) for name in names}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (temporary / SAFE_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    (temporary / "config.json").write_text(json.dumps(config_dict, indent=2), encoding="utf-8")
    for file_name, text in extra_files:
        (temporary / file_name).write_text(text, encoding="utf-8")
    for file in copy_files:
        shutil.copyfile(file, temporary / Path(file).name)
    if checksums:
        write_sha256sums(temporary)


def sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sha256sums(folder: Path) -> None:
    """SHA256SUMS listing every other file of `folder`, as `sha256sum *` prints them."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != SUMS_FILE)
    text = "".join(f"{sha256_of(p)}  {p.name}\n" for p in files)
    (folder / SUMS_FILE).write_text(text, encoding="utf-8")


def model_config_dict(model: Llama, dtype: torch.dtype) -> dict:
    """config.json of `model`. A model with a scalar `score` head instead of an lm_head (a reward
    model, preference.add_score_head) is written as its family's `*ForSequenceClassification`."""
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if isinstance(getattr(model, "score", None), torch.nn.Linear):
        config["architectures"] = [a.replace("ForCausalLM", "ForSequenceClassification") for a in config["architectures"]]
        config["num_labels"] = model.score.out_features
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.score.out_features)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(model.score.out_features)}
    return config


def generation_config_text(config: LlamaConfig) -> str:
    return json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                       "pad_token_id": config.pad_token_id}, indent=2)


def save_pretrained(
    model: Llama,
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    run: distributed.Run | None = None,
) -> None:
    """Write `model` as a HF-format folder that `AutoModelForCausalLM.from_pretrained` loads.

    A tied `lm_head.weight` is not written (HF ties it back on load). dtype: convert on the way
    out, a torch dtype or a name of `DTYPES` (None = as the parameters are).
    A sharded (FSDP2) model works too: every rank calls this, each parameter is gathered whole
    only when its turn to be written comes (a collective all ranks join, in the same order), only
    the main rank of `run` writes (run None = a single process), and all ranks leave together.
    Peak extra memory is one whole tensor, never a copy of the model.
    """
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    state = {name: t for name, t in model.state_dict().items() if not _is_tied_head(name, model.config)}
    specs = {name: (t.shape, dtype or t.dtype) for name, t in state.items()}  # a DTensor's shape is the whole one
    out_dtype = dtype or next(iter(specs.values()))[1]

    def get_tensor(name: str) -> torch.Tensor:
        tensor = distributed.full_tensor(state[name])
        return tensor.to(dtype) if dtype is not None else tensor

    write_hf_checkpoint(
        path, model_config_dict(model, out_dtype), specs, get_tensor, max_shard_size,
        is_writer=run is None or run.is_main,
        extra_files=[("generation_config.json", generation_config_text(model.config))],
    )
    if run is not None:
        distributed.barrier(run)
