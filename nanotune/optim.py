"""AdamW with the usual parameter groups, and the learning-rate schedule as a plain function.

Weight decay pulls weights towards zero. That is a useful prior for matrices, but applied to a
norm's gain (which should sit near 1) or a bias it only hurts, so those get no decay: the rule is
"decay tensors of 2 or more dimensions", which is what nanoGPT and most LLM recipes do.
Frozen parameters are left out of the optimizer entirely, so they have no state (no memory).

The schedule is a function of the step, not a stateful scheduler object: resuming a run needs
only the step number, and the value at any step can be read (and tested) directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of trainable parameters: matrices (decayed) and vectors (norms, biases: not decayed)."""
    decay, no_decay = [], []
    for param in model.parameters():  # a tied tensor (embed_tokens = lm_head) is yielded once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: OptimConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over the trainable parameters.

    `fused` picks the implementation: "fused" (one kernel for all parameters; CUDA and CPU),
    "foreach" (a few multi-tensor ops), "none" (a Python loop per parameter, the readable
    reference), "auto" (fused where available, else foreach). All give the same update up to
    floating-point rounding.
    """
    groups = parameter_groups(model, config.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: check train.trainable / freeze_bottom_fraction / lora")
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    mode = config.fused
    if mode == "auto":
        mode = "fused" if device_type in ("cuda", "cpu") else "foreach"
    if mode == "fused":
        kwargs["fused"] = True
    elif mode == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    optimizer = torch.optim.AdamW(groups, **kwargs)
    create_adamw_state(optimizer)
    return optimizer


def create_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """Create AdamW's state now, as its first step would (zero moments, step 0), not in that step.

    The result is the same optimizer, bit for bit (tests/test_optim.py). What changes is where the
    memory comes from: the moments are twice the trained parameters, allocated once and kept. Made
    before the first forward, they are allocated before the step's short-lived tensors; made by the
    first `optimizer.step()`, they land among the holes the first backward left in the heap, and
    hold it at its largest: memory the process keeps without using (README: performance).
    """
    for group in optimizer.param_groups:
        # Where AdamW keeps `step`: a tensor on the parameter's device for the fused and capturable
        # kernels, a CPU scalar otherwise (torch/optim/adam.py, `_init_group`).
        on_device = group.get("fused") or group.get("capturable")
        for param in group["params"]:
            state = optimizer.state[param]
            if state:
                continue
            if on_device:
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            else:
                dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                state["step"] = torch.tensor(0.0, dtype=dtype)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def warmup_steps_for(config: OptimConfig, total_steps: int) -> int:
    if config.warmup_steps > 0:
        return config.warmup_steps
    return int(math.ceil(config.warmup_ratio * total_steps))


def lr_at_step(step: int, *, lr: float, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Linear warmup from lr/warmup_steps to lr over `warmup_steps` steps, then `schedule` from lr to
    lr * min_lr_ratio at the last step: "cosine" (half a cosine wave), "linear", or "constant"
    (stays at lr).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    min_lr = lr * min_lr_ratio
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}: expected cosine, linear or constant")


def schedule_from_config(config: OptimConfig, total_steps: int):
    """lr_at_step with the config's values filled in: step -> learning rate."""
    warmup = warmup_steps_for(config, total_steps)

    def lr_for(step: int) -> float:
        return lr_at_step(step, lr=config.lr, total_steps=total_steps, warmup_steps=warmup,
                          schedule=config.schedule, min_lr_ratio=config.min_lr_ratio)

    return lr_for
