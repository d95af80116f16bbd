"""Reading training checkpoints without running code from them.

A training checkpoint (`checkpoints/step_N/state/`) is a `torch.distributed.checkpoint` folder:

    .metadata        a pickle of `dcp.metadata.Metadata`: every item's name, shape, dtype, and where
                     its bytes are (file, offset, length)
    __R_0.distcp     rank R's items end to end; a tensor item is a `torch.save` of the tensor, a
                     non-tensor item (an optimizer's `lr`, `betas`, ...) a `torch.save` of the value

torch's own `FileSystemReader` reads `.metadata` with `pickle.load`, and its default load planner
reads non-tensor items with `torch.load(weights_only=False)`: both run whatever a pickle asks for,
so a checkpoint folder someone else could write to (a shared disk, a downloaded run) would run code
on `--checkpoint.resume=true`. `SafeFileSystemReader` closes both doors:

* `.metadata` is unpickled by `MetadataUnpickler`, which builds only the classes DCP's metadata is
  made of (listed in `METADATA_GLOBALS`, found by pickling a real model + AdamW checkpoint) and
  refuses every other global, so a pickle that names `os.system` fails before anything is called;
  item locations must be plain file names inside the folder (no `../`).
* non-tensor items are unpickled with `torch.load(weights_only=True)` before the planner sees them;
  tensor items already are (torch's reader loads them with `weights_only=True` itself).

Anything refused is a `CheckpointStateError` naming the file. `load_state_safely` is the
`dcp.load` call to use; `check_checkpoint_folder` is a cheap check (no tensor is read) that a
folder is complete, for choosing which checkpoint to resume from; `load_rng_state` reads a
`rng_rank*.pt` file the same way.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from .checkpoint import CheckpointError

METADATA_FILE = ".metadata"


class CheckpointStateError(CheckpointError):
    """A training checkpoint that cannot be trusted or read: the message names the file."""


# Every global a `.metadata` pickle of torch 2.x names: DCP's metadata dataclasses, torch.Size,
# dtypes and layouts, and the Path of the folder it was saved to. Each of them, called with any
# arguments a pickle can hold, only builds a value.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
METADATA_GLOBALS = {
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
} | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that can build DCP metadata and nothing else (no function call, no import)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint's metadata never holds")
        return super().find_class(module, name)


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The `Metadata` of a DCP folder's `.metadata` file, unpickled by `MetadataUnpickler` and checked."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointStateError(f"{path}: missing (an incomplete checkpoint)") from None
    except Exception as error:  # a broken or hostile pickle fails in many ways; none of them runs code
        raise CheckpointStateError(f"{path}: refused, not a checkpoint's metadata ({_first_line(error)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointStateError(f"{path}: refused, holds a {type(metadata).__name__}, not a checkpoint's metadata")
    for index, info in metadata.storage_data.items():
        where = getattr(info, "relative_path", None)
        if not (isinstance(where, str) and where and Path(where).name == where and where not in (".", "..")):
            raise CheckpointStateError(f"{path}: refused, item {index.fqn!r} points outside the folder ({where!r})")
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            raise CheckpointStateError(f"{path}: refused, item {index.fqn!r} has a bad offset or length")
    return metadata


def _load_weights_only(stream, where: str):
    """`torch.load(weights_only=True)`: tensors and plain values only; anything else is refused."""
    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointStateError(f"{where}: refused, not plain tensors and values ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    """The news in an exception's text, on one line (torch's weights_only message is a page of
    advice; the global it refused is what matters)."""
    text = str(error)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"it names {refused.group(1)}, which only a full unpickler would call"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` that runs no code from the checkpoint (see the module docstring).

    Use it as `dcp.load(state, storage_reader=SafeFileSystemReader(folder))`, or through
    `load_state_safely`, which also turns DCP's wrapped failure into one line.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.folder = Path(path)
        self._file_being_read = METADATA_FILE

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _slice_file(self, file, sinfo):
        self._file_being_read = sinfo.relative_path  # so that a failure can name the file
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, _WeightsOnlyBytes(planner, self))
        except CheckpointStateError:
            raise
        except Exception as error:  # a truncated file, a tensor that is not weights-only, a shape mismatch
            path = self.folder / self._file_being_read
            raise CheckpointStateError(f"{path}: cannot be loaded ({_first_line(error)})") from None


class _WeightsOnlyBytes:
    """The load planner, except that a non-tensor item is unpickled with `weights_only=True` here
    and handed on re-saved, so the planner's own `torch.load(weights_only=False)` reads only bytes
    that we wrote from plain values."""

    def __init__(self, planner, reader: SafeFileSystemReader):
        self.planner, self.reader = planner, reader

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        plain = _load_weights_only(value, str(self.reader.folder / self.reader._file_being_read))
        resaved = io.BytesIO()
        torch.save(plain, resaved)
        resaved.seek(0)
        self.planner.load_bytes(read_item, resaved)

    def resolve_tensor(self, read_item):
        return self.planner.resolve_tensor(read_item)

    def commit_tensor(self, read_item, tensor) -> None:
        self.planner.commit_tensor(read_item, tensor)

    def __getattr__(self, name):  # anything else a later torch's reader asks of the planner
        return getattr(self.planner, name)


def load_state_safely(state: dict, folder: str | os.PathLike) -> None:
    """`dcp.load(state, ...)` in place from `folder` with `SafeFileSystemReader`.

    DCP wraps any failure of any rank in a `CheckpointException` (a BaseException, with every
    rank's traceback in its text); the first `CheckpointStateError` among them is raised instead.
    `.metadata` is read once first, so that a refused one is reported as itself (DCP would go
    on to look for a per-rank `__R.metadata` and report that it is missing).
    """
    read_metadata(Path(folder) / METADATA_FILE)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(folder))
    except CheckpointException as wrapped:
        failures = [exc for exc, _ in wrapped.failures.values()]
        ours = [exc for exc in failures if isinstance(exc, CheckpointStateError)]
        if ours:
            raise ours[0] from None
        first = failures[0] if failures else wrapped
        raise CheckpointStateError(f"{folder}: cannot be loaded ({_first_line(first)})") from None


def check_checkpoint_folder(folder: str | os.PathLike) -> Metadata:
    """Check that a DCP folder is complete and safe without reading its tensors; return its metadata.

    `.metadata` is unpickled safely, every file it names must exist and be long enough for every
    item in it (a truncated `.distcp` fails here), and non-tensor items are test-read with
    `weights_only=True`. Raises `CheckpointStateError` naming the file; cheap enough to run on
    each checkpoint while looking for the newest intact one.
    """
    folder = Path(folder)
    metadata = read_metadata(folder / METADATA_FILE)
    byte_items = {name for name, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        path = folder / info.relative_path
        if info.relative_path not in sizes:
            if not path.is_file():
                raise CheckpointStateError(f"{path}: missing (an incomplete checkpoint)")
            sizes[info.relative_path] = path.stat().st_size
        if info.offset + info.length > sizes[info.relative_path]:
            raise CheckpointStateError(
                f"{path}: truncated ({sizes[info.relative_path]} bytes, item {index.fqn!r} ends at byte "
                f"{info.offset + info.length})"
            )
        if index.fqn in byte_items and not info.transform_descriptors:
            with open(path, "rb") as f:
                f.seek(info.offset)
                _load_weights_only(io.BytesIO(f.read(info.length)), str(path))
    return metadata


def load_rng_state(path: str | os.PathLike) -> dict:
    """A `rng_rank*.pt` file: `torch.load(weights_only=True)`, and the keys `set_rng_state` needs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointStateError(f"{path}: missing (an incomplete checkpoint)")
    state = _load_weights_only(path, str(path))
    if not (isinstance(state, dict) and {"python", "numpy", "torch"} <= set(state)):
        raise CheckpointStateError(f"{path}: refused, not an RNG state (expected the keys python, numpy, torch)")
    return state
