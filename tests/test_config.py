"""Configs: TOML + dotted overrides, clear errors with suggestions, and a round trip through config.toml."""

import pytest

from nanotune.config import ConfigError, PretrainDataConfig, SFTDataConfig, load_config, save_config


def _write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_toml_then_overrides_in_both_spellings(tmp_path):
    path = _write(tmp_path, 'output_dir = "out"\nseed = 3\n[optim]\nlr = 1e-3\n[data]\ntrain_files = ["a.txt"]\n')
    config = load_config(["--config", path, "--optim.lr=2e-5", "--train.max_steps", "7", "--data.train_files", "b*.txt"])
    assert config.output_dir == "out" and config.seed == 3
    assert config.optim.lr == 2e-5
    assert config.train.max_steps == 7
    assert config.data.train_files == ["b*.txt"]  # a bare string for a list key is a one-element list
    assert isinstance(config.data, PretrainDataConfig)


def test_override_values_are_parsed_as_toml(tmp_path):
    config = load_config(["--optim.betas=[0.9, 0.99]", "--log.progress_bar=false", "--optim.lr", "1",
                          "--data.valid_files", '["x.jsonl", "y.jsonl"]', "--train.trainable", "embeddings"],
                         data_class=SFTDataConfig)
    assert config.optim.betas == [0.9, 0.99]
    assert config.log.progress_bar is False
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.data.valid_files == ["x.jsonl", "y.jsonl"]
    assert config.train.trainable == ["embeddings"]


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'; did you mean 'optim\.lr'\?"):
        load_config(["--optim.lrr=1e-5"])
    path = _write(tmp_path, "[train]\nbatch_sise = 4\n")
    with pytest.raises(ConfigError, match=r"run\.toml: unknown key 'train\.batch_sise'; did you mean 'train\.batch_size'"):
        load_config(["--config", path])
    with pytest.raises(ConfigError, match=r"unknown section 'optimizer'; did you mean 'optim'"):
        load_config(["--optimizer.lr=1"])


def test_wrong_types_and_values_are_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected int, got 'four'"):
        load_config(["--train.batch_size", "four"])
    path = _write(tmp_path, '[optim]\nschedule = "exponential"\n')
    with pytest.raises(ConfigError, match="optim.schedule must be cosine, linear or constant"):
        load_config(["--config", path])
    with pytest.raises(ConfigError, match=r"invalid TOML"):
        load_config(["--config", _write(tmp_path, "[optim\nlr = 1")])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(["--config", str(tmp_path / "absent.toml")])


def test_lora_table_enables_lora(tmp_path):
    assert load_config([]).lora.enabled is False
    assert load_config(["--config", _write(tmp_path, "[lora]\nr = 4\n")]).lora.enabled is True
    assert load_config(["--lora.r=4"]).lora.enabled is True


def test_saved_config_reads_back_equal(tmp_path):
    config = load_config(["--optim.lr=1.5e-5", "--data.template=belle", '--output_dir=a "quoted" dir'], data_class=SFTDataConfig)
    path = save_config(config, tmp_path)
    again = load_config(["--config", str(path)], data_class=SFTDataConfig)
    assert again == config


def test_unknown_template_or_format_fails_at_start_up():
    with pytest.raises(ConfigError, match="data.template 'llama4' is not one of llama2, llama3, chatml"):
        load_config(["--data.template=llama4"], data_class=SFTDataConfig)
    with pytest.raises(ConfigError, match="data.format 'csv' is not auto or one of messages"):
        load_config(["--data.format=csv"], data_class=SFTDataConfig)


def test_weighted_train_files_read_from_toml_round_trip_and_bad_entries_name_the_key(tmp_path):
    from nanotune.config import DataFile, to_toml

    path = _write(tmp_path, '[data]\ntrain_files = [{path = "a.jsonl", weight = 0.7}, {path = "b*.jsonl", weight = 3}]\n')
    config = load_config(["--config", path], data_class=SFTDataConfig)
    assert config.data.train_files == [DataFile("a.jsonl", 0.7), DataFile("b*.jsonl", 3.0)]
    again = _write(tmp_path, to_toml(config))
    assert load_config(["--config", again], data_class=SFTDataConfig).data.train_files == config.data.train_files
    assert load_config(["--data.train_files=a.jsonl"]).data.train_files == ["a.jsonl"]  # plain strings as before
    bad = {
        '[{path = "a.jsonl", wieght = 0.7}]': "data.train_files: entry {path = 'a.jsonl', wieght = 0.7}: unknown key 'wieght'",
        '[{weight = 0.7}]': "missing key 'path'",
        '[{path = "a.jsonl", weight = "x"}]': "weight: expected float",
        '[{path = "a.jsonl", weight = 0}]': "data.train_files: a.jsonl: weight must be a number > 0",
        '["a.jsonl", {path = "b.jsonl", weight = 1}]': "data.train_files: a.jsonl has no weight while other entries",
    }
    for value, message in bad.items():
        with pytest.raises(ConfigError) as error:
            load_config([f"--data.train_files={value}"], data_class=SFTDataConfig)
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
