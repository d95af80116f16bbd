"""nanotune/lora.py against PEFT + transformers (the oracle) on a tiny model.

Adapters are made non-trivial (lora_B != 0, modules_to_save changed) so that a wrong name, scale
or tie would change the logits. Tolerance: 1e-5 absolute on fp32 logits.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import hf_llama_from, tiny_model
from nanotune.build import count_parameters
from nanotune.checkpoint import CheckpointError
from nanotune.data.records import DataError
from nanotune.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    merged_copy,
    save_adapter,
    trainable_parameters,
)

peft = pytest.importorskip("peft")
TOLERANCE = 1e-5


def input_ids(seed: int = 1, vocab_size: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def make_adapter_non_trivial(model, seed: int = 7) -> None:
    """Random lora_B (it starts at zero) and a changed copy of each modules_to_save parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in trainable_parameters(model):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def peft_lora_config(**overrides):
    values = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", lora_dropout=0.0)
    values.update(overrides)
    return peft.LoraConfig(**values)


@contextlib.contextmanager
def quiet():
    """PEFT warns about tied embeddings and missing base-model names; the tests check behaviour instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_fresh_adapter_leaves_logits_unchanged():
    model = tiny_model().eval()
    ids = input_ids()
    with torch.no_grad():
        before = model(ids)
        apply_lora(model, r=4, alpha=8, targets="all-linear")
        after = model(ids)
    assert torch.equal(before, after)  # lora_B starts at zero, so the update is exactly zero


def test_parameter_names_and_trainable_set_match_peft():
    model = tiny_model()
    apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with quiet():
        peft_model = peft.get_peft_model(hf_llama_from(tiny_model()), peft_lora_config(modules_to_save=["lm_head"]))
    peft_trainable = {
        name.removeprefix("base_model.model.").replace(".default", "").replace("modules_to_save.", "")
        for name, p in peft_model.named_parameters() if p.requires_grad
    }
    ours = {name for name, _ in trainable_parameters(model)}
    assert ours == peft_trainable
    assert "model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())  # base name unchanged
    trainable, total = count_parameters(model)
    peft_trainable_count, peft_total = peft_model.get_nb_trainable_parameters()
    assert trainable == peft_trainable_count
    # PEFT's total also counts the frozen original lm_head it keeps beside the trained copy.
    assert total == peft_total - 256 * 64
    # By hand: 2 layers x (q: 4*(64+64) + v: 4*(64+32)) + lm_head 256*64.
    assert trainable == 2 * (4 * 128 + 4 * 96) + 256 * 64


def test_all_linear_targets_every_block_linear_but_not_lm_head_as_peft():
    model = apply_lora(tiny_model(), r=2, alpha=4, targets="all-linear")
    ours = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    with quiet():
        peft_model = peft.get_peft_model(hf_llama_from(tiny_model()), peft_lora_config(target_modules="all-linear"))
    theirs = sorted(
        name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    assert ours == theirs and len(ours) == 2 * 7
    # Saved as short names (PEFT 0.21 saves full paths); both select the same layers on load.
    assert model.lora_config.targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_unknown_target_is_an_error_listing_the_linear_layers():
    with pytest.raises(ValueError, match=r"\['qproj'\] match no linear layer.*gate_proj.*q_proj"):
        apply_lora(tiny_model(), r=2, alpha=4, targets=["qproj", "v_proj"])
    with pytest.raises(ValueError, match="lm_head.*modules_to_save"):
        apply_lora(tiny_model(), r=2, alpha=4, targets=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="'embeddings' matches no module"):
        apply_lora(tiny_model(), r=2, alpha=4, modules_to_save=["embeddings"])


def test_only_adapter_parameters_receive_gradients():
    model = apply_lora(tiny_model(), r=4, alpha=8, targets="all-linear", modules_to_save=["embed_tokens"])
    make_adapter_non_trivial(model)
    ids = input_ids()
    model(ids[:, :-1], labels=ids[:, 1:]).backward()
    trained = {name for name, _ in trainable_parameters(model)}
    for name, parameter in model.named_parameters():
        if name in trained:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    assert set(lora_state_dict(model)) == trained


def test_nanotune_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    base = tiny_model()
    model = apply_lora(tiny_model(), r=4, alpha=16, targets=["q_proj", "v_proj", "down_proj"],
                       modules_to_save=["embed_tokens", "lm_head"])
    make_adapter_non_trivial(model)
    save_adapter(model.eval(), tmp_path / "adapter", base_model_name_or_path="tiny-base")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    names = set(load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.lm_head.weight" in names and "base_model.model.model.embed_tokens.weight" in names

    ids = input_ids()
    with torch.no_grad(), quiet():
        ours = model(ids)
        peft_model = peft.PeftModel.from_pretrained(hf_llama_from(base), tmp_path / "adapter").eval()
        theirs = peft_model(input_ids=ids).logits
        plain = hf_llama_from(base)(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= TOLERANCE
    assert (ours - plain).abs().max() > 100 * TOLERANCE  # the adapter matters


def test_peft_adapter_loads_in_nanotune_with_the_same_logits(tmp_path):
    base = tiny_model()
    torch.manual_seed(3)
    with quiet():
        peft_model = peft.get_peft_model(
            hf_llama_from(base), peft_lora_config(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"],
                                                  modules_to_save=["embed_tokens", "lm_head"])
        )
    make_adapter_non_trivial(peft_model)
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    ids = input_ids()
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=ids).logits
        model = load_adapter(tiny_model(), tmp_path / "peft_adapter").eval()
        ours = model(ids)
    assert (ours - theirs).abs().max() <= TOLERANCE
    assert model.lora_config.r == 8 and model.lora_config.scale == 0.5
    assert count_parameters(model)[0] == peft_model.get_nb_trainable_parameters()[0]


def test_tied_embedding_adapter_round_trips_with_peft(tmp_path):
    base = tiny_model(tie_word_embeddings=True)
    model = apply_lora(tiny_model(tie_word_embeddings=True), r=4, alpha=8, modules_to_save=["embed_tokens"])
    make_adapter_non_trivial(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor
    save_adapter(model.eval(), tmp_path / "ours")
    ids = input_ids()
    with torch.no_grad(), quiet():
        ours = model(ids)
        peft_model = peft.PeftModel.from_pretrained(hf_llama_from(base), tmp_path / "ours").eval()
        assert (ours - peft_model(input_ids=ids).logits).abs().max() <= TOLERANCE
        # and back: PEFT's own save of a tied adapter loads into nanotune
        peft_model.save_pretrained(tmp_path / "theirs")
        reloaded = load_adapter(tiny_model(tie_word_embeddings=True), tmp_path / "theirs").eval()
        assert (reloaded(ids) - ours).abs().max() <= TOLERANCE


def test_merge_gives_the_unmerged_logits_with_base_names():
    base_names = set(tiny_model().state_dict())
    model = apply_lora(tiny_model(), r=4, alpha=8, targets="all-linear", modules_to_save=["lm_head"])
    make_adapter_non_trivial(model)
    ids = input_ids()
    with torch.no_grad():
        unmerged = model.eval()(ids)
        merge_lora(model)
        merged = model(ids)
    assert (unmerged - merged).abs().max() <= TOLERANCE
    assert set(model.state_dict()) == base_names
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_merged_copy_matches_and_leaves_the_training_model_alone(tied):
    model = apply_lora(tiny_model(tie_word_embeddings=tied), r=4, alpha=8, modules_to_save=["embed_tokens"])
    make_adapter_non_trivial(model)
    ids = input_ids()
    with torch.no_grad():
        before = model.eval()(ids)
        copy = merged_copy(model)
        assert (copy.eval()(ids) - before).abs().max() <= TOLERANCE
        assert torch.equal(model(ids), before)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)  # still training LoRA
    assert set(copy.state_dict()) == set(tiny_model(tie_word_embeddings=tied).state_dict())
    k_proj = model.model.layers[0].self_attn.k_proj.weight  # not a target: shared, not copied
    assert copy.model.layers[0].self_attn.k_proj.weight.data_ptr() == k_proj.data_ptr()
    assert (copy.lm_head.weight is copy.model.embed_tokens.weight) == tied


def test_load_adapter_lists_missing_unexpected_and_misshaped_tensors(tmp_path):
    model = apply_lora(tiny_model(), r=4, alpha=8)
    save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(5, 64)
    save_file(tensors, tmp_path / "a" / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError) as error:
        load_adapter(tiny_model(), tmp_path / "a")
    message = str(error.value)
    assert "missing tensors: model.layers.1.self_attn.v_proj.lora_B.weight" in message
    assert "unexpected tensors: model.layers.0.mlp.up_proj.lora_A.weight" in message
    assert "model.layers.0.self_attn.q_proj.lora_A.weight: (5, 64) in the file, model needs (4, 64)" in message


def test_unsupported_adapter_settings_name_file_line_and_field(tmp_path):
    model = apply_lora(tiny_model(), r=4, alpha=8)
    save_adapter(model, tmp_path / "a")
    config_file = tmp_path / "a" / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config["use_dora"] = True
    config_file.write_text(json.dumps(config, indent=2))
    line = next(i for i, text in enumerate(config_file.read_text().splitlines(), 1) if '"use_dora"' in text)
    with pytest.raises(DataError, match=rf"adapter_config.json:{line}: field 'use_dora' is True"):
        load_adapter(tiny_model(), tmp_path / "a")


FSDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from helpers import tiny_model
from nanotune import distributed
from nanotune.config import DistributedConfig
from nanotune.lora import apply_lora, save_adapter, trainable_parameters

def train(model, ids, scale):
    optimizer = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-2)
    for _ in range(3):
        (model(ids[:, :-1], labels=ids[:, 1:]) * scale).backward()
        optimizer.step()
        optimizer.zero_grad()

config = DistributedConfig(backend="gloo")
run = distributed.init_distributed(config, device="cpu")
ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
n_targets = ids[:, 1:].numel()
model = apply_lora(tiny_model(), r=4, alpha=8, targets="all-linear", modules_to_save=["lm_head"])
distributed.shard_model(model, run, config)
# each rank trains on its row; FSDP averages gradients, so world_size / n_targets makes it the global mean
train(model, ids[run.rank : run.rank + 1], run.world_size / n_targets)
save_adapter(model, sys.argv[2] + "/fsdp", run=run)
if run.is_main:
    reference = apply_lora(tiny_model(), r=4, alpha=8, targets="all-linear", modules_to_save=["lm_head"])
    train(reference, ids, 1 / n_targets)
    save_adapter(reference, sys.argv[2] + "/one_process")
distributed.shutdown(run)
"""


def test_lora_trains_under_fsdp2_like_one_process(tmp_path):
    """Two gloo processes with fully_shard per block: the saved adapter equals one process's (1e-5)."""
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "fsdp_lora.py"
    script.write_text(FSDP_SCRIPT)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(root), str(tmp_path)],
        capture_output=True, text=True, env=environment, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = load_file(tmp_path / "fsdp" / ADAPTER_WEIGHTS)
    reference = load_file(tmp_path / "one_process" / ADAPTER_WEIGHTS)
    assert sharded.keys() == reference.keys() and len(sharded) == 2 * 7 * 2 + 1
    for name in reference:
        assert (sharded[name] - reference[name]).abs().max() <= TOLERANCE, name
    lora_B = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    assert reference[lora_B].abs().max() > 1e-3  # training moved the adapter


def test_lora_applied_to_an_eval_model_drops_nothing_out():
    # load_pretrained gives an eval model; the adapter layers must not switch dropout back on.
    model = apply_lora(tiny_model().eval(), r=4, alpha=8, dropout=0.5, targets="all-linear")
    make_adapter_non_trivial(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids()), model(input_ids()))
    assert not any(m.training for m in model.modules())


def test_load_adapter_into_an_eval_model_leaves_dropout_off_so_two_forwards_agree(tmp_path):
    trained = apply_lora(tiny_model(), r=4, alpha=8, dropout=0.5, targets="all-linear")
    make_adapter_non_trivial(trained)
    save_adapter(trained, tmp_path / "adapter")
    ids = input_ids()
    model = load_adapter(tiny_model().eval(), tmp_path / "adapter")
    with torch.no_grad():
        first, second = model(ids), model(ids)
        merged = merged_copy(model)(ids)
    assert torch.equal(first, second)  # the LoRA dropout (p = 0.5) would make them differ
    assert (first - merged).abs().max() <= TOLERANCE
    lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert lora_layers and not any(m.training for m in model.modules())
    # A model in training mode gets LoRA layers in training mode (dropout on), as apply_lora gives.
    training = load_adapter(tiny_model().train(), tmp_path / "adapter")
    assert all(m.training for m in training.modules() if isinstance(m, LoRALinear))


def test_save_adapter_writes_the_recorded_base_path_and_none_for_a_model_from_scratch(tmp_path):
    scratch = apply_lora(tiny_model(), r=2, alpha=4)
    save_adapter(scratch, tmp_path / "scratch")
    assert json.loads((tmp_path / "scratch" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] is None
    recorded = apply_lora(tiny_model(), r=2, alpha=4, base_model_name_or_path="/models/base")
    save_adapter(recorded, tmp_path / "recorded")
    assert json.loads((tmp_path / "recorded" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "/models/base"
    reloaded = load_adapter(tiny_model(), tmp_path / "recorded")  # the adapter's own base travels on
    save_adapter(reloaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "/models/base"
