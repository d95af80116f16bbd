"""A training checkpoint runs no code: hostile `.metadata`, `.distcp` and `rng_rank*.pt` files are
refused with one line naming the file, and the marker file their pickles would create stays absent."""

from __future__ import annotations

import io
import pathlib
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict

from helpers import tiny_config
from nanotune.model import Llama
from nanotune.safe_dcp import (
    CheckpointStateError, check_checkpoint_folder, load_rng_state, load_state_safely, read_metadata,
)


class Hostile:
    """A pickle that, when loaded by a full unpickler, creates `marker` (standing for any code)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = Llama(tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).backward()
    optimizer.step()
    return model, optimizer


def _state(model, optimizer) -> dict:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


@pytest.fixture
def checkpoint(tmp_path):
    """A real DCP folder of a tiny model + AdamW, written as nanotune's save_training_state does."""
    model, optimizer = _model_and_optimizer(seed=0)
    folder = tmp_path / "state"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_state(model, optimizer), checkpoint_id=str(folder))
    return folder, model, optimizer


def _load_into_fresh(folder):
    model, optimizer = _model_and_optimizer(seed=1)
    state = _state(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_state_safely(state, folder)
    return state


def test_intact_checkpoint_loads_the_same_tensors(checkpoint):
    folder, model, optimizer = checkpoint
    check_checkpoint_folder(folder)
    loaded = _load_into_fresh(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded["model"][name], tensor), name
    saved_optimizer = _state(model, optimizer)["optimizer"]
    for name, moments in saved_optimizer["state"].items():
        for key, value in moments.items():
            assert torch.equal(loaded["optimizer"]["state"][name][key], value), (name, key)
    assert loaded["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert tuple(loaded["optimizer"]["param_groups"][0]["betas"]) == (0.9, 0.999)


def _assert_refused(error: pytest.ExceptionInfo, path: pathlib.Path, marker: pathlib.Path):
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(str(path)), message
    assert not marker.exists()


def test_hostile_metadata_is_refused_and_runs_nothing(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    marker = tmp_path / "MARKER"
    (folder / ".metadata").write_bytes(pickle.dumps(Hostile(marker)))
    for attempt in (lambda: check_checkpoint_folder(folder), lambda: _load_into_fresh(folder)):
        with pytest.raises(CheckpointStateError) as error:
            attempt()
        _assert_refused(error, folder / ".metadata", marker)
    assert "pathlib" in str(error.value)  # names what the pickle asked for
    pickle.loads((folder / ".metadata").read_bytes())  # the oracle: a plain unpickler runs it
    assert marker.exists()


def _replace_item(folder: pathlib.Path, want, payload: bytes) -> str:
    """Point the first item of kind `want` at `payload`, appended to its .distcp file; the metadata
    is rewritten with legitimate classes only, as an attacker with write access could."""
    metadata = read_metadata(folder / ".metadata")
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata[index.fqn], want):
            break
    distcp = folder / info.relative_path
    offset = distcp.stat().st_size
    with open(distcp, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(payload), info.transform_descriptors)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return info.relative_path


def _torch_saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_hostile_non_tensor_item_in_distcp_is_refused_and_runs_nothing(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    marker = tmp_path / "MARKER"
    name = _replace_item(folder, BytesStorageMetadata, _torch_saved(Hostile(marker)))
    for attempt in (lambda: check_checkpoint_folder(folder), lambda: _load_into_fresh(folder)):
        with pytest.raises(CheckpointStateError) as error:
            attempt()
        _assert_refused(error, folder / name, marker)
    # The oracle: torch's own reader and planner run it (torch.load(weights_only=False)).
    model, optimizer = _model_and_optimizer(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(_state(model, optimizer), checkpoint_id=str(folder))
    assert marker.exists()


def test_hostile_tensor_item_in_distcp_is_refused(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    marker = tmp_path / "MARKER"
    name = _replace_item(folder, TensorStorageMetadata, _torch_saved(Hostile(marker)))
    with pytest.raises(CheckpointStateError) as error:
        _load_into_fresh(folder)
    _assert_refused(error, folder / name, marker)


def test_metadata_pointing_outside_the_folder_is_refused(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    metadata = read_metadata(folder / ".metadata")
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = _StorageInfo("../outside.distcp", info.offset, info.length, None)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointStateError, match="outside the folder"):
        check_checkpoint_folder(folder)


def test_truncated_or_incomplete_checkpoint_names_the_file(checkpoint):
    folder, _, _ = checkpoint
    distcp = next(folder.glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:100])
    with pytest.raises(CheckpointStateError, match="truncated") as error:
        check_checkpoint_folder(folder)
    assert str(error.value).startswith(str(distcp))
    with pytest.raises(CheckpointStateError) as error:
        _load_into_fresh(folder)
    assert str(error.value).startswith(str(distcp)) and "\n" not in str(error.value)
    (folder / ".metadata").unlink()
    with pytest.raises(CheckpointStateError, match="missing"):
        check_checkpoint_folder(folder)


def test_rng_state_loads_and_hostile_rng_file_is_refused(tmp_path):
    good = tmp_path / "rng_rank0.pt"
    torch.save({"python": [3, [1, 2], None], "numpy": ["MT19937", torch.zeros(3), 0, 0, 0.0],
                "torch": torch.get_rng_state()}, good)
    assert torch.equal(load_rng_state(good)["torch"], torch.get_rng_state())
    marker = tmp_path / "MARKER"
    hostile = tmp_path / "rng_rank1.pt"
    torch.save(Hostile(marker), hostile)
    with pytest.raises(CheckpointStateError) as error:
        load_rng_state(hostile)
    _assert_refused(error, hostile, marker)
    raw = tmp_path / "rng_rank2.pt"
    raw.write_bytes(pickle.dumps(Hostile(marker)))  # a bare pickle, torch.load's legacy format
    with pytest.raises(CheckpointStateError) as error:
        load_rng_state(raw)
    _assert_refused(error, raw, marker)
