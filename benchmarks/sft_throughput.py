"""SFT: target tokens trained per second with packing, against padding each batch to its longest.

    python benchmarks/sft_throughput.py                       # the issue's model shape, max_length 1024
    python benchmarks/sft_throughput.py --n-conversations 64 --preset tiny   # a quick look

Real SFT sets are long-tailed: most conversations are short, a few run to `max_length`. The usual
Trainer recipe pads each batch (drawn in random order) to its longest conversation, so a batch
holding one long conversation makes every short one in it cost as much as the long one. Packing
(`PackedSFTDataset` + `collate_blocks`, as train_sft.py does) lays several conversations into
each row of max_length tokens, each attending only to itself (`document_ids`), so almost every
position is a real token.

Defaults are the usual ones: batches of 8 (HF Trainer's per_device_train_batch_size) and
max_length 1024 (nanotune's `data.max_length`). On the CPU the model's loss skips positions
without a target (`nanotune.loss.target_rows_only`), padding included, so what padding wastes here is
the transformer blocks' work on padding, not the lm_head's.

Both ways train the same generated conversations, once each, on the same model (two copies with
the same weights, each with its own AdamW), with the model's fused loss. Steps alternate between
the two (packed, padded, packed, ...) until both have gone through the set, so machine load hits
both alike. The figure is target tokens (reply tokens, the ones with a label) per second of
training time; both train exactly the same target tokens.

The conversations are token ids drawn at random, with the prompt's labels masked (-100) and the
reply's labels the next token, which is all the data classes and the model look at. Lengths: a
log-normal body (median `--median-length`) and a `--long-fraction` of conversations near
max_length.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    device_description,
    load_average,
    nanotune_model,
    preset_config,
    wait_until_quiet,
)

from nanotune.data.collate import PaddingCollator, collate_blocks  # noqa: E402
from nanotune.data.sft import (  # noqa: E402
    PackedSFTDataset,
    SFTDataset,
)
from nanotune.loss import IGNORE_INDEX  # noqa: E402

PAD_ID = 0


def conversation_lengths(n: int, max_length: int, median: int, long_fraction: float, rng: random.Random) -> list[int]:
    """Long-tailed lengths: log-normal around `median` (sigma 0.8), plus a few near max_length."""
    lengths = []
    for _ in range(n):
        if rng.random() < long_fraction:
            n_tokens = rng.randint(int(0.8 * max_length), max_length)
        else:
            n_tokens = int(rng.lognormvariate(math.log(median), 0.8))
        lengths.append(min(max_length, max(8, n_tokens)))
    return lengths


def make_conversation(n_tokens: int, vocab_size: int, rng: random.Random) -> dict:
    """input_ids and shifted labels of one conversation: the prompt is context, the reply is trained.

    As `nanotune.data.sft` makes them: labels[t] = input_ids[t + 1] where token t + 1 belongs to
    the reply, -100 elsewhere, and -100 at the last position.
    """
    input_ids = [rng.randrange(3, vocab_size) for _ in range(n_tokens)]
    prompt_length = max(1, int(n_tokens * rng.uniform(0.3, 0.7)))
    labels = [input_ids[t + 1] if t + 1 >= prompt_length else IGNORE_INDEX for t in range(n_tokens - 1)]
    return {"input_ids": input_ids, "labels": labels + [IGNORE_INDEX]}


def packed_batches(samples: SFTDataset, max_length: int, batch_size: int, rng: random.Random):
    """(batches of packed rows in random order, fraction of real tokens in the rows)."""
    blocks = PackedSFTDataset(samples, max_length, PAD_ID)
    order = list(range(len(blocks)))
    rng.shuffle(order)
    starts = range(0, len(order), batch_size)
    return [collate_blocks([blocks[i] for i in order[s : s + batch_size]]) for s in starts], blocks.stats["fill"]


def padded_batches(samples: SFTDataset, batch_size: int, rng: random.Random) -> list[dict]:
    """Random order, each batch right-padded to its longest (rounded up to a multiple of 8)."""
    collate = PaddingCollator(PAD_ID)
    order = list(range(len(samples)))
    rng.shuffle(order)
    return [collate([samples[i] for i in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)]


class Trainer:
    """One model copy and its AdamW, stepping through its batches and adding up the time."""

    def __init__(self, name: str, config, seed: int, batches: list[dict], chunk: int):
        self.name = name
        self.model = nanotune_model(config, seed, torch.float32, "cpu", loss_chunk_tokens=chunk)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
        self.batches = batches
        self.next = 0
        self.seconds = 0.0

    def step(self, batch: dict) -> float:
        started = time.perf_counter()
        n_targets = (batch["labels"] != IGNORE_INDEX).sum()
        loss_sum = self.model(**batch)
        (loss_sum / n_targets.clamp(min=1)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    def train_one(self) -> bool:
        if self.next >= len(self.batches):
            return False
        self.seconds += self.step(self.batches[self.next])
        self.next += 1
        return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="issue", help="model shape (see benchmarks/common.py)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--n-conversations", type=int, default=256)
    parser.add_argument("--median-length", type=int, default=100)
    parser.add_argument("--long-fraction", type=float, default=0.05, help="share of conversations near max_length")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step: packed rows, or conversations")
    parser.add_argument("--loss-chunk-tokens", type=int, default=512, help="model.loss_chunk_tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-load", type=float, default=0.0, help="wait for the 1-minute load to fall below this")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    config = preset_config(args.preset, args.max_length)
    rng = random.Random(args.seed)
    lengths = conversation_lengths(args.n_conversations, args.max_length, args.median_length, args.long_fraction, rng)
    samples = SFTDataset(make_conversation(n, config.vocab_size, rng) for n in lengths)
    n_target_tokens = sum(int((samples[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(samples)))
    packed, packed_fill = packed_batches(samples, args.max_length, args.batch_size, rng)
    padded = padded_batches(samples, args.batch_size, rng)
    padded_positions = sum(b["input_ids"].numel() for b in padded)
    padded_fill = sum(lengths) / padded_positions
    ranked = sorted(lengths)
    log(f"{len(samples)} conversations, {sum(lengths)} tokens, {n_target_tokens} target tokens; lengths: median "
        f"{ranked[len(ranked) // 2]}, 90th percentile {ranked[int(0.9 * len(ranked))]}, max {ranked[-1]}")
    log(f"packed: {len(packed)} steps of {args.batch_size} rows x {args.max_length}, "
        f"real-token fill {packed_fill:.2f}")
    log(f"padded: {len(padded)} steps of {args.batch_size} conversations, real-token fill {padded_fill:.2f}")

    load = wait_until_quiet(args.max_load, 600) if args.max_load else load_average()
    trainers = [Trainer("packed", config, args.seed, packed, args.loss_chunk_tokens),
                Trainer("padded", config, args.seed, padded, args.loss_chunk_tokens)]
    for trainer in trainers:  # warm-up on the first batch, not counted (thread pools, allocator, AdamW state)
        trainer.step(trainer.batches[0])
    log(f"training both through the set, steps alternating (1-minute load {load:.2f}) ...")
    while any([trainer.train_one() for trainer in trainers]):  # a list, not a generator: both step each round
        pass
    load_after = load_average()

    rows = {}
    for trainer in trainers:
        rows[trainer.name] = {"steps": len(trainer.batches), "seconds": trainer.seconds,
                              "target_tokens_per_s": n_target_tokens / trainer.seconds}
        log(f"{trainer.name:7s} {trainer.seconds:8.1f} s  {n_target_tokens / trainer.seconds:8.1f} target tokens/s")
    speedup = rows["packed"]["target_tokens_per_s"] / rows["padded"]["target_tokens_per_s"]
    log(f"packing / padding: {speedup:.2f}x target tokens per second "
        f"(1-minute load {load:.2f} before, {load_after:.2f} after)")
    log(f"device: {device_description('cpu')}")
    if args.json:
        print(json.dumps({
            "device": device_description("cpu"), "preset": args.preset, "max_length": args.max_length,
            "batch_size": args.batch_size, "n_conversations": len(samples), "target_tokens": n_target_tokens,
            "packed_fill": packed_fill, "padded_fill": padded_fill, **rows,
            "packing_over_padding": speedup, "load_before": load, "load_after": load_after,
        }, indent=2))


if __name__ == "__main__":
    main()
