"""DPO: pairs trained per second, padded vs packed vs shared prompt, and against TRL's DPOTrainer.

    python benchmarks/dpo_step.py                     # 3 runs of every variant, CPU
    python benchmarks/dpo_step.py --runs 1 --steps 3  # a quick look

Every variant trains the same pairs on the same model (HF's init, seeded), with a frozen copy as
the reference (the default of both nanotune and TRL), AdamW, fp32:

  padded   one row per sequence (prompt + reply), right-padded to the batch's longest
  packed   whole pairs packed into rows of 2 * max_length tokens (block-diagonal attention)
  shared   packed, the prompt computed once per pair (`dpo.share_prompt`): chosen and rejected
           attend to one copy of it
  trl      TRL's DPOTrainer (sigmoid loss, padded: TRL cannot pack DPO), on transformers'
           LlamaForCausalLM with the same weights; timed from its own step callbacks

The pairs are random token ids whose prompt is half the tokens of each sequence (prompt and reply
lengths drawn from the same range), each reply ending with EOS as TRL appends it. The figure is
pairs per second of step time (forward of policy and reference, backward, optimizer step), the
median over the timed steps of a run after warm-up steps; the spread is over runs, which
alternate the variants so that machine load hits all alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_description, load_average, nanotune_model, wait_until_quiet  # noqa: E402

from nanotune.data.preference import PackedPairs, PreferenceCollator  # noqa: E402
from nanotune.model import LlamaConfig  # noqa: E402
from nanotune.preference import FrozenCopy, PreferenceObjective  # noqa: E402

EOS = 2


def make_pairs(n: int, prompt_range: tuple[int, int], reply_range: tuple[int, int], vocab_size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def ids(low, high, eos=False):
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        body = torch.randint(3, vocab_size, (length - eos,), generator=generator).tolist()
        return body + [EOS] * eos

    return [{"prompt": ids(*prompt_range), "chosen": ids(*reply_range, eos=True), "rejected": ids(*reply_range, eos=True)}
            for _ in range(n)]


def batches_of(pairs, layout: str, batch_pairs: int, max_length: int):
    """The same pairs per step in every layout: step k trains pairs [k*B, (k+1)*B)."""
    steps = [pairs[i : i + batch_pairs] for i in range(0, len(pairs) - batch_pairs + 1, batch_pairs)]
    if layout == "padded":
        collate = PreferenceCollator(0, "padded")
        return [collate(step) for step in steps]
    collate = PreferenceCollator(0, layout, row_length=2 * max_length)
    batches = []
    for step in steps:
        rows = PackedPairs(step, 2 * max_length, layout)
        batches.append(collate([rows[i] for i in range(len(rows))]))
    return batches


def time_nanotune(config, pairs, layout, args) -> float:
    """Median seconds per step of nanotune's DPO on `layout`."""
    model = nanotune_model(config, seed=0, dtype=torch.float32, device="cpu")
    objective = PreferenceObjective("sigmoid", beta=0.1, reference=FrozenCopy(FrozenCopy.of(model)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = batches_of(pairs, layout, args.batch_pairs, args.max_length)
    times = []
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        start = time.perf_counter()
        loss_sum, _ = objective.loss(model, batch)
        (loss_sum / args.batch_pairs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def word_tokenizer(vocab_size: int):
    """A transformers tokenizer whose every id is one whitespace-separated word: `w17` -> 17."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0", bos_token="w1",
                                   eos_token=f"w{EOS}")


def time_trl(config, pairs, args) -> float | None:
    """Median seconds per step of TRL's DPOTrainer on the same pairs, or None where TRL is missing."""
    try:
        import datasets
        import transformers
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return None
    model = nanotune_model(config, seed=0, dtype=torch.float32, device="cpu")
    hf_config = transformers.LlamaConfig(**model.config.to_hf_dict())
    hf = transformers.LlamaForCausalLM(hf_config)
    hf.load_state_dict(model.state_dict(), strict=False)

    def text(ids):
        return " ".join(f"w{i}" for i in ids)

    # TRL appends EOS to chosen and rejected; ours already end with it, which TRL then leaves alone.
    rows = [{"prompt": text(p["prompt"]), "chosen": " " + text(p["chosen"][:-1]) + f" w{EOS}",
             "rejected": " " + text(p["rejected"][:-1]) + f" w{EOS}"} for p in pairs]
    times, started = [], [0.0]

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *unused, **kwargs):
            started[0] = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            times.append(time.perf_counter() - started[0])

    n_steps = args.warmup + args.steps
    dpo_args = DPOConfig(output_dir=str(Path(args.scratch) / "trl"), per_device_train_batch_size=args.batch_pairs,
                         max_steps=n_steps, learning_rate=1e-5, beta=0.1, loss_type=["sigmoid"], logging_steps=10**6,
                         save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, max_length=None,
                         bf16=False, fp16=False, seed=0, disable_tqdm=True, data_seed=0)
    reference = transformers.LlamaForCausalLM(hf_config)
    reference.load_state_dict(model.state_dict(), strict=False)
    trainer = DPOTrainer(model=hf, ref_model=reference.eval(), args=dpo_args, train_dataset=datasets.Dataset.from_list(rows * 4),
                         processing_class=word_tokenizer(config.vocab_size), callbacks=[StepTimer()])
    trainer.train()
    return statistics.median(times[args.warmup :])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run and variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[64, 192], help="prompt length range")
    parser.add_argument("--reply-tokens", type=int, nargs=2, default=[64, 192], help="reply length range")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--max-load", type=float, default=0.0, help="wait until the 1-min load is below this (0 = no)")
    parser.add_argument("--scratch", default="/tmp/nanotune_dpo_bench")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.max_length = args.prompt_tokens[1] + args.reply_tokens[1]
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=int(2.75 * args.hidden_size),
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden_size // 64),
                         num_key_value_heads=max(1, args.hidden_size // 128), max_position_embeddings=2048,
                         rms_norm_eps=1e-5)
    pairs = make_pairs(args.batch_pairs * (args.warmup + args.steps), tuple(args.prompt_tokens),
                       tuple(args.reply_tokens), args.vocab_size, seed=0)
    if args.max_load:
        wait_until_quiet(args.max_load, 600)
    print(f"{device_description('cpu')}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load {load_average():.2f}")
    print(f"model: hidden {args.hidden_size}, {args.layers} layers, vocab {args.vocab_size}; {args.batch_pairs} pairs/step, "
          f"prompt {args.prompt_tokens} and reply {args.reply_tokens} tokens")
    variants = ["padded", "packed", "shared"] + ([] if args.no_trl else ["trl"])
    results: dict[str, list[float]] = {name: [] for name in variants}
    for run in range(args.runs):
        for name in variants:
            seconds = time_trl(config, pairs, args) if name == "trl" else time_nanotune(config, pairs, name, args)
            if seconds is None:
                results.pop(name)
                continue
            results[name].append(args.batch_pairs / seconds)
        print(f"run {run + 1}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in results.items() if v) + " pairs/s"
              f" (load {load_average():.2f})")
    summary = {name: {"pairs_per_s": statistics.mean(v), "min": min(v), "max": max(v)} for name, v in results.items()}
    for name, figures in summary.items():
        ratio = f", {figures['pairs_per_s'] / summary['trl']['pairs_per_s']:.2f}x TRL" if "trl" in summary else ""
        print(f"{name:8} {figures['pairs_per_s']:7.2f} pairs/s (runs {figures['min']:.2f}-{figures['max']:.2f}){ratio}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
