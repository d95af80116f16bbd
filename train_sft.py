"""Supervised fine-tuning on conversations: only the assistant's replies (and their EOS) are trained.

    python train_sft.py --config configs/tiny_sft.toml
    torchrun --nproc_per_node 8 train_sft.py --config configs/belle_llama7b_sft.toml

Builds the config, tokenizer, model and encoded conversations, then hands them to the loop in
nanotune/train.py. Conversations are padded per micro-batch (optionally grouped by length), or
packed several to a row with `data.packing = true`. Weighted `data.train_files` (mixing) are
encoded, split and packed per source, so a packed row holds one source's conversations.
"""

from __future__ import annotations

import numpy as np

from nanotune import distributed
from nanotune.build import start_run
from nanotune.cli import run_main, setup_logging
from nanotune.config import SFTDataConfig, weighted_sources
from nanotune.data.collate import PaddingCollator, collate_blocks
from nanotune.data.sampler import MixedDataset
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

    # Weighted data.train_files: each source is encoded, split and packed on its own, then mixed.
    sources = weighted_sources(data.train_files)
    train_parts = [encode([source.path]) for source in sources] if sources else [encode(data.train_files)]
    valid_samples = encode(data.valid_files) if data.valid_files else None
    if valid_samples is None and data.valid_fraction > 0:
        splits = [split_samples(part, data.valid_fraction, config.seed) for part in train_parts]
        train_parts = [train_part for train_part, _ in splits]
        valid_parts = [valid_part for _, valid_part in splits]
        valid_samples = valid_parts[0] if not sources else MixedDataset(valid_parts, *_weights_and_names(sources))

    if data.packing:
        train_parts = [PackedSFTDataset(part, data.max_length, tokenizer.pad_id) for part in train_parts]
        valid_data = PackedSFTDataset(valid_samples, data.max_length, tokenizer.pad_id) if valid_samples else None
        collate = collate_blocks
    else:
        valid_data = valid_samples
        collate = PaddingCollator(tokenizer.pad_id)
    train_data = train_parts[0] if not sources else MixedDataset(train_parts, *_weights_and_names(sources))
    # Padded batches of similar lengths (packed rows are all of one length).
    lengths = list(train_data.lengths) if data.group_by_length and not data.packing else None

    result = train(config, run, model, tokenizer, train_data, valid_data, collate, lengths=lengths,
                   chat_template=saved_chat_template(template, tokenizer))
    distributed.shutdown(run)
    return result


def _weights_and_names(sources) -> tuple[list[float], list[str]]:
    return [source.weight for source in sources], [source.path for source in sources]


def split_samples(samples, valid_fraction: float, seed: int):
    """A seeded random `valid_fraction` of the encoded conversations held out for evaluation."""
    order = np.random.default_rng(seed).permutation(len(samples))
    n_valid = max(1, int(round(valid_fraction * len(samples))))

    def subset(indices):
        return SFTDataset({k: v.tolist() for k, v in samples[int(i)].items()} for i in sorted(indices))

    return subset(order[n_valid:]), subset(order[:n_valid])


if __name__ == "__main__":
    run_main(main)
