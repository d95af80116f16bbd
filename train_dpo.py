"""Direct preference optimisation and its family (cDPO, IPO, hinge/RSO, SimPO, ORPO) on pairs.

    python train_dpo.py --config examples/tcm_qg/dpo.toml        # the example's stage three
    torchrun --nproc_per_node 8 train_dpo.py --config dpo.toml --dpo.loss=simpo --dpo.share_prompt=true

Builds the config, tokenizer, model (usually the SFT model: `model.path`), the encoded pairs and
the reference model, then hands them to the loop in nanotune/train.py with a
`PreferenceObjective`: a step's loss is the mean over the pairs of the global batch. Pairs are
padded one sequence per row, packed (`data.packing`), or packed with the prompt computed once per
pair (`dpo.share_prompt`).
"""

from __future__ import annotations

from nanotune import distributed
from nanotune.build import start_run
from nanotune.cli import run_main, setup_logging
from nanotune.config import PreferenceDataConfig
from nanotune.data.template_check import resolve_template, saved_chat_template
from nanotune.data.templates import generation_stop_ids
from nanotune.preference import PreferenceObjective, batching, encode_pair_files, make_reference
from nanotune.train import train


def main(argv: list[str] | None = None):
    setup_logging()
    config, run, tokenizer, model = start_run(argv, PreferenceDataConfig)
    data, dpo = config.data, config.dpo
    template = resolve_template(data.template, tokenizer, check=data.template_check)
    model.config.eos_token_id = generation_stop_ids(template, tokenizer)

    train_pairs, valid_pairs = encode_pair_files(config, tokenizer, template)
    layout = "shared" if dpo.share_prompt else "packed" if data.packing else "padded"
    train_data, collate = batching(train_pairs, layout, tokenizer.pad_id, data.max_length)
    valid_data, _ = batching(valid_pairs, layout, tokenizer.pad_id, data.max_length)
    reference = make_reference(config, run, model, [train_pairs, valid_pairs], collate)

    objective = PreferenceObjective(dpo.loss, beta=dpo.beta, label_smoothing=dpo.label_smoothing,
                                    simpo_gamma=dpo.simpo_gamma, sft_weight=dpo.sft_weight, reference=reference)
    result = train(config, run, model, tokenizer, train_data, valid_data, collate, objective=objective,
                   chat_template=saved_chat_template(template, tokenizer))
    distributed.shutdown(run)
    return result


if __name__ == "__main__":
    run_main(main)
