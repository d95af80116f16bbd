"""HuggingFace-format model folders in and out: `config.json` + safetensors shards (+ index).

Reading never holds two copies of the weights: the model is built on the meta device (shapes, no
storage) and each tensor read from disk is assigned into it as it arrives, shard by shard.
Writing goes shard by shard too, into a temporary folder that is renamed into place only when
every file is complete, so a crash never leaves a half-written model where a whole one was.

The names on disk are the names of our modules (`model.layers.0.self_attn.q_proj.weight`), so no
renaming table exists anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import Llama, LlamaConfig

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
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
                files.setdefault(path / file_name, []).append(name)
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
    """(name, tensor) of one weight file, one tensor at a time for safetensors."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                names = list(f.keys())
                for name in names:
                    yield name, f.get_tensor(name)
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


def iter_checkpoint_tensors(path: str | os.PathLike, device="cpu") -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) for every tensor of a model folder, file after file."""
    for file in weight_files(path):
        for name, tensor in iter_file_tensors(file, device):
            yield file, name, tensor


def expected_tensor_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a checkpoint for `config` must hold (built on meta, free)."""
    with torch.device("meta"):
        model = Llama(config)
    return {name: tensor.shape for name, tensor in model.state_dict(keep_vars=False).items() if not _is_tied_head(name, config)}


def _is_tied_head(name: str, config: LlamaConfig) -> bool:
    return config.tie_word_embeddings and name == "lm_head.weight"


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> Llama:
    """A `Llama` with the weights of a HF-format folder, in eval mode.

    dtype: convert every tensor to it (None keeps the dtype stored on disk). device: where the
    weights go (None = CPU). Missing, unexpected and mis-shaped tensors are one error that lists
    them all, naming the folder.
    """
    path = Path(path)
    config = read_config(path)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Llama(config)
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
            if tensor.shape != expected[name]:
                wrong_shape.append(f"{name}: {tuple(tensor.shape)} in {file.name}, model needs {tuple(expected[name])}")
                continue
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


def write_hf_checkpoint(
    path: str | os.PathLike,
    config_dict: dict,
    tensor_specs: dict[str, tuple[torch.Size, torch.dtype]],
    get_tensor: Callable[[str], torch.Tensor],
    max_shard_size: int | str = "5GB",
    is_writer: bool = True,
    extra_files: Iterable[tuple[str, str]] = (),
) -> None:
    """Write a HF-format folder, asking `get_tensor(name)` for one tensor at a time.

    Only one shard's tensors are alive at once. In distributed runs every rank calls this (so
    gathering a sharded parameter is a collective all ranks join) and only `is_writer` writes.
    `extra_files`: (file name, text) pairs to write beside the weights (generation_config.json...).
    """
    path = Path(path)
    sizes = {name: shape.numel() * dtype.itemsize for name, (shape, dtype) in tensor_specs.items()}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    n = len(shards)
    file_names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    temporary = path.with_name(path.name + ".tmp")
    if is_writer:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    weight_map = {}
    for names, file_name in zip(shards, file_names):
        tensors = {}
        for name in names:
            tensor = get_tensor(name)
            if is_writer:
                tensors[name] = tensor.detach().to("cpu").contiguous()
            weight_map[name] = file_name
        if is_writer:
            save_file(tensors, str(temporary / file_name), metadata={"format": "pt"})
        del tensors
    if not is_writer:
        return
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (temporary / SAFE_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    (temporary / "config.json").write_text(json.dumps(config_dict, indent=2), encoding="utf-8")
    for file_name, text in extra_files:
        (temporary / file_name).write_text(text, encoding="utf-8")
    replace_folder(temporary, path)


def replace_folder(source: Path, destination: Path) -> None:
    """Move a completed folder into place; an old folder there is removed only after the move."""
    if destination.exists():
        old = destination.with_name(destination.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(destination, old)
        os.replace(source, destination)
        shutil.rmtree(old)
    else:
        os.replace(source, destination)


def model_config_dict(model: Llama, dtype: torch.dtype) -> dict:
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


def generation_config_text(config: LlamaConfig) -> str:
    return json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                       "pad_token_id": config.pad_token_id}, indent=2)


def save_pretrained(
    model: Llama, path: str | os.PathLike, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None
) -> None:
    """Write `model` as a HF-format folder that `AutoModelForCausalLM.from_pretrained` loads.

    A tied `lm_head.weight` is not written (HF ties it back on load). dtype: convert on the way
    out (None = as the parameters are).
    """
    state = {name: t for name, t in model.state_dict().items() if not _is_tied_head(name, model.config)}
    out_dtype = dtype or next(iter(state.values())).dtype
    specs = {name: (t.shape, dtype or t.dtype) for name, t in state.items()}

    def get_tensor(name):
        return state[name].to(dtype) if dtype is not None else state[name]

    write_hf_checkpoint(
        path, model_config_dict(model, out_dtype), specs, get_tensor, max_shard_size,
        extra_files=[("generation_config.json", generation_config_text(model.config))],
    )
