"""Where a training step's memory goes, phase by phase, as a user's run holds it (CPU).

    python benchmarks/step_memory.py                       # nanotune, the issue's shape, 3 steps
    python benchmarks/step_memory.py --impl transformers   # the same for transformers' labels= path

Builds the model, then reads, after each phase of each step (forward, backward, optimizer step,
zero_grad), the process's RSS above the built model and its peak so far. It also lists the
tensors autograd saves for the backward, by the source line that saved them, and the long-lived
parts of a step (AdamW's moments, the gradients, the logits workspace).

glibc's default malloc, as a user runs: nothing here sets an allocator variable. Run it again with
MALLOC_MMAP_THRESHOLD_=65536 in the environment to see the memory tensors occupy (freed blocks
then go back to the OS at once); the difference is what glibc keeps.
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (cpu_description, load_optimizer_modules, make_batch, nanotune_model,  # noqa: E402
                    peak_rss_bytes, preset_config, reset_peak_rss, rss_bytes, transformers_labels, transformers_model)
from nanotune.config import OptimConfig  # noqa: E402
from nanotune.loss import IGNORE_INDEX  # noqa: E402
from nanotune.optim import build_optimizer  # noqa: E402

MiB = 2**20


def saved_for_backward(model, inputs: dict) -> collections.Counter:
    """MiB of distinct tensors autograd saves in one forward, by the nanotune line that saved them
    (parameters excluded: they exist anyway)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, by_line = set(), collections.Counter()

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in seen and pointer not in parameters:
            seen.add(pointer)
            for frame in reversed(traceback.extract_stack()):
                if "/nanotune/" in frame.filename or "/transformers/" in frame.filename:
                    by_line[f"{Path(frame.filename).name}:{frame.lineno}"] += tensor.untyped_storage().nbytes() / MiB
                    break
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    return by_line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", default="nanotune", choices=["nanotune", "transformers"])
    parser.add_argument("--preset", default="issue")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = preset_config(args.preset, args.seq_len)
    batch = make_batch(args.batch_size, args.seq_len, config.vocab_size, 0, seed=0)
    model = nanotune_model(config, 0, torch.float32, "cpu")
    if args.impl == "transformers":
        model = transformers_model(config, model.state_dict(), torch.float32, "cpu")
        inputs = {"input_ids": batch["input_ids"], "labels": transformers_labels(batch["labels"])}
    else:
        inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    count = (batch["labels"] != IGNORE_INDEX).sum()

    def loss_of_step():
        return model(**inputs).loss if args.impl == "transformers" else model(**inputs) / count

    load_optimizer_modules()  # ~70 MB of lazily imported code, before the baseline
    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    n_trained = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.impl == "nanotune":
        optimizer = build_optimizer(model, OptimConfig(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused="fused"))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)

    print(f"{cpu_description()}, torch {torch.__version__}; {args.impl}, preset {args.preset} "
          f"({n_trained / MiB:.0f} MiB of fp32 parameters), batch {args.batch_size} x {args.seq_len}")
    print(f"long-lived: AdamW moments {2 * n_trained / MiB:.0f} MiB, gradients {n_trained / MiB:.0f} MiB"
          + (f", logits workspace {model.loss_chunk_tokens * config.vocab_size * 4 / MiB:.0f} MiB"
             if args.impl == "nanotune" else ""))
    print(f"{'':22s} {'RSS':>7s} {'peak':>7s}   (MiB above the built model)")

    def report(label):
        print(f"{label:22s} {(rss_bytes() - base) / MiB:7.0f} {(peak_rss_bytes() - base) / MiB:7.0f}")

    report("optimizer built")
    for step in range(1, args.steps + 1):
        loss = loss_of_step()
        report(f"step {step}: forward")
        loss.backward()
        report(f"step {step}: backward")
        optimizer.step()
        report(f"step {step}: optimizer")
        optimizer.zero_grad(set_to_none=True)
        report(f"step {step}: zero_grad")
    del loss
    saved = saved_for_backward(model, inputs)
    print(f"saved for the backward in one forward: {sum(saved.values()):.0f} MiB (parameters not counted)")
    for line, mib in saved.most_common(8):
        print(f"  {mib:7.1f} MiB  {line}")


if __name__ == "__main__":
    main()
