"""HF-format folders in and out, checked with transformers as the oracle (and, for a sharded
FSDP model, against the folder one process writes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import hf_llama_from, tiny_model

from nanotune.checkpoint import CheckpointError, load_pretrained, parse_dtype, parse_size, save_pretrained


def _hf_model(**overrides):
    return hf_llama_from(tiny_model(seed=11, **overrides))


@pytest.mark.parametrize("max_shard_size", ["1GB", "40KB"])
def test_checkpoint_saved_by_transformers_loads_with_the_same_logits(tmp_path, max_shard_size):
    hf = _hf_model(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_size == "40KB")
    model = load_pretrained(tmp_path)
    input_ids = torch.randint(0, 256, (2, 17))
    torch.testing.assert_close(model(input_ids), hf(input_ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_checkpoints_load_with_weights_only(tmp_path, sharded):
    """Older checkpoints are pickles: read with weights_only=True, never unpickling arbitrary code."""
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if sharded:
        names = list(state)
        halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}
        for file_name, part in halves.items():
            torch.save({n: state[n] for n in part}, tmp_path / file_name)
        weight_map = {n: f for f, part in halves.items() for n in part}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    model = load_pretrained(tmp_path)
    input_ids = torch.randint(0, 256, (2, 11))
    torch.testing.assert_close(model(input_ids), hf(input_ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_saved_model_loads_in_transformers_with_the_same_logits(tmp_path, tied):
    import transformers

    model = tiny_model(seed=12, tie_word_embeddings=tied).eval()
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.randint(0, 256, (2, 17))
    torch.testing.assert_close(hf(input_ids).logits, model(input_ids), atol=1e-5, rtol=0)
    again = load_pretrained(tmp_path)
    torch.testing.assert_close(again(input_ids), model(input_ids), atol=0, rtol=0)
    assert not list(tmp_path.parent.glob(tmp_path.name + ".tmp")), "temporary folder left behind"


def test_sharded_save_writes_an_index_that_transformers_reads(tmp_path):
    import transformers

    model = tiny_model(seed=13).eval()
    save_pretrained(model, tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 2
    assert all((tmp_path / f).exists() for f in shard_files)
    assert set(index["weight_map"]) == set(model.state_dict())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(hf(input_ids).logits, model(input_ids), atol=1e-5, rtol=0)


def test_load_converts_dtype_and_builds_nothing_on_meta(tmp_path):
    save_pretrained(tiny_model(seed=14), tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())


def test_save_pretrained_replaces_an_existing_folder_completely(tmp_path):
    save_pretrained(tiny_model(seed=15), tmp_path / "m", max_shard_size="60KB")
    save_pretrained(tiny_model(seed=16), tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors.index.json").exists()
    torch.testing.assert_close(load_pretrained(tmp_path / "m").lm_head.weight, tiny_model(seed=16).lm_head.weight)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_pretrained(tmp_path)


def test_truncated_safetensors_file_is_a_clear_error_naming_the_file(tmp_path):
    save_pretrained(tiny_model(seed=17), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_pretrained(tmp_path)


def test_missing_tensor_is_an_error_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    save_pretrained(tiny_model(seed=18), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path)
    message = str(error.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors: model.layers.0.extra.weight" in message
    assert "model.norm.weight: (3,)" in message


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    save_pretrained(tiny_model(seed=19), tmp_path, max_shard_size="60KB")
    (tmp_path / "model-00002-of-{:05d}.safetensors".format(len(list(tmp_path.glob("model-*"))))).unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-\d+\.safetensors, which is missing"):
        load_pretrained(tmp_path)


def test_parse_size_reads_hf_units():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("five gigs")


def test_dtype_names_accept_both_spellings_and_list_them_when_unknown():
    for long, short, dtype in [("float32", "fp32", torch.float32), ("bfloat16", "bf16", torch.bfloat16),
                               ("float16", "fp16", torch.float16), ("float64", "fp64", torch.float64)]:
        assert parse_dtype(long) is parse_dtype(short) is dtype
    with pytest.raises(ValueError, match=r"unknown dtype 'half': expected one of float32, fp32, bfloat16, bf16"):
        parse_dtype("half")


SHARDED_SAVE = """
import sys
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from helpers import tiny_model
from nanotune.checkpoint import save_pretrained
from nanotune.distributed import Run

dist.init_process_group("gloo")
run = Run(rank=dist.get_rank(), world_size=dist.get_world_size())
model = tiny_model(seed=20, tie_word_embeddings=sys.argv[2] == "tied")
for block in model.model.layers:
    fully_shard(block)
fully_shard(model)
assert type(model.model.embed_tokens.weight).__name__ == "DTensor"
save_pretrained(model, sys.argv[1], max_shard_size="60KB", dtype="bf16", run=run)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_sharded_model_saves_the_same_files_as_one_process(tmp_path, tied):
    """Two ranks (torchrun, gloo), each holding half of every parameter, write what one process writes."""
    tests = Path(__file__).resolve().parent
    script = tmp_path / "save.py"
    script.write_text(SHARDED_SAVE)
    env = {**os.environ, "PYTHONPATH": f"{tests.parent}{os.pathsep}{tests}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path / "sharded"), "tied" if tied else "untied"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    save_pretrained(tiny_model(seed=20, tie_word_embeddings=tied), tmp_path / "single", max_shard_size="60KB",
                    dtype=torch.bfloat16)
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len(names) > 4 and names == sorted(p.name for p in (tmp_path / "sharded").iterdir())
    for name in names:
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert not (tmp_path / "sharded.tmp").exists()
