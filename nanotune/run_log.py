"""What a run writes as it goes: the sums behind each log line, and metrics.jsonl.

`LogWindow` keeps the loss, the units and the gradient norm since the last log line as tensors on
the device, so no step waits for it; `summary` is the one host sync, on log steps only.
`MetricsFile` appends one JSON object per line (rank 0 only).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .distributed import Run
from .files import write_text_atomically

log = logging.getLogger("nanotune")


class LogWindow:
    """Sums since the last log line, kept as tensors so no step waits for the device."""

    def __init__(self, device: torch.device, objective):
        self.device, self.objective = device, objective
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.sums: dict[str, torch.Tensor] = {}
        self.units = torch.zeros((), device=self.device)
        self.grad_norm_sum = torch.zeros((), device=self.device)
        self.tokens = 0
        self.steps = 0
        self.started = time.perf_counter()

    def add_micro_batch(self, loss_sum: torch.Tensor, sums: dict[str, torch.Tensor], n_tokens: int) -> None:
        self.loss_sum += loss_sum.float()
        for name, value in sums.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.tokens += n_tokens

    def add_step(self, n_units: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.units += n_units
        self.grad_norm_sum += grad_norm.to(self.device).float()
        self.steps += 1

    def summary(self, run: Run) -> dict:
        """The window's mean loss over all units of all ranks; this is the host sync."""
        loss_sum = distributed.all_reduce_sum(self.loss_sum.clone(), run).item()
        sums = {name: distributed.all_reduce_sum(value.clone(), run).item() for name, value in sorted(self.sums.items())}
        units = self.units.item()
        elapsed = time.perf_counter() - self.started
        record = {
            **self.objective.summary(loss_sum, units, sums),
            "grad_norm": (self.grad_norm_sum / max(self.steps, 1)).item(),
            "tokens_per_s": self.tokens * run.world_size / elapsed,
            f"{self.objective.unit}_per_s": units / elapsed,
        }
        self.reset()
        return record


class MetricsFile:
    """output_dir/metrics.jsonl, one JSON object per line, written by rank 0; TensorBoard and W&B beside it.

    Every record carries `step`, `split` ("train" or "eval") and `time` (seconds since the epoch),
    so train and eval curves, and several runs, can be drawn against steps or wall time
    (`python -m nanotune.plot`). On resume, lines logged after the checkpoint's step (by the run
    that was interrupted) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, run: Run, keep_up_to_step: int, log_config=None, config_for_wandb: dict | None = None):
        self.path, self.run = path, run
        self.sinks: list = []
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
        write_text_atomically(path, "".join(line + "\n" for line in kept))
        if log_config is not None and log_config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.sinks.append(TensorBoardSink(SummaryWriter(str(path.parent / "tensorboard"))))
        if log_config is not None and log_config.wandb:
            import wandb

            self.sinks.append(WandbSink(wandb.init(project=log_config.wandb_project, dir=str(path.parent),
                                                   name=path.parent.name, config=config_for_wandb)))

    def write(self, record: dict, split: str = "train") -> None:
        if not self.run.is_main:
            return
        record = {"step": record["step"], "split": split, "time": round(time.time(), 3),
                  **{k: v for k, v in record.items() if k != "step"}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(record)
        shown = {k: v for k, v in record.items() if k not in ("time", "split")}
        log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


class TensorBoardSink:
    """Scalars under `train/<name>` and `eval/<name>` at their step."""

    def __init__(self, writer):
        self.writer = writer

    def write(self, record: dict) -> None:
        prefix = record["split"]
        for name, value in record.items():
            if name not in ("step", "split", "time") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{name.removeprefix('eval_')}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """The same record, logged to a W&B run (offline with WANDB_MODE=offline)."""

    def __init__(self, wandb_run):
        self.wandb_run = wandb_run

    def write(self, record: dict) -> None:
        values = {f"{record['split']}/{k.removeprefix('eval_')}": v for k, v in record.items()
                  if k not in ("step", "split", "time") and isinstance(v, (int, float))}
        self.wandb_run.log(values, step=record["step"])

    def close(self) -> None:
        self.wandb_run.finish()


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite: the run stops before saving anything more."""


class DivergenceGuard:
    """Watches every step for a non-finite loss or gradient norm without waiting for the device.

    `observe` keeps the first bad step as a tensor (no host sync); `check`, called on log steps
    and before anything is saved, reads it and stops the run with one line naming that step and
    the newest checkpoint, which was saved before it. With fp16 an infinite gradient norm is the
    gradient scaler's business (it skips that step), so only the loss is watched then.
    """

    def __init__(self, device: torch.device, watch_grad_norm: bool):
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.watch_grad_norm = watch_grad_norm

    def observe(self, step: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss_sum.float())
        if self.watch_grad_norm:
            bad = bad | ~torch.isfinite(grad_norm.to(loss_sum.device).float())
        is_first = bad & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(is_first, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def check(self, run: Run, last_checkpoint: Path | None) -> None:
        first_bad = int(distributed.all_reduce_max(self.first_bad_step.clone(), run))
        if first_bad >= 0:
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
            raise TrainingDiverged(
                f"training diverged: the loss or gradient norm is NaN or infinite at step {first_bad}; "
                f"stopped, nothing saved after it; {where} (lower optim.lr or raise optim.warmup_steps and resume)"
            )


def progress_bar(run: Run, config, **kwargs):
    """A tqdm bar on rank 0 when stderr is a terminal; under torchrun or into a log file, none
    (the log lines every `log.every_steps` say the same without escape codes)."""
    enabled = run.is_main and config.log.progress_bar and sys.stderr.isatty()
    return tqdm(disable=not enabled, dynamic_ncols=True, **kwargs)


def log_start(run: Run, config, total_steps: int, start_step: int, steps_per_epoch: int) -> None:
    """Where and how the run trains, in two lines: a 2-rank run says so before its first step."""
    parameter = config.model.dtype
    autocast = config.train.mixed_precision
    fsdp = config.distributed
    sharding = (f"FSDP2 over {run.world_size} ranks (reshard_after_forward={fsdp.reshard_after_forward}, "
                f"mixed_precision={fsdp.mixed_precision and run.device.type == 'cuda'}, cpu_offload={fsdp.cpu_offload})"
                if run.distributed else "one process")
    log.info("world size %d, device %s, parameters %s, autocast %s; %s", run.world_size, run.device, parameter,
             autocast, sharding)
    log.info("training for %d steps from step %d (%d steps per epoch; global batch %d = %d x %d x %d ranks)",
             total_steps, start_step, steps_per_epoch, config.train.batch_size * config.train.grad_accum * run.world_size,
             config.train.batch_size, config.train.grad_accum, run.world_size)


def log_summary(output_dir: Path, config, steps: int, seconds: float, last_record: dict, last_eval: dict,
                evals) -> None:
    """One line at the end: how long, how well, and where the model is."""
    parts = [f"done: {steps} steps in {seconds:.1f} s"]
    if last_eval:
        parts.append(f"final eval_loss {last_eval['eval_loss']:.4f}")
    if evals.best_loss is not None:
        parts.append(f"best {evals.best_loss:.4f} at step {evals.best_step}")
    if last_record.get("tokens_per_s"):
        parts.append(f"{last_record['tokens_per_s']:,.0f} tokens/s")
    saved = [str(output_dir / name) for name in ("final", "best") if (output_dir / name).exists()]
    parts.append("saved " + ", ".join(saved) if saved and config.checkpoint.save_final else "no final model saved")
    log.info("; ".join(parts))
