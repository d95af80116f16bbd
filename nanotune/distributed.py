"""Process group and FSDP2 sharding, applied *to* an unmodified model by one ordered recipe (`parallelize`).

    torchrun --nproc_per_node 8 train_sft.py --config sft.toml          # one node, 8 GPUs
    python train_sft.py --config sft.toml                                # the same code, world size 1

Everything here is a no-op (or the plain single-process equivalent) when the world size is 1, so
the training loop has one code path.

FSDP2 (`fully_shard`) splits every parameter into `world_size` shards. Before a block runs, its
parameters are all-gathered; after the backward, gradients are reduce-scattered so each rank holds
the gradient of its own shard, and the optimizer only ever sees (and keeps state for) that shard.
Sharding each transformer block separately means only one block's full parameters exist at a time.
`reshard_after_forward=True` (ZeRO-3-like) frees the gathered parameters after each block's
forward and gathers them again in the backward; False (ZeRO-2-like) keeps them until the
backward: less communication, more memory.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import DistributedConfig


@dataclass
class Run:
    """Where this process stands: its rank among `world_size` processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, shows progress bars and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(config: DistributedConfig, device: str = "auto") -> Run:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) and join the group.

    Without torchrun (no WORLD_SIZE, or 1) nothing is initialised and the run is a single process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is available")
    torch_device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        backend = config.backend if config.backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=config.timeout_minutes),
            device_id=torch_device if use_cuda else None,
        )
    return Run(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def shutdown(run: Run) -> None:
    if run.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, run: Run) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place (asynchronous on GPU: no host sync)."""
    if run.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, run: Run) -> torch.Tensor:
    """The largest value of `tensor` over all ranks, in place."""
    if run.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier(run: Run) -> None:
    if run.distributed:
        dist.barrier()


def broadcast_string(text: str | None, run: Run) -> str | None:
    """Rank 0's `text` on every rank (e.g. the checkpoint folder to resume from)."""
    if not run.distributed:
        return text
    holder = [text]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ----------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------


def parallelize(
    model: nn.Module,
    run: Run,
    *,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    fsdp: DistributedConfig | None = None,
) -> nn.Module:
    """Turn the built model into the one that trains, in this order (torchtitan's recipe):

    1. activation checkpointing per block (forward hooks, nothing wrapped: parameter names stay
       the same, so HF names, checkpoints, LoRA and FSDP see no difference);
    2. `torch.compile` per block ("regional compilation"): one block's graph is compiled and
       reused for every layer, so compile time does not grow with depth; compiled after
       checkpointing so the recomputed region is the compiled one;
    3. FSDP2 sharding, last: it wraps the final blocks, and its hooks see the modules that run;
    4. rank 0's weights broadcast into every rank's shards (the others built on the meta device);
    5. the model moved to the run's device.

    With one process (`run.distributed` False) steps 3 and 4 are skipped.
    """
    from .activation_checkpointing import apply_activation_checkpointing

    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile_blocks:
        for block in model.model.layers:
            block.compile()
    if run.distributed:
        full_state = model.state_dict() if run.is_main else None  # the other ranks hold only shapes
        shard_model(model, run, fsdp or DistributedConfig())
        broadcast_weights_from_rank0(model, full_state, run)
        del full_state
    return model.to(run.device)


def shard_model(model: nn.Module, run: Run, config: DistributedConfig) -> nn.Module:
    """`fully_shard` each transformer block, then the root (embeddings, final norm, lm_head).

    Mixed precision (CUDA only): parameters are gathered in bf16 for compute, gradients are
    reduced in fp32, and the sharded master weights and optimizer state stay fp32.
    CPU offload: sharded parameters, gradients and optimizer state live in CPU memory and move to
    the GPU only for compute; slow, but fits models several times the GPU's memory.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(run.device.type, (run.world_size,))
    kwargs = {"mesh": mesh}
    if config.mixed_precision and run.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if config.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in model.model.layers:
        fully_shard(block, reshard_after_forward=config.reshard_after_forward, **kwargs)
    # The root's parameters are used last in the forward and first in the backward: keeping them
    # gathered between the two costs little memory and saves an all-gather.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    # Objectives that need per-sequence log-probs call `hidden_states` instead of `forward`: FSDP
    # must gather the root's parameters (embeddings, final norm) around that method too.
    register_fsdp_forward_method(model, "hidden_states")
    return model


def broadcast_weights_from_rank0(model: nn.Module, full_state: dict | None, run: Run) -> None:
    """Fill every rank's shards from rank 0's full state dict (the other ranks built on meta).

    Parameters are first given (uninitialised) storage for their local shard only; then rank 0
    sends each tensor and every rank keeps its slice.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=run.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state if run.is_main else {}, options=options)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """During gradient accumulation only the last micro-step needs to reduce-scatter gradients."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered whole (a collective every rank must join); plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
