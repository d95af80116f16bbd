"""The training loop: read `train` top to bottom and you know everything a step does.

    for each optimizer step:
        fetch this rank's micro-batches of the global batch
        count the units of the whole global batch (target tokens or pairs; all micro-batches, all ranks)
        for each micro-batch: forward -> summed loss (the objective) -> scale -> backward
        clip gradients -> set the learning rate -> optimizer step -> zero gradients
        now and then: log, evaluate, save a checkpoint

The loss of a step is the mean over every unit of the global batch, however the batch is split
into micro-batches and ranks (see objective.py for why that needs a sum and one global count).

No step waits for the device except on log steps: losses and counts are accumulated as tensors
and read (`.item()`) only when a line is logged.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .checkpoint import generation_config_text, save_pretrained
from .config import RunConfig, to_toml
from .data.sampler import GlobalBatchSampler
from .distributed import Run
from .files import replace_folder, temporary_folder, write_text_atomically
from .model import Llama
from .neftune import add_neftune_noise
from .objective import TokenObjective
from .optim import build_optimizer, schedule_from_config
from .preflight import check_enough_samples
from .run_lock import unlock_output_dir
from .run_log import DivergenceGuard, LogWindow, MetricsFile, log_start, log_summary, progress_bar
from .train_state import EvalTracker, TrainingState, begin_run, last_checkpoint, run_layout

log = logging.getLogger("nanotune")


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
    objective=None,
    chat_template: str | None = None,
) -> TrainResult:
    """Train `model` on `train_data` (a map-style dataset) as `config` says; save and return a summary.

    `lengths`: the length of every sample, to batch similar lengths together (padded SFT with
    `data.group_by_length`); None = plain shuffling. `objective`: what a step minimises
    (default: next-token cross-entropy, see objective.py). `chat_template`: the Jinja saved with
    the final model's tokenizer, so `apply_chat_template` lays conversations out as training did.
    """
    objective = objective or TokenObjective()
    output_dir = begin_run(config, run)

    # The model: checkpointing, compilation, sharding and the device, in one ordered recipe.
    trainable_only = any(not p.requires_grad for p in model.parameters())
    model = distributed.parallelize(model, run, activation_checkpointing=config.train.activation_checkpointing,
                                    compile_blocks=config.train.compile, fsdp=config.distributed)
    if config.train.neftune_alpha > 0:
        add_neftune_noise(model, config.train.neftune_alpha)
    optimizer = build_optimizer(model, config.optim, run.device.type)
    trained_parameters = [p for p in model.parameters() if p.requires_grad]

    # The data: which samples each rank reads at each step.
    check_enough_samples(len(train_data), config, run.world_size, config.data.train_files)
    sampler = GlobalBatchSampler(
        len(train_data),
        global_batch_size=config.train.batch_size * config.train.grad_accum * run.world_size,
        micro_batch_size=config.train.batch_size,
        world_size=run.world_size,
        rank=run.rank,
        seed=config.seed,
        lengths=lengths,
        group_by_length=lengths is not None,
        # Weighted data.train_files (a data.sampler.MixedDataset): each epoch drawn by the weights.
        sources=getattr(train_data, "sources", None), weights=getattr(train_data, "weights", None),
    )
    total_steps = config.train.max_steps or max(1, int(config.train.epochs * sampler.steps_per_epoch))
    lr_for_step = schedule_from_config(config.optim, total_steps)
    autocast, scaler = mixed_precision(config.train.mixed_precision, run)

    evals = EvalTracker(patience=config.eval.early_stopping_patience)
    state = TrainingState(model, optimizer, sampler, scaler, trainable_only, run_layout(config, run.world_size), evals)
    resume = config.checkpoint.resume
    start_step = state.resume(output_dir, run, named=resume if isinstance(resume, str) else None) if resume else 0
    metrics = MetricsFile(output_dir / "metrics.jsonl", run, keep_up_to_step=start_step, log_config=config.log)
    if run.is_main:
        log_start(run, config, total_steps, start_step, sampler.steps_per_epoch)

    progress = progress_bar(run, config, total=total_steps, initial=start_step, desc="train")
    window = LogWindow(run.device, objective)
    guard = DivergenceGuard(run.device, watch_grad_norm=scaler is None)  # NaN or inf stops the run
    batches = iter(sampler)
    last_eval: dict = {}
    last_record: dict = {}
    model.train()
    started, done = time.perf_counter(), start_step
    for step in range(start_step, total_steps):
        micro_batches = [to_device(collate([train_data[i] for i in indices]), run.device) for indices in next(batches)]

        # The denominator of the loss: the units (target tokens, pairs) of the whole global batch.
        n_units = distributed.all_reduce_sum(sum(objective.count(batch) for batch in micro_batches).float(), run)
        # FSDP averages gradients over ranks; multiplying by world_size turns that average into a sum.
        loss_scale = run.world_size / n_units.clamp(min=1)

        for i, batch in enumerate(micro_batches):
            distributed.set_gradient_sync(model, i == len(micro_batches) - 1)
            with autocast:
                loss_sum, sums = objective.loss(model, batch)  # summed over this micro-batch's units
            scaled = loss_sum * loss_scale
            (scaler.scale(scaled) if scaler else scaled).backward()
            window.add_micro_batch(loss_sum.detach(), sums, batch["input_ids"].numel())

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
        window.add_step(n_units, grad_norm)
        progress.update(1)

        done = step + 1
        guard.observe(done, window.loss_sum, grad_norm)
        if done % config.log.every_steps == 0 or done == total_steps:
            guard.check(run, last_checkpoint(output_dir))
            last_record = {"step": done, **window.summary(run), "lr": lr, "epoch": sampler.epoch}
            metrics.write(last_record)
            progress.set_postfix(loss=f"{last_record['loss']:.4f}", lr=f"{lr:.2e}")
        if valid_data is not None and config.eval.every_steps and done % config.eval.every_steps == 0 and done < total_steps:
            last_eval = evaluate(model, objective, valid_data, collate, run, config, autocast)
            metrics.write({"step": done, **last_eval}, split="eval")
            if evals.update(done, last_eval["eval_loss"]) and config.checkpoint.save_best:
                save_final(model, tokenizer, output_dir, run, config, chat_template, name="best")
        if config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0 and done < total_steps:
            guard.check(run, last_checkpoint(output_dir))  # never save a diverged model
            state.save(output_dir, done, run, config.checkpoint.keep_last)
        if evals.should_stop:
            log.info("early stopping at step %d: no lower eval loss in %d evaluations (best %.4f at step %d)",
                     done, evals.patience, evals.best_loss, evals.best_step)
            break
    progress.close()

    if valid_data is not None and not evals.should_stop:
        last_eval = evaluate(model, objective, valid_data, collate, run, config, autocast)
        metrics.write({"step": done, **last_eval}, split="eval")
        if evals.update(done, last_eval["eval_loss"]) and config.checkpoint.save_best:
            save_final(model, tokenizer, output_dir, run, config, chat_template, name="best")
    guard.check(run, last_checkpoint(output_dir))
    if config.checkpoint.save_final:
        save_final(model, tokenizer, output_dir, run, config, chat_template)
    distributed.barrier(run)
    metrics.close()
    if run.is_main:
        unlock_output_dir(output_dir)  # taken in build.start_run, before anything was written
        log_summary(output_dir, config, done - start_step, time.perf_counter() - started, last_record, last_eval, evals)
    return TrainResult(steps=done, final_loss=last_record.get("loss"), eval=last_eval,
                       tokens_per_s=last_record.get("tokens_per_s"))


# ----------------------------------------------------------------------------------------------
# One level down: the pieces the loop calls
# ----------------------------------------------------------------------------------------------


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


@torch.no_grad()
def evaluate(model: nn.Module, objective, data, collate, run: Run, config: RunConfig, autocast) -> dict:
    """The objective's figures over the validation set (`eval_loss`, ...), split across ranks.

    Every rank runs the same number of forwards (FSDP's all-gathers are collectives): a rank whose
    share is short repeats an item with nothing to learn, which adds nothing to the sums.
    """
    was_training = model.training
    model.eval()
    batch_size = config.eval.batch_size or config.train.batch_size
    indices = list(range(run.rank, len(data), run.world_size))
    per_rank = -(-len(data) // run.world_size)
    padded = indices + [None] * (per_rank - len(indices))
    batches = [padded[i : i + batch_size] for i in range(0, len(padded), batch_size)]
    if config.eval.max_batches:
        batches = batches[: config.eval.max_batches]
    window = LogWindow(run.device, objective)
    for batch_indices in progress_bar(run, config, iterable=batches, desc="eval", leave=False):
        items = [data[i] if i is not None else objective.without_units(data[0]) for i in batch_indices]
        batch = to_device(collate(items), run.device)
        with autocast:
            loss_sum, sums = objective.loss(model, batch)
        window.add_micro_batch(loss_sum, sums, 0)
        window.units += objective.count(batch)
    model.train(was_training)
    loss_sum = distributed.all_reduce_sum(window.loss_sum, run).item()
    sums = {name: distributed.all_reduce_sum(value, run).item() for name, value in sorted(window.sums.items())}
    units = distributed.all_reduce_sum(window.units.float(), run).item()
    summary = objective.summary(loss_sum, units, sums)
    return {f"eval_{name}": value for name, value in summary.items()} | {f"eval_{objective.unit}": int(units)}


# ----------------------------------------------------------------------------------------------
# The final model
# ----------------------------------------------------------------------------------------------


def save_final(model: Llama, tokenizer, output_dir: Path, run: Run, config: RunConfig, chat_template=None,
               name: str = "final") -> None:
    """output_dir/final: the HF-format model or the LoRA adapter, with the tokenizer and the config.

    Everything is written into a new temporary folder that then replaces `final/` whole: an
    earlier run's files (a full model where an adapter now goes) never stay beside the new ones,
    and a kill leaves the old `final/` or the new one. All ranks call this (gathering a sharded
    tensor is a collective); rank 0 writes.
    """
    dtype = config.checkpoint.final_dtype or None

    def fill(folder: Path, model=model) -> None:
        if config.lora.enabled:
            from . import lora

            lora.save_adapter(model, folder, run=run)
            if run.is_main:  # the stop ids travel with the adapter too
                write_text_atomically(folder / "generation_config.json", generation_config_text(model.config))
        else:
            save_pretrained(model, folder, max_shard_size=config.checkpoint.max_shard_size, dtype=dtype, run=run)
        if run.is_main:
            tokenizer.save(folder, chat_template=chat_template)
            write_text_atomically(folder / "training_config.toml", to_toml(config))

    write_whole_folder(output_dir / name, run, fill)
    if config.lora.enabled and config.lora.merge_final and name == "final":
        if run.distributed:
            log.warning("lora.merge_final with FSDP: run `python merge.py lora` on the saved adapter instead")
            return
        from . import lora

        merged = lora.merged_copy(model)
        config = replace(config, lora=replace(config.lora, enabled=False))  # the merged model is a full one
        write_whole_folder(output_dir / "final_merged", run, lambda folder: fill(folder, merged))


def write_whole_folder(path: Path, run: Run, fill: Callable[[Path], None]) -> None:
    """`fill(folder)` writes into a new temporary folder (rank 0's; the others pass through) that
    then replaces `path` whole; on any error or Ctrl-C the temporary folder is removed."""
    temporary = temporary_folder(path) if run.is_main else None
    try:
        fill(temporary / "model" if run.is_main else path)  # only rank 0 writes; the others join collectives
        distributed.barrier(run)
    except BaseException:
        if run.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    if run.is_main:
        replace_folder(temporary / "model", path)
        temporary.rmdir()
