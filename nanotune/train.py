"""The training loop: read `train` top to bottom and you know everything a step does.

    for each optimizer step:
        fetch this rank's micro-batches of the global batch
        count the target tokens of the whole global batch (all micro-batches, all ranks)
        for each micro-batch: forward -> summed token loss -> scale -> backward
        clip gradients -> set the learning rate -> optimizer step -> zero gradients
        now and then: log, evaluate, save a checkpoint

The loss of a step is the mean over every target token of the global batch, however the batch is
split into micro-batches and ranks. Each forward returns the *sum* of its token losses; dividing
by the global token count before the backward makes the accumulated gradient exactly that of one
big batch. (Averaging per-micro-batch means instead would weight a token in a short micro-batch
more than one in a long micro-batch, and gradient accumulation would no longer equal a big batch.)

No step waits for the device except on log steps: losses and token counts are accumulated as
tensors and read (`.item()`) only when a line is logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .checkpoint import generation_config_text, model_config_dict, write_hf_checkpoint
from .config import ConfigError, RunConfig, save_config, to_toml
from .data.sampler import GlobalBatchSampler
from .distributed import Run
from .model import IGNORE_INDEX, Llama
from .optim import build_optimizer, schedule_from_config

log = logging.getLogger("nanotune")

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    eval: dict = field(default_factory=dict)
    tokens_per_s: float | None = None


def train(
    config: RunConfig,
    run: Run,
    model: Llama,
    tokenizer,
    train_data,
    valid_data,
    collate: Callable[[list], dict],
    lengths: list[int] | None = None,
) -> TrainResult:
    """Train `model` on `train_data` (a map-style dataset) as `config` says; save and return a summary."""
    output_dir = Path(config.output_dir)
    if run.is_main:
        save_config(config, output_dir)
    seed_everything(config.seed, run.rank)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)

    # The model: options that wrap its blocks, then sharding across ranks, then the device.
    trainable_only = any(not p.requires_grad for p in model.parameters())
    apply_block_options(model, config.train.activation_checkpointing, config.train.compile)
    if run.distributed:
        full_state = model.state_dict() if run.is_main else None  # the other ranks hold only shapes
        distributed.shard_model(model, run, config.distributed)
        distributed.broadcast_weights_from_rank0(model, full_state, run)
        del full_state
    model.to(run.device)
    optimizer = build_optimizer(model, config.optim, run.device.type)
    trained_parameters = [p for p in model.parameters() if p.requires_grad]

    # The data: which sequences each rank reads at each step.
    sampler = GlobalBatchSampler(
        len(train_data),
        global_batch_size=config.train.batch_size * config.train.grad_accum * run.world_size,
        micro_batch_size=config.train.batch_size,
        world_size=run.world_size,
        rank=run.rank,
        seed=config.seed,
        lengths=lengths,
        group_by_length=getattr(config.data, "group_by_length", False) and lengths is not None,
    )
    total_steps = config.train.max_steps or max(1, int(config.train.epochs * sampler.steps_per_epoch))
    lr_for_step = schedule_from_config(config.optim, total_steps)
    autocast, scaler = mixed_precision(config.train.mixed_precision, run)

    start_step = 0
    if config.checkpoint.resume:
        start_step = resume_from_latest(output_dir, model, optimizer, sampler, scaler, run, trainable_only)
    metrics = MetricsFile(output_dir / "metrics.jsonl", run, keep_up_to_step=start_step)
    if run.is_main:
        trainable, total = count_unique(model)
        log.info("training %s of %s parameters for %d steps from step %d (%d steps per epoch)",
                 f"{trainable:,}", f"{total:,}", total_steps, start_step, sampler.steps_per_epoch)

    progress = tqdm(total=total_steps, initial=start_step, disable=not (run.is_main and config.log.progress_bar),
                    desc="train", dynamic_ncols=True)
    window = LogWindow(run.device)
    batches = iter(sampler)
    last_eval: dict = {}
    last_record: dict = {}
    model.train()
    for step in range(start_step, total_steps):
        micro_batches = [to_device(collate([train_data[i] for i in indices]), run.device) for indices in next(batches)]

        # The denominator of the loss: target tokens of the whole global batch.
        n_targets = sum((batch["labels"] != IGNORE_INDEX).sum() for batch in micro_batches)
        n_targets = distributed.all_reduce_sum(n_targets.float(), run)
        # FSDP averages gradients over ranks; multiplying by world_size turns that average into a sum.
        loss_scale = run.world_size / n_targets.clamp(min=1)

        for i, batch in enumerate(micro_batches):
            distributed.set_gradient_sync(model, i == len(micro_batches) - 1)
            with autocast:
                loss_sum = model(**batch)  # the summed token loss of this micro-batch
            scaled = loss_sum * loss_scale
            (scaler.scale(scaled) if scaler else scaled).backward()
            window.add_micro_batch(loss_sum.detach(), batch["input_ids"].numel())

        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = clip_gradients(trained_parameters, config.optim.max_grad_norm)
        lr = lr_for_step(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.add_step(n_targets, grad_norm)
        progress.update(1)

        done = step + 1
        if done % config.log.every_steps == 0 or done == total_steps:
            last_record = {"step": done, **window.summary(run), "lr": lr, "epoch": sampler.epoch}
            metrics.write(last_record)
            progress.set_postfix(loss=f"{last_record['loss']:.4f}", lr=f"{lr:.2e}")
        if valid_data is not None and config.eval.every_steps and done % config.eval.every_steps == 0 and done < total_steps:
            last_eval = evaluate_loss(model, valid_data, collate, run, config, autocast)
            metrics.write({"step": done, **last_eval})
        if config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0 and done < total_steps:
            save_checkpoint(output_dir, done, model, optimizer, sampler, scaler, run, trainable_only,
                            config.checkpoint.keep_last)
    progress.close()

    if valid_data is not None:
        last_eval = evaluate_loss(model, valid_data, collate, run, config, autocast)
        metrics.write({"step": total_steps, **last_eval})
    if config.checkpoint.save_final:
        save_final(model, tokenizer, output_dir, run, config)
    distributed.barrier(run)
    return TrainResult(steps=total_steps, final_loss=last_record.get("loss"), eval=last_eval,
                       tokens_per_s=last_record.get("tokens_per_s"))


# ----------------------------------------------------------------------------------------------
# One level down: the pieces the loop calls
# ----------------------------------------------------------------------------------------------


def seed_everything(seed: int, rank: int) -> None:
    """Python, NumPy and torch RNGs. Data order does not depend on these (the sampler has its own seed);
    dropout and NEFTune noise do, and differ per rank."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def apply_block_options(model: Llama, activation_checkpointing: bool, compile_blocks: bool) -> None:
    """Activation checkpointing and `torch.compile`, per transformer block.

    Compiling each block rather than the whole model ("regional compilation") compiles one block's
    graph and reuses it for every layer: compile time no longer grows with depth, and the
    embedding, loss and Python control flow around the blocks stay eager.
    """
    for block in model.model.layers:
        block.checkpoint_activations = activation_checkpointing
        if compile_blocks:
            block.compile()
    model.blocks_compiled = model.blocks_compiled or compile_blocks


def mixed_precision(setting: str, run: Run):
    """(autocast context, gradient scaler or None) for train.mixed_precision.

    auto: bf16 autocast on a GPU that supports it, plain fp32 on the CPU (CPU bf16 matmuls are
    slow on most machines and change results). fp16 needs a gradient scaler: its range is small
    enough that small gradients underflow to zero unless the loss is scaled up first.
    """
    device_type = run.device.type
    if setting == "auto":
        setting = "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if setting == "none":
        return contextlib.nullcontext(), None
    if setting == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16), None
    if run.distributed:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device_type)
    else:
        scaler = torch.amp.GradScaler(device_type)
    return torch.autocast(device_type, dtype=torch.float16), scaler


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def clip_gradients(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients down together if their global L2 norm exceeds max_norm; return the norm.

    With FSDP the gradients are DTensor shards; the norm is reduced over all ranks so every rank
    clips by the same factor. The norm stays a tensor (no host sync) until it is logged.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=True)
    return total_norm


class LogWindow:
    """Sums since the last log line, kept as tensors so no step waits for the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.targets = torch.zeros((), device=self.device)
        self.grad_norm_sum = torch.zeros((), device=self.device)
        self.tokens = 0
        self.steps = 0
        self.started = time.perf_counter()

    def add_micro_batch(self, loss_sum: torch.Tensor, n_tokens: int) -> None:
        self.loss_sum += loss_sum.float()
        self.tokens += n_tokens

    def add_step(self, n_targets: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.targets += n_targets
        self.grad_norm_sum += grad_norm.to(self.device).float()
        self.steps += 1

    def summary(self, run: Run) -> dict:
        """The window's mean loss over all target tokens of all ranks; this is the host sync."""
        loss_sum = distributed.all_reduce_sum(self.loss_sum.clone(), run)
        loss = (loss_sum / self.targets.clamp(min=1)).item()
        elapsed = time.perf_counter() - self.started
        record = {
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "grad_norm": (self.grad_norm_sum / max(self.steps, 1)).item(),
            "tokens_per_s": self.tokens * run.world_size / elapsed,
            "target_tokens_per_s": self.targets.item() / elapsed,
        }
        self.reset()
        return record


class MetricsFile:
    """output_dir/metrics.jsonl, one JSON object per line, written by rank 0.

    On resume, lines logged after the checkpoint's step (by the run that was interrupted) are
    dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, run: Run, keep_up_to_step: int):
        self.path, self.run = path, run
        if not run.is_main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists() and keep_up_to_step > 0:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_up_to_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut off by a kill
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(temporary, path)

    def write(self, record: dict) -> None:
        if not self.run.is_main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        message = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        log.info(message)


@torch.no_grad()
def evaluate_loss(model: nn.Module, data, collate, run: Run, config: RunConfig, autocast) -> dict:
    """Mean token loss and perplexity over the validation set, split across ranks.

    Every rank runs the same number of forwards (FSDP's all-gathers are collectives): a rank whose
    share is short repeats an item with all its labels masked, which adds nothing to the sums.
    """
    was_training = model.training
    model.eval()
    batch_size = config.eval.batch_size or config.train.batch_size
    indices = list(range(run.rank, len(data), run.world_size))
    per_rank = math.ceil(len(data) / run.world_size)
    padded = indices + [None] * (per_rank - len(indices))
    batches = [padded[i : i + batch_size] for i in range(0, len(padded), batch_size)]
    if config.eval.max_batches:
        batches = batches[: config.eval.max_batches]
    loss_sum = torch.zeros((), device=run.device)
    n_targets = torch.zeros((), device=run.device)
    for batch_indices in tqdm(batches, desc="eval", leave=False, disable=not (run.is_main and config.log.progress_bar)):
        items = [data[i] if i is not None else _masked(data[0]) for i in batch_indices]
        batch = to_device(collate(items), run.device)
        with autocast:
            loss_sum += model(**batch).float()
        n_targets += (batch["labels"] != IGNORE_INDEX).sum()
    distributed.all_reduce_sum(loss_sum, run)
    distributed.all_reduce_sum(n_targets, run)
    model.train(was_training)
    eval_loss = (loss_sum / n_targets.clamp(min=1)).item()
    return {"eval_loss": eval_loss, "ppl": math.exp(min(eval_loss, 50.0)), "eval_tokens": int(n_targets.item())}


def _masked(item: dict) -> dict:
    masked = dict(item)
    labels = item["labels"]
    masked["labels"] = torch.full_like(labels, IGNORE_INDEX) if torch.is_tensor(labels) else [IGNORE_INDEX] * len(labels)
    return masked


def count_unique(model: nn.Module) -> tuple[int, int]:
    from .build import count_parameters

    return count_parameters(model)


# ----------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue exactly where a run stopped
# ----------------------------------------------------------------------------------------------


def check_output_dir(output_dir: Path, config: RunConfig) -> None:
    """Refuse to mix two runs' checkpoints in one folder, unless told to resume or to start over."""
    earlier = checkpoint_folders(output_dir)
    if not earlier or config.checkpoint.resume:
        return
    if not config.checkpoint.overwrite:
        raise ConfigError(
            f"{output_dir}: holds checkpoints of an earlier run ({earlier[-1].name}); pass "
            f"--checkpoint.resume=true to continue it or --checkpoint.overwrite=true to start over"
        )
    shutil.rmtree(output_dir / CHECKPOINTS)


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder still named step_N.tmp was never finished."""
    root = output_dir / CHECKPOINTS
    if not root.exists():
        return []
    complete = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(complete, key=lambda p: int(p.name[5:]))


def save_checkpoint(output_dir, step, model, optimizer, sampler, scaler, run: Run, trainable_only: bool, keep_last: int):
    """Write checkpoints/step_N: model + optimizer shards, data position, RNG states, scaler.

    Everything goes into step_N.tmp first; rank 0 renames it when every rank has finished, so a
    kill at any moment leaves either a complete checkpoint or an ignored .tmp folder.
    """
    root = output_dir / CHECKPOINTS
    final = root / f"step_{step}"
    temporary = root / f"step_{step}.tmp"
    if run.is_main:
        for stale in root.glob("*.tmp") if root.exists() else []:
            shutil.rmtree(stale)
        temporary.mkdir(parents=True)
    distributed.barrier(run)
    distributed.save_training_state(temporary / "state", model, optimizer, trainable_only)
    torch.save(rng_state(), temporary / f"rng_rank{run.rank}.pt")
    if run.is_main:
        trainer_state = {"step": step, "sampler": sampler.state_dict(), "world_size": run.world_size,
                         "scaler": scaler.state_dict() if scaler else None}
        (temporary / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
    distributed.barrier(run)
    if run.is_main:
        os.replace(temporary, final)
        for old in checkpoint_folders(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    distributed.barrier(run)


def resume_from_latest(output_dir: Path, model, optimizer, sampler, scaler, run: Run, trainable_only: bool) -> int:
    """Load the latest complete checkpoint, if any; return the step to continue from (0 = none)."""
    folders = checkpoint_folders(output_dir) if run.is_main else []
    latest = distributed.broadcast_string(str(folders[-1]) if folders else None, run)
    if latest is None:
        log.info("checkpoint.resume: no checkpoint in %s, starting from step 0", output_dir / CHECKPOINTS)
        return 0
    folder = Path(latest)
    trainer_state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    distributed.load_training_state(folder / "state", model, optimizer, trainable_only)
    sampler.load_state_dict(trainer_state["sampler"])
    if scaler and trainer_state.get("scaler"):
        scaler.load_state_dict(trainer_state["scaler"])
    rng_file = folder / f"rng_rank{run.rank}.pt"
    if rng_file.exists() and trainer_state.get("world_size") == run.world_size:
        set_rng_state(torch.load(rng_file, weights_only=True))
    log.info("resumed from %s (step %d)", folder, trainer_state["step"])
    return int(trainer_state["step"])


def rng_state() -> dict:
    """Every RNG a step may draw from, in types `torch.load(weights_only=True)` accepts."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------
# The final model
# ----------------------------------------------------------------------------------------------


def save_final(model: Llama, tokenizer, output_dir: Path, run: Run, config: RunConfig) -> None:
    """output_dir/final: the HF-format model and tokenizer (or the LoRA adapter, and optionally the merged model)."""
    final = output_dir / "final"
    dtype = None
    if config.checkpoint.final_dtype:
        from .build import DTYPES

        dtype = DTYPES[config.checkpoint.final_dtype]
    if config.lora.enabled:
        from . import lora

        lora.save_adapter(model, final, run=run)
        if run.is_main:
            tokenizer.save(final)
        if config.lora.merge_final:
            export_merged_lora(model, output_dir / "final_merged", tokenizer, run, config, dtype)
        return
    save_full_model(model, final, run, dtype=dtype, max_shard_size=config.checkpoint.max_shard_size)
    if run.is_main:
        tokenizer.save(final)
        (final / "training_config.toml").write_text(to_toml(config), encoding="utf-8")


def save_full_model(model: Llama, path: Path, run: Run, dtype=None, max_shard_size="5GB") -> None:
    """Write a HF-format folder from a possibly sharded model, one shard file at a time.

    Each parameter is gathered whole (all ranks join) only when its shard file is being written,
    and only rank 0 keeps and writes it: peak extra memory is one shard file, not a model copy.
    """
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    specs = {name: (t.shape, dtype or t.dtype) for name, t in state.items()}

    def get_tensor(name):
        tensor = distributed.full_tensor(state[name])
        return tensor.to(dtype) if dtype is not None else tensor

    out_dtype = dtype or next(iter(specs.values()))[1]
    write_hf_checkpoint(path, model_config_dict(model, out_dtype), specs, get_tensor, max_shard_size,
                        is_writer=run.is_main,
                        extra_files=[("generation_config.json", generation_config_text(model.config))])
    distributed.barrier(run)


def export_merged_lora(model, path, tokenizer, run, config, dtype):
    from . import lora

    merged = lora.merged_copy(model) if not run.distributed else None
    if merged is None:
        log.warning("lora.merge_final with FSDP: run `python merge.py lora` on the saved adapter instead")
        return
    if run.is_main:
        save_full_model(merged, path, Run(), dtype=dtype, max_shard_size=config.checkpoint.max_shard_size)
        tokenizer.save(path)
