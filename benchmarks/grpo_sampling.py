"""Sampling speed for GRPO: nanotune's batched KV-cache generation against `transformers.generate`.

    python benchmarks/grpo_sampling.py                          # the "issue" shape (51M), CPU
    python benchmarks/grpo_sampling.py --preset 1b --device cuda --prompts 16 --group-size 8

A GRPO step samples `group_size` completions of each of its prompts: here `--prompts` random
prompts of random lengths up to `--prompt-len` tokens, each repeated `--group-size` times, left
padded into one batch, and up to `--new-tokens` new tokens per row sampled at temperature 1.

Two workloads:

* equal work (the default): no EOS, so every row decodes to the limit in both libraries and they
  run the same decode steps on the same rows. What differs: nanotune prefills each distinct prompt
  once and copies its cache row `group_size` times, and samples by inverse CDF instead of
  torch.multinomial; the decode forward itself costs the same in both (the matmuls dominate).
* answers of varied length (`--stop-ids K`): K token ids count as the end of an answer (EOS may
  be a list in both libraries), so with the random model's near-uniform distribution each row
  ends with probability about K / V per step, as GRPO's answers end at very different lengths.
  transformers keeps every row in the batch until the last one ends; nanotune drops finished rows
  once a quarter of the batch has ended. Tokens/s counts the tokens each library returned, up to
  and including a row's end. The same weights go
into both models (nanotune uses HF's parameter names). Three kinds of run, interleaved, `--repeats`
times each, so a slow drift of the machine's load touches all alike:

    nanotune          generate_batch, one generator for the batch
    nanotune per-row  generate_batch, one generator per row (what train_grpo uses: reproducible
                      whatever the batch). Both draw one uniform number per row and token and
                      take the token whose CDF step holds it, which on the CPU costs a fraction
                      of torch.multinomial over the vocabulary
    transformers      LlamaForCausalLM.generate(do_sample=True), SDPA attention, its default cache

On a shared CPU, `--threads 1` measures both libraries on one thread each: with more threads than
free cores every small op waits for a descheduled thread, and the figures say more about the
machine's load than about either library. Prints new tokens per second for every run, the median and the spread (min-max) of each, the ratio
of medians, the load average before and after, and the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import (cpu_description, device_description, device_sync, load_average, nanotune_model,
                    preset_config, transformers_model)
from nanotune.checkpoint import DTYPES
from nanotune.generate import generate_batch, left_pad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="issue", help="model shape: issue (51M), 1b, tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--stop-ids", type=int, default=0,
                        help="K > 0: ids 3 .. 3+K-1 end an answer (varied lengths); 0: no EOS, equal work")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0 = torch's default)")
    args = parser.parse_args(argv)
    if not 0 <= args.stop_ids <= 10000:
        parser.error(f"--stop-ids must be between 0 and 10000 (ids 3 .. 3+K-1 of a 32k vocabulary), not {args.stop_ids}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    config = preset_config(args.preset, args.prompt_len + args.new_tokens)
    model = nanotune_model(config, seed=0, dtype=dtype, device=args.device).eval()
    hf = transformers_model(config, model.state_dict(), dtype, args.device).eval()

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.prompts,), generator=generator)
    prompts = [torch.randint(3, config.vocab_size, (int(n),), generator=generator).tolist() for n in lengths]
    rows = [prompt for prompt in prompts for _ in range(args.group_size)]
    stop_ids = list(range(3, 3 + args.stop_ids)) or None

    def run_nanotune(per_row: bool) -> float:
        generators = ([torch.Generator(args.device).manual_seed(i) for i in range(len(rows))] if per_row
                      else torch.Generator(args.device).manual_seed(0))
        device_sync(args.device)
        started = time.perf_counter()
        out = generate_batch(model, rows, args.new_tokens, temperature=1.0, eos_id=stop_ids, generator=generators)
        device_sync(args.device)
        assert stop_ids or all(len(tokens) == args.new_tokens for tokens in out)
        return sum(len(tokens) for tokens in out) / (time.perf_counter() - started)

    input_ids, attention_mask = left_pad(rows, 0, args.device)

    def run_transformers() -> float:
        torch.manual_seed(0)
        device_sync(args.device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=args.new_tokens,
                              min_new_tokens=None if stop_ids else args.new_tokens,
                              eos_token_id=stop_ids, pad_token_id=0)
        device_sync(args.device)
        new = out[:, input_ids.shape[1]:]  # (B, n): a row's answer, then padding once it has ended
        if not stop_ids:
            assert new.shape[1] == args.new_tokens
            return new.numel() / (time.perf_counter() - started)
        ended = torch.isin(new, torch.tensor(stop_ids, device=new.device))
        # A row's length: up to and including its first stop id, or all n if it never ended.
        first_end = torch.where(ended.any(1), ended.int().argmax(1) + 1, new.shape[1])
        return int(first_end.sum()) / (time.perf_counter() - started)

    kinds = {"nanotune": lambda: run_nanotune(False), "nanotune per-row": lambda: run_nanotune(True),
             "transformers": run_transformers}
    load_before = load_average()
    for run in kinds.values():  # warm-up: allocator, kernels, lazy imports
        run()
    results = {name: [] for name in kinds}
    for _ in range(args.repeats):
        for name, run in kinds.items():
            results[name].append(run())
    load_after = load_average()

    print(f"machine: {device_description(args.device) if args.device != 'cpu' else cpu_description()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load_before:.2f} -> "
          f"{load_after:.2f}")
    print(f"model: {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.dtype}); "
          f"{args.prompts} prompts x {args.group_size} completions, prompts of {min(lengths)}-{max(lengths)} tokens, "
          f"{'up to ' if stop_ids else ''}{args.new_tokens} new tokens per row"
          + (f", {args.stop_ids} stop ids (answers of varied length)" if stop_ids else ", no EOS (equal work)"))
    print(f"{'':18s} {'new tokens/s per run':>36s} {'median':>10s} {'spread':>10s}")
    medians = {}
    for name, values in results.items():
        medians[name] = statistics.median(values)
        runs = " ".join(f"{v:10.1f}" for v in values)
        print(f"{name:18s} {runs:>36s} {medians[name]:10.1f} {100 * (max(values) - min(values)) / medians[name]:9.1f}%")
    for name in ("nanotune", "nanotune per-row"):
        print(f"{name} / transformers: {medians[name] / medians['transformers']:.2f}x "
              f"(worst run against best: {min(results[name]) / max(results['transformers']):.2f}x)")


if __name__ == "__main__":
    main()
