"""Write the arithmetic data of the GRPO example: a two-digit number plus a one-digit number
("47 + 8"), every one of the 900 sums in exactly one of three sets.

    python examples/arith_grpo/make_data.py --out runs/arith_grpo/data [--seed 0]

    sft.jsonl        demonstrations {"messages": [user "47 + 8", assistant "55"]} from a *sloppy
                     teacher*: where the units digits carry, it forgets the carry (writes 45 for
                     47 + 8) 60% of the time. Each of its 400 sums is demonstrated 5 times, the
                     teacher erring independently each time, so SFT learns the teacher's habit
                     (mostly wrong on a carry, sometimes right), not one fixed answer per sum.
    grpo.jsonl       prompts {"prompt": "47 + 8", "answer": "55"}: the true sums, read only by the
                     reward function (exact_number), never shown to the model as text
    heldout.jsonl    prompts of the same kind for the before/after accuracy, no pair shared with
                     the other two files
    corpus.txt       every problem written out once, for the tokenizer

A sum without a carry is demonstrated correctly, so the SFT model gets those right; one with a
carry is demonstrated wrongly more often than rightly, so greedy decoding writes the forgotten
carry while sampling still finds the true sum now and then. That is the situation RL with a
verifier is for: the reward tells which of the model's own answers are right, and GRPO makes
them the likely ones.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FORGET_CARRY = 0.6  # the teacher's share of wrong answers on sums whose units digits carry
N_HELDOUT, N_GRPO = 200, 300  # and the other 400 sums are demonstrated
DEMONSTRATIONS_PER_SUM = 5


def teacher_answer(a: int, b: int, rng: random.Random) -> int:
    if (a % 10) + (b % 10) >= 10 and rng.random() < FORGET_CARRY:
        return a + b - 10  # the carry into the tens is forgotten
    return a + b


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10)]
    rng.shuffle(pairs)
    heldout = pairs[:N_HELDOUT]
    grpo = pairs[N_HELDOUT : N_HELDOUT + N_GRPO]
    sft = pairs[N_HELDOUT + N_GRPO :]
    args.out.mkdir(parents=True, exist_ok=True)

    def write(name, lines):
        temporary = args.out / f"{name}.tmp"
        temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        temporary.replace(args.out / name)

    write("sft.jsonl", [json.dumps({"messages": [{"role": "user", "content": f"{a} + {b}"},
                                                 {"role": "assistant", "content": str(teacher_answer(a, b, rng))}]})
                        for a, b in sft for _ in range(DEMONSTRATIONS_PER_SUM)])
    for name, chosen in (("grpo.jsonl", grpo), ("heldout.jsonl", heldout)):
        write(name, [json.dumps({"prompt": f"{a} + {b}", "answer": str(a + b)}) for a, b in chosen])
    write("corpus.txt", [f"{a} + {b}\n{a + b}" for a, b in pairs])
    carries = sum((a % 10) + (b % 10) >= 10 for a, b in heldout)
    print(f"wrote {args.out}: {len(sft) * DEMONSTRATIONS_PER_SUM} demonstrations of {len(sft)} sums, {len(grpo)} GRPO prompts, {len(heldout)} held-out "
          f"({carries} of them with a carry)")


if __name__ == "__main__":
    main()
