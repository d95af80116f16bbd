"""merge.py: LoRA merging checked in transformers, deltas checked bit for bit, checksums.

Oracles: transformers' LlamaForCausalLM loading the merged folder (logits within 1e-5 of the
unmerged LoRA model); the target's own tensors (make-delta then delta, compared with
torch.equal); numpy's IEEE float32 arithmetic for the count of elements an fp32 delta cannot
give back exactly; the system's `sha256sum -c` for the SHA256SUMS format.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merge
from helpers import tiny_model
from nanotune.checkpoint import save_pretrained, weight_files
from nanotune.lora import apply_lora, save_adapter, trainable_parameters

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
SHARD = "60KB"  # the tiny model (about 330 KB in fp32) in several files


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in weight_files(folder):
        tensors.update(load_file(file))
    return tensors


def extended_copy(base, vocab_size: int, seed: int, fine_tune: bool):
    """`base` with a vocabulary grown to `vocab_size` rows (new rows random); optionally with every
    weight moved as a fine-tune moves it (decayed a little, plus noise)."""
    model = tiny_model(seed=seed, vocab_size=vocab_size)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            old = base.state_dict()[name]
            rows = old.shape[0]
            tensor[:rows] = old
            if fine_tune:
                tensor.mul_(0.97).add_(torch.randn(tensor.shape, generator=generator) * 0.002)
    return model


def test_merged_lora_loads_in_transformers_with_the_unmerged_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    base = tiny_model()
    save_pretrained(base, tmp_path / "base", max_shard_size=SHARD)
    (tmp_path / "base" / "tokenizer.json").write_text("base tokenizer")
    model = extended_copy(base, vocab_size=300, seed=1, fine_tune=False)
    apply_lora(model, r=4, alpha=16, targets="all-linear", modules_to_save=["embed_tokens", "lm_head"])
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, parameter in trainable_parameters(model):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    save_adapter(model.eval(), tmp_path / "adapter")
    (tmp_path / "adapter" / "tokenizer.json").write_text("extended tokenizer")

    merge.main(["lora", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                "--out", str(tmp_path / "merged"), "--max-shard-size", SHARD])

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids).logits
        assert (ours - theirs).abs().max() <= TOLERANCE
        base_logits = tiny_model()(ids.clamp(max=255))  # (B, T, 256)
        assert (ours[..., :256] - base_logits).abs().max() > 100 * TOLERANCE  # the adapter matters
    assert hf.config.vocab_size == 300
    assert (tmp_path / "merged" / "tokenizer.json").read_text() == "extended tokenizer"
    assert len(weight_files(tmp_path / "merged")) > 1
    assert not (tmp_path / "merged.tmp").exists()


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_make_delta_then_delta_gives_back_the_target_exactly(tmp_path, stored):
    base = tiny_model()
    target = extended_copy(base, vocab_size=300, seed=4, fine_tune=True)
    save_pretrained(base, tmp_path / "base", max_shard_size=SHARD, dtype=stored)
    save_pretrained(target, tmp_path / "target", max_shard_size=SHARD, dtype=stored)
    (tmp_path / "target" / "tokenizer.model").write_bytes(b"extended")

    report = merge.main(["make-delta", "--base", str(tmp_path / "base"), "--target", str(tmp_path / "target"),
                         "--out", str(tmp_path / "delta"), "--max-shard-size", SHARD])
    merge.main(["delta", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "delta"),
                "--out", str(tmp_path / "rebuilt"), "--check", str(tmp_path / "delta" / "SHA256SUMS")])

    wanted, rebuilt = all_tensors(tmp_path / "target"), all_tensors(tmp_path / "rebuilt")
    assert wanted.keys() == rebuilt.keys()
    for name in wanted:
        assert rebuilt[name].dtype == stored and torch.equal(rebuilt[name], wanted[name]), name
    assert report["inexact"] == 0 and report["elements"] == sum(t.numel() for t in wanted.values())
    assert json.loads((tmp_path / "rebuilt" / "config.json").read_text())["vocab_size"] == 300
    assert (tmp_path / "rebuilt" / "tokenizer.model").read_bytes() == b"extended"


def test_fp32_delta_reports_exactly_the_elements_it_cannot_give_back(tmp_path):
    base = tiny_model()
    target = extended_copy(base, vocab_size=256, seed=5, fine_tune=True)
    save_pretrained(base, tmp_path / "base")
    save_pretrained(target, tmp_path / "target")
    report = merge.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta", dtype=torch.float32)
    merge.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "rebuilt")

    wanted, base_tensors = all_tensors(tmp_path / "target"), all_tensors(tmp_path / "base")
    rebuilt = all_tensors(tmp_path / "rebuilt")
    inexact_by_numpy = 0
    for name, t in wanted.items():
        t, b = t.numpy(), base_tensors[name].numpy()
        inexact_by_numpy += int(((b + (t - b)) != t).sum())  # numpy float32: IEEE round-to-nearest
    inexact_rebuilt = sum(int((rebuilt[n] != wanted[n]).sum()) for n in wanted)
    assert inexact_by_numpy > 0  # a fine-tune does have such elements: fp32 deltas are not exact
    assert report["inexact"] == inexact_by_numpy == inexact_rebuilt
    assert 0 < report["max_error"] < 1e-8


def test_sha256sums_are_in_sha256sum_format(tmp_path):
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum not installed")
    save_pretrained(tiny_model(), tmp_path / "base", max_shard_size=SHARD)
    save_pretrained(extended_copy(tiny_model(), 256, seed=6, fine_tune=True), tmp_path / "target", max_shard_size=SHARD)
    merge.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta", max_shard_size=SHARD)
    result = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path / "delta", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = {line.split("  ", 1)[1] for line in (tmp_path / "delta" / "SHA256SUMS").read_text().splitlines()}
    assert listed == {p.name for p in (tmp_path / "delta").iterdir()} - {"SHA256SUMS"}


def test_corrupted_input_fails_check_naming_the_file(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "base", max_shard_size=SHARD)
    save_pretrained(extended_copy(tiny_model(), 256, seed=7, fine_tune=True), tmp_path / "target", max_shard_size=SHARD)
    merge.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta", max_shard_size=SHARD)
    shard = sorted((tmp_path / "delta").glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    shard.write_bytes(bytes(data))
    command = [sys.executable, str(ROOT / "merge.py"), "delta", "--base", str(tmp_path / "base"),
               "--delta", str(tmp_path / "delta"), "--out", str(tmp_path / "rebuilt"),
               "--check", str(tmp_path / "delta" / "SHA256SUMS")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert f"{shard.name}: SHA-256 does not match" in result.stderr
    assert not (tmp_path / "rebuilt").exists() and not (tmp_path / "rebuilt.tmp").exists()


def test_adapter_for_another_model_is_refused_listing_what_does_not_fit(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "base")
    other = apply_lora(tiny_model(hidden_size=32, num_attention_heads=2, num_key_value_heads=1), r=2, alpha=4)
    save_adapter(other, tmp_path / "adapter")
    with pytest.raises(merge.MergeError, match=r"q_proj.weight: lora_B \(32, 2\) @ lora_A \(2, 32\) does not fit"):
        merge.merge_lora_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
