"""Peak memory of `merge.py lora` on a model of several shards, versus the size of the model.

    python benchmarks/merge_memory.py                 # ~675 MB fp32 model in 5 shards
    python benchmarks/merge_memory.py --layers 16     # bigger

Builds a random LLaMA-shaped model locally (nothing is downloaded), saves it sharded, trains
nothing but puts a random all-linear LoRA adapter beside it, then runs in child processes:
  1. `python -c "import merge"`: the interpreter + torch, the floor every run pays;
  2. `python merge.py lora ...` with 150 MB output shards, and again with one 5 GB output shard
     (the streamed writer should make the output shard size irrelevant);
  3. for contrast, the obvious in-memory merge: load_pretrained + load_adapter + merge_lora +
     save_pretrained.
Each child's peak resident memory is its own ru_maxrss (os.wait4 gives the rusage of that one
child; resource.getrusage(RUSAGE_CHILDREN) would give the maximum over all children so far).
This process imports neither torch nor nanotune and builds the model in a child too: Linux
keeps ru_maxrss across fork and exec, so a child of a large parent would report the parent's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUILD = """
import json, sys, torch
from nanotune.checkpoint import save_pretrained
from nanotune.lora import apply_lora, save_adapter, trainable_parameters
from nanotune.model import Llama, LlamaConfig
workdir, shard_size = sys.argv[1], sys.argv[5]
layers, hidden, vocab = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                     num_hidden_layers=layers, num_attention_heads=hidden // 64)
torch.manual_seed(0)
model = Llama(config)
model.init_weights(0)
save_pretrained(model, workdir + "/base", max_shard_size=shard_size)
apply_lora(model, r=16, alpha=32, targets="all-linear")
with torch.no_grad():
    for _, parameter in trainable_parameters(model):
        parameter.normal_(0.0, 0.02)
save_adapter(model, workdir + "/adapter")
largest = max(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"n_params": config.n_params, "largest_tensor": largest}))
"""

NAIVE_MERGE = """
import sys
from nanotune.checkpoint import load_pretrained, save_pretrained
from nanotune.lora import load_adapter, merge_lora
model = load_pretrained(sys.argv[1])
load_adapter(model, sys.argv[2])
save_pretrained(merge_lora(model), sys.argv[3], max_shard_size="150MB")
"""


def peak_rss_mb(command: list[str]) -> tuple[float, float]:
    """(peak resident MB, seconds) of one child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: nobody reads while we wait
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{log.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size", default="150MB")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="merge_memory_"))
    built = subprocess.run([sys.executable, "-c", BUILD, str(workdir), str(args.layers), str(args.hidden),
                            str(args.vocab), args.shard_size], cwd=ROOT, check=True, capture_output=True, text=True)
    facts = json.loads(built.stdout.strip().splitlines()[-1])
    shards = sorted((workdir / "base").glob("*.safetensors"))
    model_mb = sum(f.stat().st_size for f in shards) / 1e6
    print(f"model: {facts['n_params'] / 1e6:.0f}M parameters, {model_mb:.0f} MB fp32 in {len(shards)} shards "
          f"(largest shard {max(f.stat().st_size for f in shards) / 1e6:.0f} MB, largest tensor "
          f"{facts['largest_tensor'] / 1e6:.0f} MB); adapter r=16 on every linear layer of the blocks")
    runs = [
        ("python -c 'import merge' (floor)", [sys.executable, "-c", "import merge"]),
        ("merge.py lora, 150MB output shards", [sys.executable, "merge.py", "lora", "--base", str(workdir / "base"),
         "--adapter", str(workdir / "adapter"), "--out", str(workdir / "merged"), "--max-shard-size", "150MB"]),
        ("merge.py lora, one 5GB output shard", [sys.executable, "merge.py", "lora", "--base", str(workdir / "base"),
         "--adapter", str(workdir / "adapter"), "--out", str(workdir / "merged_one"), "--max-shard-size", "5GB"]),
        ("in-memory load + merge_lora + save", [sys.executable, "-c", NAIVE_MERGE, str(workdir / "base"),
         str(workdir / "adapter"), str(workdir / "naive")]),
    ]
    floor = None
    for label, command in runs:
        peak, seconds = peak_rss_mb(command)
        floor = peak if floor is None else floor
        print(f"{label:40s} peak RSS {peak:7.0f} MB  (+{peak - floor:5.0f} MB over the floor)  {seconds:5.1f} s")
    print(f"model size {model_mb:.0f} MB")
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
