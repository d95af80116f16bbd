"""Peak memory per rank of ZeRO-2-like versus ZeRO-3-like FSDP2 sharding, on the CPU (gloo) or GPUs.

    python benchmarks/fsdp_memory.py [--nproc 2] [--hidden 512] [--layers 8] [--steps 3]

Launches `torchrun --nproc_per_node N` once per mode on a random LLaMA of the given shape and
prints, per rank, the peak memory during training above the memory after the model was sharded:
on CUDA `torch.cuda.max_memory_allocated`, on the CPU the process's peak resident set (VmHWM).
ZeRO-3 (`reshard_after_forward=True`) frees each block's gathered parameters after its forward
and gathers them again for the backward; ZeRO-2 (`False`) keeps them until the backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def current_resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args) -> None:
    """One rank: shard a random model, train a few steps on random tokens, report memory."""
    sys.path.insert(0, str(ROOT))
    import torch

    from nanotune import distributed
    from nanotune.config import DistributedConfig
    from nanotune.model import Llama, LlamaConfig

    run = distributed.init_distributed(DistributedConfig(reshard_after_forward=args.reshard), "auto")
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    model = Llama(config)
    distributed.shard_model(model, run, DistributedConfig(reshard_after_forward=args.reshard))
    model.to(run.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_resident_bytes()
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=run.device)
    for _ in range(args.steps):
        loss = model(tokens, labels=tokens) / tokens.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_resident_bytes()) - base
    print(json.dumps({"rank": run.rank, "reshard_after_forward": args.reshard, "peak_above_sharded_MiB": peak / 2**20,
                      "model_MiB": config.n_params * 4 / 2**20}), flush=True)
    distributed.shutdown(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reshard", type=lambda s: s == "true", default=True, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for reshard in (False, True):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   __file__, "--worker", f"--reshard={'true' if reshard else 'false'}", f"--hidden={args.hidden}",
                   f"--layers={args.layers}", f"--vocab={args.vocab}", f"--batch={args.batch}",
                   f"--seq-len={args.seq_len}", f"--steps={args.steps}"]
        output = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if output.returncode:
            sys.exit(output.stderr[-3000:])
        rows += [json.loads(line) for line in output.stdout.splitlines() if line.startswith("{")]
    model_mib = rows[0]["model_MiB"]
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {model_mib:.0f} MiB fp32; "
          f"{args.nproc} ranks, batch {args.batch} x {args.seq_len}")
    print(f"{'sharding':<28}{'rank':>6}{'peak above sharded model (MiB)':>34}")
    for row in sorted(rows, key=lambda r: (r["reshard_after_forward"], r["rank"])):
        name = "ZeRO-3 (reshard=True)" if row["reshard_after_forward"] else "ZeRO-2 (reshard=False)"
        print(f"{name:<28}{row['rank']:>6}{row['peak_above_sharded_MiB']:>34.1f}")


if __name__ == "__main__":
    main()
