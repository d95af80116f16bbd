"""Continued pretraining on plain-text corpora, packed into full sequences.

    python train_pt.py --config configs/tiny_pt.toml
    torchrun --nproc_per_node 8 train_pt.py --config configs/llama7b_pt_embeddings.toml

Builds the config, tokenizer, model and packed data, then hands them to the loop in
nanotune/train.py. With a merged (larger) tokenizer the model's vocabulary grows first; with
`train.trainable = "embeddings"` only the embeddings and the LM head train (the BELLE /
Chinese-LLaMA stage after vocabulary extension).
"""

from __future__ import annotations

from pathlib import Path

from nanotune import distributed
from nanotune.build import start_run
from nanotune.cli import run_main, setup_logging
from nanotune.config import PretrainDataConfig
from nanotune.data.collate import collate_blocks
from nanotune.data.pretrain import build_pretrain_datasets
from nanotune.preflight import check_seq_len_fits_model
from nanotune.train import train


def main(argv: list[str] | None = None):
    setup_logging()
    config, run, tokenizer, model = start_run(argv, PretrainDataConfig)
    data = config.data
    check_seq_len_fits_model(data.seq_len, model.config)  # before any tokenising

    def build_datasets():
        return build_pretrain_datasets(
            tokenizer,
            train_files=data.train_files,
            valid_files=data.valid_files,
            valid_fraction=data.valid_fraction,
            seq_len=data.seq_len,
            cache_dir=data.cache_dir or str(Path(config.output_dir) / "cache"),
            text_fields=tuple(data.text_fields),
            field_separator=data.field_separator,
            txt_mode=data.txt_mode,
            skip_invalid=data.skip_invalid,
            seed=config.seed,
            num_workers=data.num_workers or None,
        )

    # Rank 0 tokenises into the cache; the other ranks then find it there.
    if run.is_main:
        train_data, valid_data = build_datasets()
    distributed.barrier(run)
    if not run.is_main:
        train_data, valid_data = build_datasets()

    result = train(config, run, model, tokenizer, train_data, valid_data, collate_blocks)
    distributed.shutdown(run)
    return result


if __name__ == "__main__":
    run_main(main)
