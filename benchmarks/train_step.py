"""One training step, nanotune against transformers (and torchtune, litgpt where installed).

    python benchmarks/train_step.py                                  # the issue's shape, fp32, CPU
    python benchmarks/train_step.py --seq-len 1024 --packed-docs 8   # packed rows vs plain rows
    python benchmarks/train_step.py --loop                           # train_sft.py vs the bare step
    python benchmarks/train_step.py --profile 3 --no-memory          # where each step goes, by operator
    python benchmarks/train_step.py --keep-freed-memory              # the same step without page faults
    python benchmarks/train_step.py --device cuda --dtype bf16 --preset 1b --seq-len 2048 --compile

A step is what a training loop does per batch: forward, loss, backward, AdamW step, zero_grad.
Every implementation gets the same shape, the same weights (nanotune's state dict is copied into
the others; the first-step losses are printed to show they agree), the same batch and the same
optimizer (`torch.optim.AdamW`, fused). After warm-up steps, the measured steps ALTERNATE between
the implementations (A B C, C B A, A B C, ...), so a change in machine load hits all of them
alike, and the median step time is reported:

* tokens/s and the ratio to transformers;
* MFU: the FLOPs of the step (`common.train_step_flops`: 6 * matmul parameters * tokens, the
  lm_head's only over the tokens with a label, plus causal attention 12 * L * C * T^2 / 2 per
  row) per second, over the FLOP/s of a large matmul
  measured here (`common.matmul_peak_flops`), not a datasheet figure; the same FLOPs at that
  peak are the step's floor, and transformers' step over the floor is the most any
  implementation could gain on it (printed as "floor");
* training memory: the extra memory a step needs above the built model (gradients, AdamW state,
  activations, logits). RSS peaks are per process, so each implementation is measured alone in
  a fresh subprocess (`--memory-probe`): peak RSS (VmHWM, reset after the model is built) minus
  the RSS at that moment, with glibc returning freed blocks to the OS at once (see
  `probe_memory_in_subprocess`); on CUDA, max_memory_allocated minus memory_allocated.

Losses: nanotune's `forward(labels=...)` (the chunked lm_head + cross-entropy, never the whole
(B, T, V) logits); transformers' own `labels=` loss (full logits, as its users run it); torchtune
and litgpt return logits, and get F.cross_entropy over them.

Packed rows (`--packed-docs N`): each row holds N documents cut at random points. nanotune gets
`document_ids` (block-diagonal causal attention, positions restarting per document); transformers
gets what it needs for the same result with SDPA, a (B, 1, T, T) boolean block-diagonal mask and
restarting position_ids (built once per batch, as a collator would). nanotune also runs the same
rows as plain causal rows, so "packed vs plain" is printed: what packing costs nanotune per step.
torchtune and litgpt run only plain rows.

`--compile` compiles every implementation's transformer blocks one by one (regional
compilation, as `train.compile = true` does); compilation happens during the warm-up steps.

`--loop` measures item 5 of the issue: train_sft.py run end to end (data, logging and all) on
generated conversations packed to this shape, its logged tokens/s against the bare step's on the
very batches the loop trains on (CPU only).

Measure on a quiet machine: with 2 torch threads on 2 cores, a third busy process makes every
parallel region wait for a descheduled thread, and memory-bound operations then run 10-20 times
slower (a foreach multiply over the gradients: 13 ms alone, 256 ms beside another training run).
The 1-minute load is printed before and after; `--max-load 1.0` waits for a quiet moment.

No GPU is needed for any default; --device cuda --dtype bf16 --preset 1b is the GPU run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DTYPES,
    ROOT,
    device_description,
    device_sync,
    keep_freed_memory,
    load_average,
    load_optimizer_modules,
    make_batch,
    matmul_peak_flops,
    nanotune_model,
    peak_rss_bytes,
    preset_config,
    reset_peak_rss,
    rss_bytes,
    squared_document_lengths,
    train_step_flops,
    transformers_labels,
    transformers_model,
    wait_until_quiet,
)

from nanotune.config import OptimConfig  # noqa: E402
from nanotune.loss import IGNORE_INDEX  # noqa: E402
from nanotune.optim import build_optimizer  # noqa: E402
from nanotune.model import (  # noqa: E402
    block_diagonal_causal_mask,
    positions_from_document_ids,
    resolve_packed_attention,
)

NANOTUNE, NANOTUNE_PACKED = "nanotune", "nanotune packed"
TRANSFORMERS, TRANSFORMERS_PACKED = "transformers", "transformers packed (4D mask)"
PEERS = ("torchtune", "litgpt")


@dataclass
class Runner:
    """One implementation with its model built: `start()` builds its optimizer, as its users would,
    and returns `step()`, which runs forward + loss + backward + AdamW step + zero_grad.

    The optimizer is built apart from the model so that the memory probe's baseline (the built
    model) is read before it: AdamW's state is part of training memory, whenever it is created.
    """

    name: str
    start: Callable[[], Callable[[], torch.Tensor]] | None  # -> step(), returning the mean token loss
    batch: dict
    note: str = ""
    step: Callable[[], torch.Tensor] | None = None
    times: list[float] = field(default_factory=list)
    first_loss: float | None = None

    def ready(self) -> None:
        if self.step is None:
            self.step = self.start()


def adamw(model) -> torch.optim.AdamW:
    """The same optimizer for every implementation: AdamW with the fused kernel (CPU and CUDA);
    its state is created by the first step, as torch does by default."""
    return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)


def nanotune_adamw(model) -> torch.optim.AdamW:
    """The same AdamW built as nanotune's trainer builds it (`optim.build_optimizer`): the same
    update, with its state created before the first step (`create_adamw_state`)."""
    return build_optimizer(model, OptimConfig(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused="fused"))


def n_targets(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum()


# ----------------------------------------------------------------------------------------------
# The implementations
# ----------------------------------------------------------------------------------------------


def nanotune_runner(config, args, dtype, batch, name: str):
    """nanotune's step: the model returns the summed token loss; divide by the target count."""
    packed_attention = resolve_packed_attention(args.packed_attention, args.compile, args.device)
    model = nanotune_model(config, args.seed, dtype, args.device,
                           packed_attention=packed_attention, loss_chunk_tokens=args.loss_chunk_tokens)
    if args.compile:
        # Regional compilation, one block at a time: what `train.compile = true` does in training,
        # where the trainer applies it together with activation checkpointing and FSDP.
        for layer in model.model.layers:
            layer.compile()
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "document_ids")}
    count = n_targets(batch["labels"])

    def start():
        optimizer = nanotune_adamw(model)

        def step():
            loss_sum = model(**inputs)  # summed token loss: the loop divides by the target count
            (loss_sum / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss_sum.detach() / count

        return step

    note = "document_ids: attention per document span" if "document_ids" in batch else "chunked lm_head + loss"
    return Runner(name, start, batch, note), model


def transformers_runner(config, args, dtype, state_dict, batch, packed: bool) -> Runner:
    model = transformers_model(config, state_dict, dtype, args.device)
    if args.compile:
        for layer in model.model.layers:  # regional compilation, as nanotune does
            layer.compile()
    input_ids = batch["input_ids"]
    inputs = {"input_ids": input_ids}
    inputs["labels"] = transformers_labels(batch["labels"])  # unshifted: transformers shifts itself
    note = "its own labels= loss over full (B, T, V) logits"
    if packed:
        inputs["attention_mask"] = block_diagonal_causal_mask(batch["document_ids"])  # (B, 1, T, T)
        inputs["position_ids"] = positions_from_document_ids(batch["document_ids"])  # restarting per document
        note = "SDPA with a dense block-diagonal (B, 1, T, T) mask; " + note

    def start():
        optimizer = adamw(model)

        def step():
            loss = model(**inputs).loss  # mean over target tokens
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    return Runner(TRANSFORMERS_PACKED if packed else TRANSFORMERS, start, batch, note)


def logits_loss_start(model, batch):
    """start() for models that return logits: steps of mean cross-entropy over the target tokens."""
    input_ids, labels = batch["input_ids"], batch["labels"]

    def start():
        optimizer = adamw(model)

        def step():
            logits = model(input_ids)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    return start


def torchtune_runner(config, args, dtype, state_dict, batch) -> Runner:
    """torchtune's llama2 builder (same module structure as LLaMA 2/3) with converted weights.

    torchtune's RoPE pairs dimensions (2i, 2i+1), HF's pairs (i, i + D/2), so q_proj and k_proj
    rows are permuted per head, as torchtune's own HF checkpoint converter does.
    """
    from torchtune.models.llama2 import llama2

    model = llama2(
        vocab_size=config.vocab_size, num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, embed_dim=config.hidden_size,
        max_seq_len=config.max_position_embeddings, intermediate_dim=config.intermediate_size,
        norm_eps=config.rms_norm_eps,
    )
    D, C = config.head_dim, config.hidden_size

    def interleave(weight, n_heads):  # HF rotate-half rows -> interleaved pairs, per head
        return weight.view(n_heads, 2, D // 2, C).transpose(1, 2).reshape(n_heads * D, C)

    names = {
        "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.scale",
        "lm_head.weight": "output.weight",
    }
    layer_names = {
        "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
        "self_attn.o_proj": "attn.output_proj", "mlp.gate_proj": "mlp.w1", "mlp.down_proj": "mlp.w2",
        "mlp.up_proj": "mlp.w3", "input_layernorm": "sa_norm", "post_attention_layernorm": "mlp_norm",
    }
    converted = {}
    for name, tensor in state_dict.items():
        if name in names:
            converted[names[name]] = tensor
            continue
        _, _, index, rest = name.split(".", 3)  # model.layers.{i}.{rest}
        module, kind = rest.rsplit(".", 1)
        new = f"layers.{index}.{layer_names[module]}." + ("scale" if "layernorm" in module else kind)
        if module == "self_attn.q_proj":
            tensor = interleave(tensor, config.num_attention_heads)
        elif module == "self_attn.k_proj":
            tensor = interleave(tensor, config.num_key_value_heads)
        converted[new] = tensor
    model.load_state_dict(converted, strict=True)
    model = model.to(device=args.device, dtype=dtype).train()
    return Runner("torchtune", logits_loss_start(model, batch), batch, "logits + F.cross_entropy")


def litgpt_runner(config, args, dtype, state_dict, batch) -> Runner:
    """litgpt's GPT in its LLaMA configuration, weights converted by litgpt's own HF converter."""
    import litgpt
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama

    lit_config = litgpt.Config(
        name="nanotune-benchmark", block_size=config.max_position_embeddings, vocab_size=config.vocab_size,
        padded_vocab_size=config.vocab_size, n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
        n_query_groups=config.num_key_value_heads, n_embd=config.hidden_size, head_size=config.head_dim,
        rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
        norm_eps=config.rms_norm_eps, mlp_class_name="LLaMAMLP", intermediate_size=config.intermediate_size,
        rope_base=int(config.rope_theta),
    )
    model = litgpt.GPT(lit_config)
    converted: dict = {}
    copy_weights_hf_llama(lit_config, {}, converted, dict(state_dict))
    model.load_state_dict(converted, strict=False)
    model = model.to(device=args.device, dtype=dtype).train()
    return Runner("litgpt", logits_loss_start(model, batch), batch, "logits + F.cross_entropy")


def sft_shaped(batch: dict, prompt_fraction: float) -> dict:
    """The first `prompt_fraction` of every row made prompt: label -100, as an SFT collator leaves
    a conversation's prompt. transformers gets the same labels (unshifted) for its labels= loss."""
    n_prompt = int(round(prompt_fraction * batch["labels"].shape[1]))
    if n_prompt:
        batch["labels"][:, :n_prompt] = IGNORE_INDEX
    return batch


def build_runners(config, args, dtype, only: str | None = None) -> tuple[list[Runner], list[str]]:
    """The runners to measure (or just `only`, for a memory probe) and notes on skipped ones."""
    def on_device(batch):
        return {key: value.to(args.device) for key, value in batch.items()}

    plain = on_device(sft_shaped(make_batch(args.batch_size, args.seq_len, config.vocab_size, 0, args.seed),
                                 args.prompt_fraction))
    packed = on_device(make_batch(args.batch_size, args.seq_len, config.vocab_size, args.packed_docs, args.seed)) \
        if args.packed_docs > 1 else None
    notes, runners = [], []
    wanted = [name.strip() for name in args.impls.split(",")]

    state_dict = None
    if "nanotune" in wanted and only in (None, NANOTUNE):
        runner, model = nanotune_runner(config, args, dtype, plain, NANOTUNE)
        runners.append(runner)
        state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # copied into the others
    if "nanotune" in wanted and packed is not None and only in (None, NANOTUNE_PACKED):
        runners.append(nanotune_runner(config, args, dtype, packed, NANOTUNE_PACKED)[0])  # same seed, same weights
    if "transformers" in wanted and only in (None, TRANSFORMERS):
        runners.append(transformers_runner(config, args, dtype, state_dict, plain, packed=False))
    if "transformers" in wanted and packed is not None and only in (None, TRANSFORMERS_PACKED):
        runners.append(transformers_runner(config, args, dtype, state_dict, packed, packed=True))
    builders = {"torchtune": torchtune_runner, "litgpt": litgpt_runner}
    for peer in PEERS:
        if peer not in wanted or only not in (None, peer):
            continue
        if config.model_type != "llama":
            notes.append(f"{peer}: built here for LLaMA shapes only, skipped for {config.model_type}")
            continue
        try:
            __import__(peer)
        except ImportError as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            notes.append(f"{peer}: cannot be imported ({type(error).__name__}: {first_line}), skipped")
            continue
        if state_dict is None:  # a memory probe builds the peer alone, from nanotune's init
            state_dict = nanotune_model(config, args.seed, torch.float32, "cpu").state_dict()
        try:
            runners.append(builders[peer](config, args, dtype, state_dict, plain))
        except Exception as error:  # an API that moved between versions: say so, measure the rest
            notes.append(f"{peer}: installed but could not be built ({type(error).__name__}: {error}), skipped")
    return runners, notes


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def timed_step(runner: Runner, device: str) -> float:
    device_sync(device)
    started = time.perf_counter()
    loss = runner.step()
    device_sync(device)
    elapsed = time.perf_counter() - started
    if runner.first_loss is None:
        runner.first_loss = float(loss)
    return elapsed


def measure(runners: list[Runner], args, log) -> None:
    """Warm-up steps, then measured steps alternating between the runners (order reversed every round)."""
    for runner in runners:
        runner.ready()
    for round_index in range(args.warmup + args.steps):
        order = runners if round_index % 2 == 0 else runners[::-1]
        for runner in order:
            elapsed = timed_step(runner, args.device)
            if round_index >= args.warmup:
                runner.times.append(elapsed)
        if round_index < args.warmup:
            log(f"  warm-up {round_index + 1}/{args.warmup} done")


def profile_steps(runners: list[Runner], args, log) -> dict:
    """--profile: where each implementation's step goes, by operator (torch.profiler, CPU time of
    the operator itself, per step), after the measured steps. Profiling slows small operators
    down, so these are shares to compare, not step times."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    tables = {}
    for runner in runners:
        with profile(activities=activities) as profiler:
            for _ in range(args.profile):
                runner.step()
            device_sync(args.device)
        events = sorted(profiler.key_averages(), key=lambda event: -event.self_cpu_time_total)
        total = sum(event.self_cpu_time_total for event in events)
        tables[runner.name] = [{"op": event.key, "ms_per_step": event.self_cpu_time_total / 1e3 / args.profile,
                                "share": event.self_cpu_time_total / total} for event in events[:args.profile_rows]]
        log(f"\nprofile of {runner.name}, {args.profile} steps: operator, ms per step spent in it (wall time on "
            f"the calling thread), share of the step")
        for row in tables[runner.name]:
            log(f"  {row['op'][:60]:60s} {row['ms_per_step']:9.1f} {100 * row['share']:6.1f}%")
    return tables


def memory_probe(args) -> None:
    """Child process: build one implementation, then report the extra memory its steps need."""
    dtype = DTYPES[args.dtype]
    config = preset_config(args.preset, args.seq_len)
    runners, notes = build_runners(config, args, dtype, only=args.memory_probe)
    if not runners:
        print("MEMORY_PROBE " + json.dumps({"name": args.memory_probe, "error": "; ".join(notes) or "not built"}))
        return
    runner = runners[0]
    load_optimizer_modules()  # ~70 MB of lazily imported code, before the baseline
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
        reset_peak_rss()
    runner.ready()  # the optimizer, and nanotune's AdamW state, after the baseline: both are counted
    for _ in range(args.memory_steps):
        runner.step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = peak_rss_bytes() - base
    print("MEMORY_PROBE " + json.dumps({"name": runner.name, "train_memory_bytes": extra, "model_rss_bytes": base}))


def probe_memory_in_subprocess(name: str, argv: list[str], log, in_use: bool = False) -> int | None:
    """Run `--memory-probe name` in a fresh process and return the training memory it reports.

    By default the child runs as a user's training runs: glibc's default malloc, whose freed blocks
    partly stay in the process (its mmap threshold grows with the sizes freed, and the heap keeps
    holes it cannot hand back), so RSS is what the operating system sees the run hold.
    `in_use=True` tells glibc to serve every allocation above 64 KiB with its own mmap
    (MALLOC_MMAP_THRESHOLD_=65536), so freed tensors go back at once and the peak follows the
    memory tensors actually occupy: shown beside, as the floor the allocator could reach. No
    figure of README depends on it.
    """
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-probe", name]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if in_use else dict(os.environ)
    if not in_use:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("MEMORY_PROBE "):
            record = json.loads(line[len("MEMORY_PROBE "):])
            if "error" in record:
                log(f"  memory of {name}: {record['error']}")
                return None
            return record["train_memory_bytes"]
    log(f"  memory probe of {name} failed (exit {result.returncode}): {result.stderr.strip()[-400:]}")
    return None


def reference_name(name: str, names: list[str]) -> str | None:
    """What a row is compared with: packed nanotune with packed transformers, the rest with plain."""
    if name == NANOTUNE_PACKED and TRANSFORMERS_PACKED in names:
        return TRANSFORMERS_PACKED
    return TRANSFORMERS if TRANSFORMERS in names else None


def summarise(runners, config, peak_flops, memory, in_use) -> list[dict]:
    """One row of figures per implementation (medians of the measured steps)."""
    names = [r.name for r in runners]
    medians = {r.name: statistics.median(r.times) for r in runners}
    rows = []
    for runner in runners:
        median = medians[runner.name]
        tokens = runner.batch["input_ids"].numel()
        flops = train_step_flops(config, tokens, squared_document_lengths(runner.batch),
                                 int(n_targets(runner.batch["labels"])))
        reference = reference_name(runner.name, names)
        own_memory, reference_memory = memory.get(runner.name), memory.get(reference)
        own_in_use, reference_in_use = in_use.get(runner.name), in_use.get(reference)
        rows.append({
            "name": runner.name,
            "median_step_s": median,
            "min_step_s": min(runner.times),
            "max_step_s": max(runner.times),
            "tokens_per_s": tokens / median,
            "compared_with": reference,
            "ratio_to_transformers": medians[reference] / median if reference else None,
            "mfu": flops / median / peak_flops,
            "floor_s": flops / peak_flops,  # the step's FLOPs at the measured matmul peak
            "achieved_gflops": flops / median / 1e9,
            "train_memory_mib": own_memory / 2**20 if own_memory else None,
            "memory_ratio_to_transformers": own_memory / reference_memory if own_memory and reference_memory else None,
            "in_use_memory_mib": own_in_use / 2**20 if own_in_use else None,
            "in_use_ratio_to_transformers": own_in_use / reference_in_use if own_in_use and reference_in_use else None,
            "first_step_loss": runner.first_loss,
            "note": runner.note,
        })
    return rows


def print_table(rows, log) -> None:
    def figure(value, spec):
        return format(value, spec) if value is not None else "-"

    log("")
    log(f"{'implementation':30s} {'step s':>7s} {'tokens/s':>9s} {'ratio':>6s} {'MFU':>6s} {'GFLOP/s':>8s} "
        f"{'memory MiB':>10s} {'mem ratio':>9s} {'in use MiB':>10s} {'ratio':>6s} {'loss@1':>9s}")
    for row in rows:
        log(f"{row['name']:30s} {row['median_step_s']:7.3f} {row['tokens_per_s']:9.1f} "
            f"{figure(row['ratio_to_transformers'], '.3f'):>6s} {100 * row['mfu']:5.1f}% {row['achieved_gflops']:8.1f} "
            f"{figure(row['train_memory_mib'], '.0f'):>10s} {figure(row['memory_ratio_to_transformers'], '.3f'):>9s} "
            f"{figure(row['in_use_memory_mib'], '.0f'):>10s} {figure(row['in_use_ratio_to_transformers'], '.3f'):>6s} "
            f"{row['first_step_loss']:9.6f}")
    log("ratio: transformers' median step time / this one's (> 1: faster); packed nanotune is compared with "
        "packed transformers. memory: peak RSS above the built model over the probe's steps, glibc's default "
        "malloc (what a user's run holds); in use: the same with MALLOC_MMAP_THRESHOLD_=65536 (freed memory "
        "returned at once; the floor, not a user's figure). loss@1: first-step loss (same weights)")


def run_benchmark(args, argv) -> dict:
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    dtype = DTYPES[args.dtype]
    config = preset_config(args.preset, args.seq_len)
    load_before = wait_until_quiet(args.max_load, args.max_wait) if args.max_load else load_average()
    log(f"device: {device_description(args.device)}; 1-minute load {load_before:.2f}")
    if args.keep_freed_memory:
        log("glibc keeps freed memory in this process (--keep-freed-memory, both implementations; not a user's "
            "setting): no step faults in fresh pages")
    peak = matmul_peak_flops(args.device, dtype)
    log(f"matmul peak ({args.dtype}, measured): {peak / 1e9:.1f} GFLOP/s")
    packed_note = f", {args.packed_docs} documents per packed row" if args.packed_docs > 1 else ""
    log(f"shape {args.preset}: {config.n_params / 1e6:.1f}M parameters; batch {args.batch_size} x {args.seq_len}"
        f"{packed_note}; {args.dtype}{'; compiled blocks' if args.compile else ''}")

    runners, notes = build_runners(config, args, dtype)
    for note in notes:
        log(f"note: {note}")
    log(f"measuring {', '.join(r.name for r in runners)}: {args.warmup} warm-up + {args.steps} alternating steps each")
    measure(runners, args, log)
    profiles = profile_steps(runners, args, log) if args.profile else None
    load_after = load_average()
    # A single moment of contention lowers a peak measured once; the best of two moments is the ceiling.
    peak_after = matmul_peak_flops(args.device, dtype)
    if peak_after > peak:
        log(f"matmul peak measured again after the steps: {peak_after / 1e9:.1f} GFLOP/s (used)")
        peak = peak_after

    for runner in runners:
        runner.step = runner.start = None  # drop the models and optimizers before the memory probes run beside us
    gc.collect()
    memory, in_use = {}, {}
    if args.memory:
        log("training memory, one fresh process per implementation (glibc's default malloc) ...")
        for runner in runners:
            memory_bytes = probe_memory_in_subprocess(runner.name, argv, log)
            if memory_bytes is not None:
                memory[runner.name] = memory_bytes
        if args.in_use:
            log("memory in use (MALLOC_MMAP_THRESHOLD_=65536 in the probe only), one fresh process each ...")
            for runner in runners:
                memory_bytes = probe_memory_in_subprocess(runner.name, argv, log, in_use=True)
                if memory_bytes is not None:
                    in_use[runner.name] = memory_bytes

    rows = summarise(runners, config, peak, memory, in_use)
    print_table(rows, log)
    result = {
        "device": device_description(args.device),
        "shape": {"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
                  "packed_docs": args.packed_docs, "dtype": args.dtype, "compile": args.compile,
                  "parameters": config.n_params, "loss_chunk_tokens": args.loss_chunk_tokens},
        "matmul_peak_gflops": peak / 1e9,
        "load_before": load_before, "load_after": load_after,
        "steps": args.steps, "warmup": args.warmup,
        "implementations": rows,
        "notes": notes,
        "profiles": profiles,
    }
    medians = {row["name"]: row["median_step_s"] for row in rows}
    floors = {row["name"]: row["floor_s"] for row in rows}
    if NANOTUNE in medians and TRANSFORMERS in medians:
        # How much faster than transformers a step could be at all: its FLOPs at the matmul peak
        # and nothing else (no softmax, norm, attention overhead, optimizer or allocator).
        result["ratio_ceiling"] = medians[TRANSFORMERS] / floors[NANOTUNE]
        log(f"floor: the step's FLOPs at the measured matmul peak take {floors[NANOTUNE]:.3f} s; above it nanotune "
            f"spends {medians[NANOTUNE] - floors[NANOTUNE]:.3f} s, transformers {medians[TRANSFORMERS] - floors[TRANSFORMERS]:.3f} s; "
            f"a step with nothing but those FLOPs would be {result['ratio_ceiling']:.3f}x transformers'")
    if NANOTUNE_PACKED in medians and NANOTUNE in medians:
        result["nanotune_packed_over_plain_step_time"] = medians[NANOTUNE_PACKED] / medians[NANOTUNE]
        log(f"nanotune packed ({args.packed_docs} documents per row) / nanotune plain, step time: "
            f"{result['nanotune_packed_over_plain_step_time']:.3f}")
    for note in notes:
        log(f"note: {note}")
    log(f"1-minute load: {load_before:.2f} before, {load_after:.2f} after")
    return result


# ----------------------------------------------------------------------------------------------
# --loop: the whole training loop against the bare step
# ----------------------------------------------------------------------------------------------


def write_conversations(path: Path, n: int, seed: int) -> None:
    """Generated conversations (messages format) of a few dozen to a couple of hundred tokens."""
    import random

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import corpus_lines

    rng = random.Random(seed)
    sentences = [line for line in corpus_lines(2000, seed=seed) if line.isascii()]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(sentences, k=rng.randint(1, 4)))
            reply = " ".join(rng.choices(sentences, k=rng.randint(1, 6)))
            record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}
            f.write(json.dumps(record) + "\n")


def loop_benchmark(args) -> dict:
    """train_sft.py's logged tokens/s against the bare step's, on the batches the loop trains on."""
    from nanotune.checkpoint import load_pretrained, save_pretrained
    from nanotune.data.collate import collate_blocks
    from nanotune.data.sft import PackedSFTDataset, build_sft_dataset
    from nanotune.tokenizer import Tokenizer

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    config = preset_config(args.preset, args.seq_len)
    total_steps = args.loop_windows * args.loop_log_every
    with tempfile.TemporaryDirectory(prefix="nanotune_loop_") as tmp:
        tmp = Path(tmp)
        tokenizer_path = ROOT.parent / "shared" / "data" / "llama2_tokenizer.model"
        if not tokenizer_path.exists():  # a small SentencePiece model; the model keeps its 32000 rows
            sys.path.insert(0, str(ROOT / "tests"))
            from helpers import train_sentencepiece

            tokenizer_path = train_sentencepiece(tmp / "tokenizer", vocab_size=400)
        tokenizer = Tokenizer.from_file(tokenizer_path)
        config.vocab_size = max(config.vocab_size, tokenizer.vocab_size)  # every token id needs a row
        model_dir = tmp / "model"
        save_pretrained(nanotune_model(config, args.seed, torch.float32, "cpu"), model_dir)
        data_file = tmp / "conversations.jsonl"
        write_conversations(data_file, n=args.batch_size * total_steps * 8, seed=args.seed)

        samples = build_sft_dataset(data_file, tokenizer, "llama2", max_length=args.seq_len)
        blocks = PackedSFTDataset(samples, args.seq_len, tokenizer.pad_id)
        log(f"{len(samples)} conversations -> {len(blocks)} packed rows of {args.seq_len} "
            f"(fill {blocks.stats['fill']:.2f}); loop: {total_steps} steps of {args.batch_size} rows, "
            f"tokens/s logged every {args.loop_log_every}")

        model = load_pretrained(model_dir).train()
        optimizer = adamw(model)
        batches = [collate_blocks([blocks[i] for i in range(s * args.batch_size, (s + 1) * args.batch_size)])
                   for s in range(min(len(blocks) // args.batch_size, args.warmup + args.steps))]

        def bare_step_times() -> list[float]:
            times = []
            for i, batch in enumerate(batches):
                count = n_targets(batch["labels"])
                started = time.perf_counter()
                loss_sum = model(**batch)
                (loss_sum / count).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if i >= args.warmup:
                    times.append(time.perf_counter() - started)
            return times

        load_before = load_average()
        bare = bare_step_times()
        command = [
            sys.executable, str(ROOT / "train_sft.py"),
            f"--output_dir={tmp / 'run'}", f"--seed={args.seed}",
            f"--model.path={model_dir}", f"--tokenizer.path={tokenizer_path}",
            f"--data.train_files={data_file}", "--data.format=messages", "--data.template=llama2",
            f"--data.max_length={args.seq_len}", "--data.packing=true",
            f"--train.batch_size={args.batch_size}", f"--train.max_steps={total_steps}", "--train.device=cpu",
            f"--log.every_steps={args.loop_log_every}", "--checkpoint.save_final=false",
        ]
        log("running: " + " ".join(command))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
        if result.returncode != 0:
            raise SystemExit(f"train_sft.py failed:\n{result.stderr[-2000:]}")
        bare += bare_step_times()  # the bare step again after the loop: load drift shows up in both
        load_after = load_average()
        records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        windows = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first holds the warm-up

    tokens = args.batch_size * args.seq_len
    bare_tokens_per_s = tokens / statistics.median(bare)
    loop_tokens_per_s = statistics.median(windows)
    ratio = loop_tokens_per_s / bare_tokens_per_s
    log(f"bare step:   {bare_tokens_per_s:8.1f} tokens/s (median of {len(bare)} steps, before and after the loop)")
    log(f"train_sft.py: {loop_tokens_per_s:8.1f} tokens/s (median of {len(windows)} log windows: "
        + ", ".join(f"{w:.1f}" for w in windows) + ")")
    log(f"loop / bare step: {ratio:.3f}   (1-minute load {load_before:.2f} before, {load_after:.2f} after)")
    return {"device": device_description("cpu"), "batch_size": args.batch_size, "seq_len": args.seq_len,
            "bare_tokens_per_s": bare_tokens_per_s, "loop_tokens_per_s": loop_tokens_per_s,
            "loop_windows_tokens_per_s": windows, "loop_over_bare": ratio,
            "load_before": load_before, "load_after": load_after}


# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="issue", help="model shape: issue (51M), 1b (TinyLlama 1.1B), tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="parameter and compute dtype")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--packed-docs", type=int, default=0, help="N > 1: rows packed with N documents each")
    parser.add_argument("--packed-attention", default="auto", help="nanotune's: auto, spans, mask, flex")
    parser.add_argument("--loss-chunk-tokens", type=int, default=512, help="nanotune's model.loss_chunk_tokens")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (all implementations)")
    parser.add_argument("--impls", default="nanotune,transformers,torchtune,litgpt")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per implementation")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compilation happens here)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory subprocesses")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps run by each memory probe")
    parser.add_argument("--no-in-use", dest="in_use", action="store_false",
                        help="skip the second probes (memory in use, with MALLOC_MMAP_THRESHOLD_ set in them)")
    parser.add_argument("--prompt-fraction", type=float, default=0.0,
                        help="SFT-shaped rows: this fraction of each row is prompt (labels -100), the rest reply")
    parser.add_argument("--max-load", type=float, default=0.0,
                        help="wait (up to --max-wait s) for the 1-minute load to fall below this first")
    parser.add_argument("--max-wait", type=float, default=600.0)
    parser.add_argument("--loop", action="store_true", help="train_sft.py end to end vs the bare step (item 5)")
    parser.add_argument("--loop-windows", type=int, default=5, help="--loop: log windows (the first is dropped)")
    parser.add_argument("--loop-log-every", type=int, default=4, help="--loop: steps per log window")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after the measured steps, profile STEPS more of each implementation by operator")
    parser.add_argument("--profile-rows", type=int, default=15, help="--profile: operators listed per implementation")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="an experiment: glibc keeps freed memory for reuse in this process (both implementations "
                             "alike), so no step faults in fresh pages; implies --no-memory (common.keep_freed_memory)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 <= args.prompt_fraction < 1:
        parser.error(f"--prompt-fraction must be in [0, 1): some of every row must be reply, not {args.prompt_fraction}")
    if args.profile < 0 or args.profile_rows < 1:
        parser.error(f"--profile must be >= 0 and --profile-rows >= 1, not {args.profile} and {args.profile_rows}")
    if args.keep_freed_memory:
        if args.device != "cpu" or args.loop:
            parser.error("--keep-freed-memory is about this process's host memory: it needs --device cpu, not --loop")
        args.memory = False  # the probes measure glibc's default, as users run
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args)
    if args.keep_freed_memory:
        keep_freed_memory()  # before anything is built
    result = loop_benchmark(args) if args.loop else run_benchmark(args, argv)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
