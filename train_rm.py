"""Reward modelling on preference pairs: a scalar `score` head, -logsigmoid(r_chosen - r_rejected - margin).

    python train_rm.py --config examples/tcm_qg/dpo.toml --output_dir runs/tcm_qg/rm   # the same pairs
    torchrun --nproc_per_node 8 train_rm.py --config rm.toml

The model (usually the SFT model) loses its lm_head and gains a `score` head (preference.py,
`add_score_head`), read at the last token of prompt + reply. `final/` is a HF
`*ForSequenceClassification` folder (`num_labels = 1`, a `pad_token_id` that no sequence ends
with), so transformers loads it and gives the same scores; `python -m nanotune.evaluate --pairs`
scores held-out pairs with it.
"""

from __future__ import annotations

from nanotune import distributed
from nanotune.build import start_run
from nanotune.cli import run_main, setup_logging
from nanotune.config import ConfigError, PreferenceDataConfig
from nanotune.data.template_check import resolve_template, saved_chat_template
from nanotune.data.templates import generation_stop_ids
from nanotune.preference import RewardObjective, add_score_head, batching, encode_pair_files, reward_pad_id
from nanotune.train import train


def main(argv: list[str] | None = None):
    setup_logging()
    config, run, tokenizer, model = start_run(argv, PreferenceDataConfig)
    if config.lora.enabled:
        raise ConfigError("train_rm.py trains the whole model and its score head; LoRA reward models are not "
                          "supported yet (remove [lora])")
    data = config.data
    template = resolve_template(data.template, tokenizer, check=data.template_check)
    end_ids = generation_stop_ids(template, tokenizer)
    add_score_head(model, seed=config.seed)  # trains with the rest, whatever train.trainable says
    model.config.pad_token_id = reward_pad_id(tokenizer, end_ids)

    train_pairs, valid_pairs = encode_pair_files(config, tokenizer, template)
    layout = "shared" if config.reward.share_prompt else "packed" if data.packing else "padded"
    train_data, collate = batching(train_pairs, layout, tokenizer.pad_id, data.max_length)
    valid_data, _ = batching(valid_pairs, layout, tokenizer.pad_id, data.max_length)

    result = train(config, run, model, tokenizer, train_data, valid_data, collate,
                   objective=RewardObjective(config.reward.margin), chat_template=saved_chat_template(template, tokenizer))
    distributed.shutdown(run)
    return result


if __name__ == "__main__":
    run_main(main)
