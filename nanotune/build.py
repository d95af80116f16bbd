"""Turning the [model], [tokenizer], [train] and [lora] sections into a ready-to-train model.

Both entry points (`train_pt.py`, `train_sft.py`) start with `start_run`, which calls these in
order: `load_tokenizer` -> `build_model` (load or create, grow the vocabulary) ->
`configure_trainable` (what trains, or LoRA). The loop then applies activation checkpointing,
compilation and FSDP (`distributed.parallelize`).
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_pretrained, parse_dtype, read_config
from . import distributed
from .config import ConfigError, PretrainDataConfig, RunConfig, load_config
from .distributed import Run
from .model import Llama, LlamaConfig, resolve_packed_attention
from .tokenizer import Tokenizer, TokenizerError
from .preflight import check_data_files, check_seq_len_fits_model, check_tokenizer_fits_model
from .run_lock import lock_output_dir
from .train_state import check_output_dir, find_resume_checkpoint, run_layout, seed_everything
from .vocab import resize_token_embeddings

log = logging.getLogger("nanotune")


def start_run(argv: list[str] | None, data_class: type) -> tuple[RunConfig, Run, Tokenizer, Llama]:
    """What both entry points do first: config, process group, a check of the output folder, seeds,
    tokenizer, model and what trains. Cheap checks come first, so a mistake costs no waiting."""
    config = load_config(argv, data_class=data_class)
    check_data_files(config)  # every path names a readable file of a kind its reader knows
    run = distributed.init_distributed(config.distributed, config.train.device)
    if config.distributed.cpu_offload and run.distributed and run.device.type != "cuda":
        raise ConfigError(
            f"distributed.cpu_offload = true needs GPUs (this run's device is {run.device.type}): offloading "
            "moves sharded state from GPU memory to CPU memory, and on the CPU it is there already; "
            "set distributed.cpu_offload = false"
        )
    output_dir = Path(config.output_dir)
    if run.is_main:
        lock_output_dir(output_dir)  # one run at a time in one folder
        check_output_dir(output_dir, config)  # never mix two runs' checkpoints or final models
        if config.checkpoint.resume:  # a damaged or mismatched checkpoint is one line now, not after the load
            named = config.checkpoint.resume if isinstance(config.checkpoint.resume, str) else None
            find_resume_checkpoint(output_dir, run_layout(config, run.world_size), named=named)
    seed_everything(config.seed, rank=0)  # the same initial weights (and LoRA init) on every run
    if isinstance(config.data, PretrainDataConfig):  # blocks must fit the positions the model learnt
        check_seq_len_fits_model(config.data.seq_len, read_config(config.model.path) if config.model.path
                                 else LlamaConfig(max_position_embeddings=config.model.max_position_embeddings))
    tokenizer = load_tokenizer(config)
    if config.model.path and config.tokenizer.path:
        check_tokenizer_fits_model(tokenizer, config.model.path)  # ids must mean what the embeddings learnt
    model = build_model(config, tokenizer, on_meta=run.distributed and not run.is_main, device=run.device)
    configure_trainable(model, config)
    return config, run, tokenizer, model


def load_tokenizer(config: RunConfig) -> Tokenizer:
    path = config.tokenizer.path or config.model.path
    if not path:
        raise ValueError("set tokenizer.path (a tokenizer.model, tokenizer.json or folder), or model.path")
    return Tokenizer.from_file(path)


def build_model(config: RunConfig, tokenizer: Tokenizer, on_meta: bool = False, device: torch.device | str = "cpu") -> Llama:
    """Load `model.path`, or create a model of the configured shape; then fit the vocabulary.

    A tokenizer with more pieces than the model's embedding (a merged Chinese vocabulary) grows
    `embed_tokens` and `lm_head`; the model folder's own tokenizer, if it has one, spells the new
    pieces so their rows start from the mean of their old sub-tokens.

    `on_meta`: build only the shapes, no weights. Ranks other than 0 of a distributed run do this;
    after sharding, rank 0's weights are broadcast into their shards, so no rank but one ever
    holds a full copy of the model in memory (`distributed.broadcast_weights_from_rank0`).

    QLoRA (`lora.quantize_base = "nf4"`): the chosen linear layers are quantised to NF4 as the
    checkpoint is read (quant.py), or right after a model built from scratch is initialised.
    """
    dtype = parse_dtype(config.model.dtype)
    quantizer = None
    if config.lora.quantize_base:
        from .quant import QuantizeOnLoad

        quantizer = QuantizeOnLoad(config.lora.quantize_targets, dtype)
    packed_attention = resolve_packed_attention(config.model.packed_attention, config.train.compile, device)
    options = dict(packed_attention=packed_attention, loss_chunk_tokens=config.model.loss_chunk_tokens)
    if config.model.path and on_meta:
        with torch.device("meta"):
            model = Llama(read_config(config.model.path), **options).to(dtype)
        old_tokenizer = _tokenizer_beside(config.model.path)
    elif config.model.path:
        model = load_pretrained(config.model.path, dtype=dtype, quantizer=quantizer, **options)
        old_tokenizer = _tokenizer_beside(config.model.path)
    else:
        shape = config.model
        llama_config = LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_hidden_layers,
            num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_key_value_heads or shape.num_attention_heads,
            max_position_embeddings=shape.max_position_embeddings,
            rope_theta=shape.rope_theta,
            tie_word_embeddings=shape.tie_word_embeddings,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=None,
        )
        if on_meta:
            with torch.device("meta"):
                model = Llama(llama_config, **options)
        else:
            model = Llama(llama_config, **options)
            model.init_weights(seed=config.seed)
        model.to(dtype)
        old_tokenizer = None
    if quantizer is not None:
        from .quant import unmatched_targets

        quantizer.prepare(model)  # quantises a model built here (on meta: empty NF4 shells); a loaded one already is
        unmatched = unmatched_targets(model, config.lora.quantize_targets)
        if unmatched:
            raise ConfigError(f"lora.quantize_targets: {unmatched} match no linear layer of the blocks "
                              f"(names as in lora.targets, e.g. q_proj, or all-linear)")
    added = resize_token_embeddings(model, tokenizer, old_tokenizer)
    if added:
        log.info("vocabulary grown by %d rows to %d (tokenizer %s)", added, tokenizer.vocab_size, tokenizer.path)
    return model.train()


def _tokenizer_beside(model_path: str) -> Tokenizer | None:
    try:
        return Tokenizer.from_file(Path(model_path))
    except TokenizerError:
        return None


def select_trainable(model: nn.Module, trainable: list[str], freeze_bottom_fraction: float = 0.0) -> tuple[int, int]:
    """Set `requires_grad` by the `train.trainable` option; return (trainable, total) parameter counts.

    "all": everything. "embeddings": only `embed_tokens` and `lm_head`, the stage after vocabulary
    extension in which the new rows learn while the rest of the model is held still. Otherwise
    fnmatch patterns over parameter names ("model.layers.*.mlp.*"). `freeze_bottom_fraction`
    then freezes that fraction of the layers counted from the input side.
    """
    names = [name for name, _ in model.named_parameters()]
    if trainable == ["all"]:
        patterns = ["*"]
    elif trainable == ["embeddings"]:
        patterns = ["model.embed_tokens.weight", "lm_head.weight"]
    else:
        patterns = trainable
        for pattern in patterns:
            if not fnmatch.filter(names, pattern):
                raise ConfigError(f"train.trainable: pattern {pattern!r} matches no parameter (e.g. {names[0]!r})")
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))
    n_frozen_layers = int(freeze_bottom_fraction * len(model.model.layers))
    for block in model.model.layers[:n_frozen_layers]:
        block.requires_grad_(False)
    return count_parameters(model)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each tensor counted once even when tied."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def configure_trainable(model: Llama, config: RunConfig) -> tuple[int, int]:
    """LoRA adapters when [lora] is enabled, else `train.trainable`; logs and returns the counts."""
    if config.lora.enabled:
        from .lora import apply_lora

        targets = config.lora.targets
        try:
            apply_lora(
                model, r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
                targets="all-linear" if targets == ["all-linear"] else targets,
                modules_to_save=config.lora.modules_to_save,
                # Written into adapter_config.json, so PEFT finds the base offline; none from scratch.
                base_model_name_or_path=str(Path(config.model.path).resolve()) if config.model.path else None,
            )
        except ValueError as error:  # an unknown target or module name: a config mistake
            raise ConfigError(f"[lora]: {error}") from None
        trainable, total = count_parameters(model)
    else:
        trainable, total = select_trainable(model, config.train.trainable, config.train.freeze_bottom_fraction)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100.0 * trainable / total)
    return trainable, total
