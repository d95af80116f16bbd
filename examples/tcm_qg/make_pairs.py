"""Preference pairs for stage three of the example, made from its own QG conversations.

    python examples/tcm_qg/make_pairs.py --input OUT/data/qg_train.jsonl --output OUT/data/pairs_train.jsonl

For every conversation (passage + answer -> question) the pair is
    chosen    the real question
    rejected  a question written about ANOTHER passage: of 64 such questions drawn at random, the
              one that shares the most character bigrams with the real one ("川芎的功效是什么？"
              against "酸枣仁有哪些功效？"), so that it asks the same kind of thing about the wrong
              entity: the mistake the SFT model makes most (see README.md)
written in nanotune's canonical preference form (TRL's prompt / chosen / rejected messages).
Seeded: the same pairs on every run. Train and dev pairs are drawn within their own split.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from nanotune.data.records import iter_json_records  # noqa: E402
from nanotune.files import write_lines_atomically  # noqa: E402

CANDIDATES = 64


def bigrams(text: str) -> set[str]:
    return {text[i : i + 2] for i in range(len(text) - 1)}


def passage_of(user: str) -> str:
    return user.split("\n答案：")[0]  # the instruction's passage part (formats.TCM_QG_INSTRUCTION)


def make_pairs(conversations: list[list[dict]], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for messages in conversations:
        user, question = messages[0]["content"], messages[1]["content"]
        others = [m[1]["content"] for m in conversations if passage_of(m[0]["content"]) != passage_of(user)]
        drawn = rng.sample(others, min(CANDIDATES, len(others)))
        rejected = max(drawn, key=lambda other: (len(bigrams(other) & bigrams(question)), other != question))
        if rejected == question:
            continue
        pairs.append({"prompt": [{"role": "user", "content": user}], "chosen": [{"role": "assistant", "content": question}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="conversations ({'messages': ...} JSONL)")
    parser.add_argument("--output", required=True, type=Path, help="pairs JSONL to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    conversations = [record["messages"] for _, record in iter_json_records(args.input)]
    pairs = make_pairs(conversations, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_lines_atomically(args.output, (json.dumps(pair, ensure_ascii=False) for pair in pairs))
    print(f"{len(pairs)} pairs -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
