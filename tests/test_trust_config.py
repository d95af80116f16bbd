"""Every config mistake is one line at start-up, naming the key: values the optimizer, the loop or
the final export would reject later, shapes that do not divide, LoRA switched on or off by
argument order, and suggestions that name the right section for HF names."""

import pytest
import torch

from nanotune.config import ConfigError, PretrainDataConfig, SFTDataConfig, load_config


def _write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("override, message", [
    ("--optim.lr=0", "optim.lr must be a finite number > 0"),
    ("--optim.lr=-1e-4", "optim.lr must be a finite number > 0"),
    ("--optim.lr=nan", "optim.lr must be a finite number > 0"),
    ("--optim.lr=inf", "optim.lr must be a finite number > 0"),
    ("--optim.eps=-1e-8", "optim.eps must be >= 0"),
    ("--optim.betas=[0.9, 1.0]", r"optim.betas must be two numbers in \[0, 1\)"),
    ("--optim.betas=[0.9]", r"optim.betas must be two numbers in \[0, 1\)"),
    ("--optim.betas=[-0.1, 0.9]", r"optim.betas must be two numbers in \[0, 1\)"),
    ("--optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("--log.every_steps=0", "log.every_steps must be >= 1"),
    ("--train.max_steps=-1", "train.max_steps must be >= 0"),
    ("--data.seq_len=0", "data.seq_len must be >= 1"),
    ("--lora.alpha=0", "lora.alpha must be > 0"),
    ("--lora.r=0", "lora.r must be >= 1"),
    ("--lora.dropout=1.0", r"lora.dropout must be in \[0, 1\)"),
    ("--train.neftune_alpha=-5", "train.neftune_alpha must be >= 0"),
    ("--checkpoint.final_dtype=int4", "checkpoint.final_dtype must be empty"),
    ("--checkpoint.max_shard_size=5XB", "checkpoint.max_shard_size '5XB' is not a size"),
    ("--checkpoint.max_shard_size=GB", "checkpoint.max_shard_size 'GB' is not a size"),
    ("--model.num_attention_heads=5", "model.hidden_size 64 is not divisible by model.num_attention_heads 5"),
    ("--model.num_key_value_heads=3", "model.num_attention_heads 4 is not divisible by model.num_key_value_heads 3"),
    ("--train.device=tpu", "train.device must be auto, cpu or cuda, not 'tpu'"),
])
def test_bad_values_fail_at_start_up_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config([override])
    assert "\n" not in str(error.value)


def test_sft_max_length_must_be_positive():
    with pytest.raises(ConfigError, match="data.max_length must be >= 1"):
        load_config(["--data.max_length=0"], data_class=SFTDataConfig)


def test_cuda_without_cuda_is_refused_before_any_work():
    if torch.cuda.is_available():
        assert load_config(["--train.device=cuda"]).train.device == "cuda"
        return
    with pytest.raises(ConfigError, match="train.device = cuda, but no CUDA device is available"):
        load_config(["--train.device=cuda"])


def test_a_loaded_model_brings_its_own_shape():
    config = load_config(["--model.path=some/model", "--model.num_attention_heads=5"])
    assert config.model.num_attention_heads == 5  # ignored when loading: not checked


@pytest.mark.parametrize("given, canonical", [("bf16", "bfloat16"), ("FP32", "float32"), ("float16", "float16"), ("", "")])
def test_final_dtype_aliases_are_accepted_as_one_spelling(given, canonical):
    assert load_config([f"--checkpoint.final_dtype={given}"]).checkpoint.final_dtype == canonical


@pytest.mark.parametrize("size", ["5GB", "500mb", "2GiB", "1.5 TB", "1000"])
def test_shard_sizes_in_parse_size_grammar_are_accepted(size):
    from nanotune.checkpoint import parse_size

    assert load_config([f"--checkpoint.max_shard_size={size}"]).checkpoint.max_shard_size == size
    assert parse_size(size) > 0  # the same grammar as the writer that uses it


def test_lora_off_in_the_file_stays_off_whatever_the_argument_order(tmp_path):
    path = _write(tmp_path, "[lora]\nenabled = false\nr = 4\n")
    assert load_config(["--config", path, "--lora.r=16"]).lora.enabled is False
    assert load_config(["--lora.r=16", "--config", path]).lora.enabled is False
    assert load_config(["--config", path, "--lora.enabled=true", "--lora.r=16"]).lora.enabled is True
    assert load_config(["--lora.r=16", "--lora.enabled=false"]).lora.enabled is False
    assert load_config(["--lora.enabled=false", "--lora.r=16"]).lora.enabled is False
    # No word about `enabled` anywhere: a [lora] table or a --lora.* override switches LoRA on.
    assert load_config(["--lora.r=16"]).lora.enabled is True
    assert load_config(["--config", _write(tmp_path, "[lora]\nr = 4\n"), "--lora.alpha=8"]).lora.enabled is True
    assert load_config(["--config", _write(tmp_path, "seed = 1\n"), "--lora.alpha=8"]).lora.enabled is True


def test_lora_with_a_trainable_selection_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train.trainable = \['embeddings'\] has no effect with LoRA"):
        load_config(["--lora.enabled=true", "--train.trainable=embeddings"])
    with pytest.raises(ConfigError, match="train.freeze_bottom_fraction has no effect with LoRA"):
        load_config(["--config", _write(tmp_path, "[lora]\n[train]\nfreeze_bottom_fraction = 0.5\n")])
    assert load_config(["--train.trainable=embeddings"]).train.trainable == ["embeddings"]  # without LoRA: fine


def test_unknown_section_in_the_toml_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.toml: unknown section \[trainer\]; did you mean \[train\]\?"):
        load_config(["--config", _write(tmp_path, "[trainer]\nmax_steps = 3\n")])
    with pytest.raises(ConfigError, match=r"unknown section \[optimizer\]; did you mean \[optim\]\?"):
        load_config(["--config", _write(tmp_path, "[optimizer]\nlr = 3\n")])
    with pytest.raises(ConfigError, match=r"unknown section \[zzz\]; the sections are model, tokenizer"):
        load_config(["--config", _write(tmp_path, "[zzz]\nx = 3\n")])
    with pytest.raises(ConfigError, match=r"unknown section 'trainer'; did you mean 'train'\?"):
        load_config(["--trainer.max_steps=3"])


@pytest.mark.parametrize("argv, suggestion", [
    (["--optim.learnig_rate=1e-4"], "optim.lr"),
    (["--optim.learning_rate=1e-4"], "optim.lr"),
    (["--train.learning_rate=1e-4"], "optim.lr"),
    (["--learning_rate=1e-4"], "optim.lr"),
    (["--trainer.learning_rate=1e-4"], "optim.lr"),
    (["--train.per_device_train_batch_size=4"], "train.batch_size"),
    (["--optim.per_device_train_batch_size=4"], "train.batch_size"),
    (["--train.gradient_accumulation_steps=4"], "train.grad_accum"),
    (["--train.lr=1e-4"], "optim.lr"),
    (["--train.logging_steps=5"], "log.every_steps"),
    (["--data.model_max_length=512"], "data.seq_len"),
    (["--train.lora_r=8"], "lora.r"),
])
def test_hf_names_and_misplaced_keys_suggest_our_key_in_its_section(argv, suggestion):
    with pytest.raises(ConfigError, match=rf"did you mean '{suggestion}'\?"):
        load_config(argv)


def test_hf_names_in_the_toml_suggest_the_right_section(tmp_path):
    path = _write(tmp_path, "[train]\nlearning_rate = 1e-4\n")
    with pytest.raises(ConfigError, match=r"run\.toml: unknown key 'train\.learning_rate'; did you mean 'optim\.lr'\?"):
        load_config(["--config", path])
    path = _write(tmp_path, "[data]\nmodel_max_length = 512\n")
    with pytest.raises(ConfigError, match=r"did you mean 'data\.max_length'\?"):
        load_config(["--config", path], data_class=SFTDataConfig)
    with pytest.raises(ConfigError, match=r"did you mean 'data\.seq_len'\?"):
        load_config(["--config", path], data_class=PretrainDataConfig)
