"""Held-out accuracy of a model on the example's sums: greedy answers scored by `exact_number`.

    python examples/arith_grpo/evaluate.py --model runs/arith_grpo/sft/final \
        --prompts runs/arith_grpo/data/heldout.jsonl --json runs/arith_grpo/eval/before.json

The same path as GRPO's own held-out evaluation (`nanotune.grpo.evaluate_prompts`: the prompts
rendered with the template, greedy completions, the reward functions), with the accuracy split
into the sums with and without a carry, where the sloppy teacher's demonstrations differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere: nanotune is importable

import torch  # noqa: E402

from nanotune.checkpoint import load_pretrained  # noqa: E402
from nanotune.config import GRPOConfig, RunConfig  # noqa: E402
from nanotune.data.prompts import encode_prompt_records, read_prompt_records  # noqa: E402
from nanotune.data.templates import generation_stop_ids  # noqa: E402
from nanotune.distributed import Run  # noqa: E402
from nanotune.grpo import evaluate_prompts  # noqa: E402
from nanotune.rewards import load_rewards  # noqa: E402
from nanotune.tokenizer import Tokenizer  # noqa: E402

TEMPLATE = "base"


def has_carry(prompt: str) -> bool:
    a, b = (int(x) for x in prompt.split("+"))
    return (a % 10) + (b % 10) >= 10


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an HF-format model folder with its tokenizer")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tokenizer = Tokenizer.from_file(args.model)
    model = load_pretrained(args.model).eval()
    stop_ids = generation_stop_ids(TEMPLATE, tokenizer)
    config = RunConfig(grpo=GRPOConfig(rewards=["exact_number"], max_new_tokens=6))
    config.eval.batch_size = 100
    rewards = load_rewards(config.grpo)
    records = encode_prompt_records(read_prompt_records([args.prompts]), tokenizer, TEMPLATE, 64)
    figures, correct = {}, 0.0
    for name, chosen in (("carry", [r for r in records if has_carry(r.prompt)]),
                         ("no_carry", [r for r in records if not has_carry(r.prompt)])):
        result = evaluate_prompts(model, chosen, rewards, config, Run(), tokenizer, stop_ids)
        figures[f"accuracy_{name}"] = 100 * result["eval_exact_number"]
        figures[f"n_{name}"] = result["eval_prompts"]
        correct += result["eval_exact_number"] * result["eval_prompts"]
    figures["n_all"] = figures["n_carry"] + figures["n_no_carry"]
    figures["accuracy_all"] = 100 * correct / figures["n_all"]
    print(json.dumps(figures))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.json.with_suffix(".tmp")
        temporary.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        temporary.replace(args.json)


if __name__ == "__main__":
    main()
