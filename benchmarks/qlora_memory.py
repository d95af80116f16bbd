"""Memory of a ~1B model loaded with its linear layers in NF4 (QLoRA), against fp32 and bf16 loads.

    python benchmarks/qlora_memory.py                  # TinyLlama-1.1B's shape, random bf16 weights (2.2 GB)
    python benchmarks/qlora_memory.py --runs 3         # each measurement three times: min / median / max

Writes a random LLaMA of TinyLlama-1.1B's shape as a HF folder (bf16 safetensors, tensor by
tensor, so the writer never holds the model), then measures in a fresh child process each:

  floor     python + torch + nanotune imported, nothing loaded
  fp32      load_pretrained(dtype=fp32)
  bf16      load_pretrained(dtype=bf16)
  nf4       load_pretrained(dtype=bf16, quantizer=QuantizeOnLoad): every linear of the blocks in
            NF4, embeddings, norms and lm_head in bf16
  qlora     nf4, then LoRA r=16 on every linear (fp32 adapters), AdamW, one SFT step (forward,
            backward, optimizer step) on one row of --seq-len tokens
  lora      the same step over the bf16 base, for contrast

For each: the bytes of the linear weights and of everything else (counted from the tensors),
the resident size after loading, the peak resident size (VmHWM, the kernel's high-water mark),
and the peak of anonymous memory (RssAnon sampled every 5 ms by a thread; it leaves out the
file pages of safetensors' memory maps, which are page cache the kernel may drop).
Children start from a parent that imports neither torch nor nanotune (Linux keeps ru_maxrss
across fork, so a large parent would show in its children) and with the default allocator (no
MALLOC_* variables passed on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4)  # TinyLlama-1.1B

BUILD = """
import hashlib, json, sys, torch
from nanotune.checkpoint import expected_tensor_shapes, generation_config_text, write_hf_checkpoint
from nanotune.model import LlamaConfig
folder, shape = sys.argv[1], json.loads(sys.argv[2])
config = LlamaConfig(**shape, max_position_embeddings=2048, rms_norm_eps=1e-5)
specs = {name: (tuple(s), torch.bfloat16) for name, s in expected_tensor_shapes(config).items()}

def get_tensor(name):
    shape = specs[name][0]
    if len(shape) == 1:  # a norm
        return torch.ones(shape, dtype=torch.bfloat16)
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)

hf = config.to_hf_dict()
hf["torch_dtype"] = "bfloat16"
write_hf_checkpoint(folder, hf, specs, get_tensor, extra_files=[("generation_config.json", generation_config_text(config))])
print(json.dumps({"n_params": config.n_params}))
"""

MEASURE = """
import gc, json, sys, threading, time
from pathlib import Path
import torch
from torch import nn
from nanotune.checkpoint import load_pretrained
from nanotune.lora import apply_lora
from nanotune.quant import NF4Weight, QuantizeOnLoad

mode, folder, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3])

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

peak_anon = [0]
def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.05)
result = {"rss_before": status("VmRSS")}
started = time.perf_counter()

def tensor_bytes(model):
    linear, other, seen = 0, 0, set()
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            size = p.numel() * p.element_size()
            is_linear_weight = isinstance(module, NF4Weight) or (
                isinstance(module, nn.Linear) and name.startswith("model.layers.") and p is module.weight
                and ".lora_" not in name)
            if is_linear_weight:
                linear += size
            else:
                other += size
    return linear, other

if mode != "floor":
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    quantizer = QuantizeOnLoad(dtype=dtype) if mode in ("nf4", "qlora") else None
    model = load_pretrained(folder, dtype=dtype, quantizer=quantizer)
    for p in model.parameters():  # memory-mapped weights (bf16 read as bf16) are paged in when first used
        p.detach().sum()
    gc.collect()
    result["load_s"] = time.perf_counter() - started
    result["load_peak_rss"], result["load_peak_anon"] = status("VmHWM"), peak_anon[0]
    result["resident"] = status("VmRSS")
    result["linear_bytes"], result["other_bytes"] = tensor_bytes(model)
if mode in ("qlora", "lora"):
    apply_lora(model, r=16, alpha=32, dropout=0.0, targets="all-linear")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=generator)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = -100
    started = time.perf_counter()
    loss = model(input_ids, labels=labels) / seq_len
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    result["step_s"] = time.perf_counter() - started
    result["trainable_bytes"] = sum(p.numel() * p.element_size() for p in trainable)
result["peak_rss"], result["peak_anon"] = status("VmHWM"), peak_anon[0]
print(json.dumps(result))
"""


def run_child(code: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {args[:1]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / 1e9:6.2f} GB"


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return gb(values[0])
    return f"{gb(statistics.median(values))} ({min(values) / 1e9:.2f}-{max(values) / 1e9:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="measure each mode this many times (fresh processes)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens of the one QLoRA step")
    parser.add_argument("--modes", default="floor,fp32,bf16,nf4,qlora,lora")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="fewer for a quick try")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qlora_memory_"))
    workdir.mkdir(parents=True, exist_ok=True)
    folder = workdir / "base"
    if not (folder / "config.json").exists():
        free = shutil.disk_usage(workdir).free
        if free < 3e9:
            raise SystemExit(f"{workdir}: {free / 1e9:.1f} GB free; the bf16 model needs 2.2 GB")
        facts = run_child(BUILD, str(folder), json.dumps({**SHAPE, "num_hidden_layers": args.layers}))
        print(f"wrote {facts['n_params'] / 1e9:.2f}B parameters to {folder}")
    on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"model on disk: {gb(on_disk)} (bf16, {len(list(folder.glob('*.safetensors')))} file)")

    results: dict[str, list[dict]] = {}
    for _ in range(args.runs):
        for mode in args.modes.split(","):
            results.setdefault(mode, []).append(run_child(MEASURE, mode, str(folder), str(args.seq_len)))
    print(f"load average {os.getloadavg()[0]:.2f}; {args.runs} run(s) each, median (min-max)")
    floor = statistics.median(r["peak_rss"] for r in results.get("floor", [{"peak_rss": 0}]))
    print(f"{'':6s} {'linear weights':>15s} {'other tensors':>15s} {'resident':>15s} {'peak RSS':>22s} "
          f"{'peak anon':>22s}")
    for mode, runs in results.items():
        if mode == "floor":
            print(f"{mode:6s} {'':>15s} {'':>15s} {spread([r['rss_before'] for r in runs]):>15s} "
                  f"{spread([r['peak_rss'] for r in runs]):>22s} {spread([r['peak_anon'] for r in runs]):>22s}")
            continue
        print(f"{mode:6s} {gb(runs[0]['linear_bytes']):>15s} {gb(runs[0]['other_bytes']):>15s} "
              f"{spread([r['resident'] for r in runs]):>15s} {spread([r['peak_rss'] for r in runs]):>22s} "
              f"{spread([r['peak_anon'] for r in runs]):>22s}")
    by_mode = {mode: runs[0] for mode, runs in results.items()}
    if "nf4" in by_mode and "bf16" in by_mode:
        nf4, bf16 = by_mode["nf4"], by_mode["bf16"]
        print(f"NF4 linear weights / bf16 linear weights: {nf4['linear_bytes'] / bf16['linear_bytes']:.3f} "
              f"(target <= 0.30)")
        load_peaks = [r["load_peak_rss"] - floor for r in results["nf4"]]
        print(f"NF4 load peak over the floor: {spread(load_peaks)} vs the bf16 model's {gb(bf16['linear_bytes'] + bf16['other_bytes'])} "
              f"(target: below)")
    for mode in ("qlora", "lora"):
        if mode in results:
            runs = results[mode]
            print(f"{mode} step (seq {args.seq_len}): peak RSS {spread([r['peak_rss'] for r in runs])}, "
                  f"step {statistics.median(r['step_s'] for r in runs):.1f} s, trainable "
                  f"{gb(runs[0]['trainable_bytes'])}")
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
