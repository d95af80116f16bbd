"""Every shipped config loads (no unknown key, valid values): a typo in configs/ fails here, not on a cluster."""

from pathlib import Path

import pytest

from nanotune.config import PretrainDataConfig, SFTDataConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path):
    data_class = SFTDataConfig if "sft" in path.name else PretrainDataConfig
    config = load_config(["--config", str(path)], data_class=data_class)
    assert config.data.train_files, "every shipped config names its training data"


def test_belle_config_has_the_belle_hyper_parameters():
    path = next(p for p in CONFIGS if p.name == "belle_llama7b_sft.toml")
    config = load_config(["--config", str(path)], data_class=SFTDataConfig)
    assert (config.train.epochs, config.train.batch_size, config.optim.lr) == (2, 2, 8e-6)
    assert (config.optim.weight_decay, config.optim.warmup_ratio, config.optim.schedule) == (1e-5, 0.05, "cosine")
    assert config.train.mixed_precision in ("bf16", "fp16")


def test_embeddings_stage_config_trains_only_the_embeddings():
    path = next(p for p in CONFIGS if p.name == "llama7b_pt_embeddings.toml")
    assert load_config(["--config", str(path)]).train.trainable == ["embeddings"]
