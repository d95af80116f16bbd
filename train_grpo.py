"""Online RL with verifiable rewards (GRPO): sample completions of prompts, score them, reinforce.

    python train_grpo.py --config examples/arith_grpo/grpo.toml   # after stages 1-4 of its run.sh
    python train_grpo.py --config grpo.toml --model.path runs/sft/final --grpo.rewards='["exact_number"]'
    torchrun --nproc_per_node 8 train_grpo.py --config grpo.toml

What can be checked without the model is checked first (the config, every reward function named
in it, every prompt record and the fields the built-in rewards read), so a typo costs seconds;
then the tokenizer and the model (usually an SFT model: `model.path`) load, the prompts are
rendered with the chat template the model was trained with, and the loop in nanotune/grpo.py runs.
"""

from __future__ import annotations

import numpy as np

from nanotune import distributed
from nanotune.build import start_run
from nanotune.cli import run_main, setup_logging
from nanotune.config import PromptDataConfig, load_config
from nanotune.data.prompts import encode_prompt_records, read_prompt_records
from nanotune.data.template_check import resolve_template, saved_chat_template
from nanotune.data.templates import generation_stop_ids
from nanotune.grpo import train_grpo
from nanotune.preflight import check_data_files
from nanotune.rewards import check_reward_fields, load_rewards


def main(argv: list[str] | None = None):
    setup_logging()
    # Before the model loads (start_run reads the same config again, cheaply, and loads it).
    config = load_config(argv, PromptDataConfig)
    rewards = load_rewards(config.grpo)
    check_data_files(config)
    data = config.data
    train_records = read_prompt_records(data.train_files, data.skip_invalid)
    valid_records = read_prompt_records(data.valid_files, data.skip_invalid) if data.valid_files else []
    check_reward_fields(rewards, train_records + valid_records)

    config, run, tokenizer, model = start_run(argv, PromptDataConfig)
    template = resolve_template(data.template, tokenizer, check=data.template_check)
    stop_ids = generation_stop_ids(template, tokenizer)  # a completion ends with the end-of-turn token
    model.config.eos_token_id = stop_ids
    train_records = encode_prompt_records(train_records, tokenizer, template, data.max_prompt_length)
    valid_records = encode_prompt_records(valid_records, tokenizer, template, data.max_prompt_length)
    if not valid_records and data.valid_fraction > 0:
        train_records, valid_records = split_records(train_records, data.valid_fraction, config.seed)

    result = train_grpo(config, run, model, tokenizer, train_records, valid_records or None, rewards, stop_ids,
                        chat_template=saved_chat_template(template, tokenizer))
    distributed.shutdown(run)
    return result


def split_records(records, valid_fraction: float, seed: int):
    """A seeded random `valid_fraction` of the prompts held out for evaluation."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_valid = max(1, int(round(valid_fraction * len(records))))
    return [records[i] for i in sorted(order[n_valid:])], [records[i] for i in sorted(order[:n_valid])]


if __name__ == "__main__":
    run_main(main)
