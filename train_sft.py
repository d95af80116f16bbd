"""Supervised fine-tuning on conversations: only the assistant's replies (and their EOS) are trained.

    python train_sft.py --config configs/tiny_sft.toml
    torchrun --nproc_per_node 8 train_sft.py --config configs/belle_llama7b_sft.toml

Builds the config, tokenizer, model and encoded conversations, then hands them to the loop in
nanotune/train.py. Conversations are padded per micro-batch (optionally grouped by length), or
packed several to a row with `data.packing = true`.
"""

from __future__ import annotations

import numpy as np

from nanotune import distributed
from nanotune.build import start_run
from nanotune.cli import run_main, setup_logging
from nanotune.config import SFTDataConfig
from nanotune.data.collate import PaddingCollator, collate_blocks
from nanotune.data.sft import PackedSFTDataset, SFTDataset, build_sft_dataset
from nanotune.data.template_check import resolve_template, saved_chat_template
from nanotune.data.templates import generation_stop_ids
from nanotune.preflight import sft_max_length
from nanotune.train import train


def main(argv: list[str] | None = None):
    setup_logging()
    config, run, tokenizer, model = start_run(argv, SFTDataConfig)
    data = config.data
    # The chat template: checked against the model's own Jinja where it has one ("auto" picks it).
    template = resolve_template(data.template, tokenizer, check=data.template_check)
    # Generation stops at the end-of-turn token the replies are trained to end with (and EOS).
    model.config.eos_token_id = generation_stop_ids(template, tokenizer)
    # No conversation longer than the positions the model has learnt (one warning line when capped).
    max_length = sft_max_length(data.max_length, model.config, data.truncation)

    def encode(files):
        return build_sft_dataset(
            files, tokenizer, template, max_length=max_length, truncation=data.truncation,
            train_on_prompt=data.train_on_prompt, format=data.format, skip_invalid=data.skip_invalid,
            reasoning_turns=data.reasoning_turns,
        )

    train_samples = encode(data.train_files)
    valid_samples = encode(data.valid_files) if data.valid_files else None
    if valid_samples is None and data.valid_fraction > 0:
        train_samples, valid_samples = split_samples(train_samples, data.valid_fraction, config.seed)

    if data.packing:
        train_data = PackedSFTDataset(train_samples, data.max_length, tokenizer.pad_id)
        valid_data = PackedSFTDataset(valid_samples, data.max_length, tokenizer.pad_id) if valid_samples else None
        collate, lengths = collate_blocks, None
    else:
        train_data, valid_data = train_samples, valid_samples
        collate = PaddingCollator(tokenizer.pad_id)
        lengths = list(train_samples.lengths) if data.group_by_length else None  # similar lengths per micro-batch

    result = train(config, run, model, tokenizer, train_data, valid_data, collate, lengths=lengths,
                   chat_template=saved_chat_template(template, tokenizer))
    distributed.shutdown(run)
    return result


def split_samples(samples, valid_fraction: float, seed: int):
    """A seeded random `valid_fraction` of the encoded conversations held out for evaluation."""
    order = np.random.default_rng(seed).permutation(len(samples))
    n_valid = max(1, int(round(valid_fraction * len(samples))))

    def subset(indices):
        return SFTDataset({k: v.tolist() for k, v in samples[int(i)].items()} for i in sorted(indices))

    return subset(order[n_valid:]), subset(order[:n_valid])


if __name__ == "__main__":
    run_main(main)
