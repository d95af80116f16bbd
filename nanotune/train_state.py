"""Training checkpoints: everything needed to continue exactly where a run stopped.

    output_dir/checkpoints/step_N/
        state/              model + optimizer shards (torch.distributed.checkpoint: every rank writes its own)
        rng_rank{R}.pt      every random generator of rank R (tensors and plain lists only)
        trainer_state.json  the step, the sampler's position, the world size, the fp16 scaler

A checkpoint is written into `step_N.tmp` and renamed to `step_N` only when every rank has
finished, so a kill at any moment leaves either a complete checkpoint or an ignored `.tmp` folder.
Resuming loads the latest complete one; the data position comes back with the sampler, so the
run goes on with the very next batch and ends bit for bit where an uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed
from .config import ConfigError, RunConfig, save_config
from .distributed import Run
from .files import remove_stale_temporaries, replace_folder, write_text_atomically
from .safe_dcp import CheckpointStateError, check_checkpoint_folder, load_rng_state, load_state_safely

log = logging.getLogger("nanotune")

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"


def begin_run(config: RunConfig, run: Run) -> Path:
    """What every training loop does first: rank 0 writes the run's config beside its checkpoints,
    each rank seeds itself, and deterministic kernels are switched on where the config asks.
    Returns the output folder."""
    output_dir = Path(config.output_dir)
    if run.is_main:
        save_config(config, output_dir)
    seed_everything(config.seed, run.rank)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    return output_dir


def seed_everything(seed: int, rank: int) -> None:
    """Python, NumPy and torch RNGs. Data order does not depend on these (the sampler has its own seed);
    dropout and NEFTune noise do, and differ per rank."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def check_output_dir(output_dir: Path, config: RunConfig) -> None:
    """Refuse to mix two runs in one folder, unless told to resume or to start over.

    An earlier run's checkpoints, or its `final/` model, stay untouched unless
    `checkpoint.resume` (continue that run) or `checkpoint.overwrite` (start over: the old
    checkpoints are removed now, `final/` is replaced when the new run ends) says otherwise.
    What killed runs left half-written (temporary folders) is removed first.
    """
    remove_stale_temporaries(output_dir)
    root = output_dir / CHECKPOINTS
    for stale in root.glob("*.tmp") if root.exists() else []:  # a checkpoint write that never finished
        shutil.rmtree(stale)
    remove_stale_temporaries(root)
    earlier = checkpoint_folders(output_dir)
    if config.checkpoint.overwrite:
        if earlier:
            shutil.rmtree(root)
        return
    if earlier and not config.checkpoint.resume:
        raise ConfigError(
            f"{output_dir}: holds checkpoints of an earlier run ({earlier[-1].name}); pass "
            f"--checkpoint.resume=true to continue it or --checkpoint.overwrite=true to start over"
        )
    if not earlier and (output_dir / "final").exists():
        raise ConfigError(
            f"{output_dir}: holds the final model of an earlier run (final/) and no checkpoint to resume; "
            f"pass --checkpoint.overwrite=true to start over (final/ is replaced when the new run ends) "
            f"or choose another output_dir"
        )


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder still named step_N.tmp was never finished."""
    root = output_dir / CHECKPOINTS
    if not root.exists():
        return []
    complete = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(complete, key=lambda p: int(p.name[5:]))


def run_layout(config: RunConfig, world_size: int) -> dict:
    """What fixes the data position of a step: a checkpoint resumes only into a run of the same layout."""
    data = config.data
    return {"global_batch_size": config.train.batch_size * config.train.grad_accum * world_size,
            "seq_len": getattr(data, "seq_len", None) or getattr(data, "max_length", None),
            "world_size": world_size}


def find_resume_checkpoint(output_dir: Path, layout: dict, quiet: bool = False, named: str | None = None) -> Path | None:
    """The newest intact checkpoint of `output_dir` whose layout fits this run's, or None if there is none.

    A damaged checkpoint (a truncated shard, a missing `.metadata` or `trainer_state.json`, a
    refused file) is passed over for the one before it, saying so; if every one is damaged, or
    the run's global batch or sequence length differ from the checkpoint's (the data position
    could not be kept), one line says what is wrong. A different world size with the same global
    batch is allowed: the sampler gives the same global batches on any number of ranks.
    `named`: resume from that checkpoint folder (`checkpoint.resume = "path/to/step_N"`), which
    must then be intact itself.
    """
    folders = [Path(named)] if named else checkpoint_folders(output_dir)
    newest_problem = None
    for folder in reversed(folders):
        try:
            trainer_state = read_trainer_state(folder)
            check_checkpoint_folder(folder / "state")
            for rng_file in sorted(folder.glob("rng_rank*.pt")):
                load_rng_state(rng_file)
        except CheckpointStateError as error:
            newest_problem = newest_problem or error
            if named:
                raise
            if not quiet:
                log.warning("checkpoint %s is damaged or refused, passed over: %s", folder.name, error)
            continue
        saved = {key: trainer_state[key] for key in ("global_batch_size", "seq_len") if key in trainer_state}
        for key, value in saved.items():
            if value != layout[key]:
                raise ConfigError(
                    f"{folder}: saved with {key} {value}, this run has {layout[key]}: the data position cannot be "
                    f"kept (global batch = train.batch_size x train.grad_accum x ranks); set them as the checkpoint's, "
                    f"or start over with --checkpoint.overwrite=true"
                )
        if not quiet and trainer_state.get("world_size") != layout["world_size"]:
            log.warning("resuming on %d ranks a run saved on %s: the same global batches follow; the random "
                        "streams of dropout and NEFTune start afresh", layout["world_size"], trainer_state.get("world_size"))
        if not quiet and folder != folders[-1] and not named:
            log.warning("resuming from %s, the newest intact checkpoint", folder.name)
        return folder
    if folders:
        raise CheckpointStateError(f"no intact checkpoint to resume from in {output_dir / CHECKPOINTS} "
                                   f"(newest: {newest_problem}); start over with --checkpoint.overwrite=true")
    return None


def read_trainer_state(folder: Path) -> dict:
    """checkpoints/step_N/trainer_state.json, with one line naming the file if it is missing or broken."""
    path = folder / TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        int(state["step"]), dict(state["sampler"])
    except FileNotFoundError:
        raise CheckpointStateError(f"{path}: missing (an incomplete checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointStateError(f"{path}: not a trainer state ({error})") from None
    return state


def last_checkpoint(output_dir: Path) -> Path | None:
    folders = checkpoint_folders(output_dir)
    return folders[-1] if folders else None


class EvalTracker:
    """The best evaluation so far, and whether to stop early: kept in every checkpoint.

    `update` takes each evaluation's loss and says whether it is the best yet (then the loop
    saves `best/` when `checkpoint.save_best` is on); after `patience` evaluations in a row
    without a lower loss, `should_stop` turns true (`eval.early_stopping_patience`; 0 = never).
    """

    def __init__(self, patience: int = 0):
        self.patience = patience
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.evaluations_without_improvement = 0

    def update(self, step: int, eval_loss: float) -> bool:
        if not math.isfinite(eval_loss):
            return False  # a NaN is never the best; the divergence guard stops the run
        improved = self.best_loss is None or eval_loss < self.best_loss
        if improved:
            self.best_loss, self.best_step, self.evaluations_without_improvement = eval_loss, step, 0
        else:
            self.evaluations_without_improvement += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evaluations_without_improvement >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step,
                "evaluations_without_improvement": self.evaluations_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_step = state["best_loss"], state["best_step"]
        self.evaluations_without_improvement = state["evaluations_without_improvement"]


@dataclass
class TrainingState:
    """What a step changes and a checkpoint must keep: the weights, the optimizer, the data position.

    `trainable_only`: frozen parameters (LoRA, embeddings-only training) are left out of the
    checkpoint; on resume they come again from the base model. `layout`: `run_layout`, saved so
    that a resumed run can be checked against it.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: object  # GlobalBatchSampler: state_dict() / load_state_dict()
    scaler: object | None  # the fp16 gradient scaler, or None
    trainable_only: bool
    layout: dict
    evals: EvalTracker = field(default_factory=EvalTracker)

    def save(self, output_dir: Path, step: int, run: Run, keep_last: int) -> None:
        """Write checkpoints/step_N (via step_N.tmp) and keep only the newest `keep_last`."""
        root = output_dir / CHECKPOINTS
        final, temporary = root / f"step_{step}", root / f"step_{step}.tmp"
        try:
            if run.is_main:
                for stale in root.glob("*.tmp") if root.exists() else []:
                    shutil.rmtree(stale)
                temporary.mkdir(parents=True)
            distributed.barrier(run)
            save_training_state(temporary / "state", self.model, self.optimizer, self.trainable_only)
            torch.save(rng_state(), temporary / f"rng_rank{run.rank}.pt")
            if run.is_main:
                trainer_state = {"step": step, "sampler": self.sampler.state_dict(), **self.layout,
                                 "scaler": self.scaler.state_dict() if self.scaler else None,
                                 "evals": self.evals.state_dict()}
                write_text_atomically(temporary / TRAINER_STATE, json.dumps(trainer_state, indent=2))
            distributed.barrier(run)
        except BaseException as error:  # an error or Ctrl-C mid-write: no half-written checkpoint is left
            if run.is_main:
                shutil.rmtree(temporary, ignore_errors=True)
            if _is_interrupt(error):
                raise KeyboardInterrupt from None  # DCP wraps a Ctrl-C in its own CheckpointException
            raise
        if run.is_main:
            replace_folder(temporary, final)
            for old in checkpoint_folders(output_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old)
        distributed.barrier(run)

    def resume(self, output_dir: Path, run: Run, named: str | None = None) -> int:
        """Load the newest intact checkpoint (or the `named` one), if any; return the step to continue from (0 = none)."""
        folder = find_resume_checkpoint(output_dir, self.layout, quiet=True, named=named) if run.is_main else None
        folder = distributed.broadcast_string(str(folder) if folder else None, run)
        if folder is None:
            log.info("checkpoint.resume: no checkpoint in %s, starting from step 0", output_dir / CHECKPOINTS)
            return 0
        folder = Path(folder)
        trainer_state = read_trainer_state(folder)
        load_training_state(folder / "state", self.model, self.optimizer, self.trainable_only)
        self.sampler.load_state_dict(trainer_state["sampler"])
        if self.scaler and trainer_state.get("scaler"):
            self.scaler.load_state_dict(trainer_state["scaler"])
        if trainer_state.get("evals"):
            self.evals.load_state_dict(trainer_state["evals"])
        rng_file = folder / f"rng_rank{run.rank}.pt"
        if rng_file.exists() and trainer_state.get("world_size") == run.world_size:
            set_rng_state(load_rng_state(rng_file))
        log.info("resumed from %s (step %d)", folder, trainer_state["step"])
        return int(trainer_state["step"])


def _is_interrupt(error: BaseException) -> bool:
    """Was this failure a Ctrl-C? DCP wraps each rank's error in a CheckpointException (`failures`:
    rank -> (error, traceback)), and a Ctrl-C inside torch.save's zip writer surfaces as the
    RuntimeError its clean-up then raises, with the KeyboardInterrupt as its context."""
    seen, pending = set(), [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, KeyboardInterrupt):
            return True
        failures = getattr(current, "failures", None) or {}
        pending += [failure[0] for failure in failures.values() if isinstance(failure, tuple) and failure]
        pending += [current.__cause__, current.__context__]
    return False


# ----------------------------------------------------------------------------------------------
# Model + optimizer: Distributed Checkpoint, each rank its own shards
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it runs "in a single process" when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state_dict_options(trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def save_training_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool) -> None:
    """Model and optimizer state with `torch.distributed.checkpoint`: every rank writes its shards.

    Works unchanged for a single process and for FSDP2 (the state dict holds DTensor shards).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_dict_options(trainable_only))
    with _single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_training_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool) -> None:
    """Read a `save_training_state` folder back into `model` and `optimizer`, in place."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = _state_dict_options(trainable_only)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optimizer_state}
    with _single_process_quiet():
        load_state_safely(state, folder)  # DCP's own reader unpickles; this one runs no code from the files
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options)


# ----------------------------------------------------------------------------------------------
# Random generators
# ----------------------------------------------------------------------------------------------


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
