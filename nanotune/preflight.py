"""Checks that need the config and the input files but not the model, run before the model loads.

Loading a 7B model takes minutes; a data path with a typo, a corpus smaller than one batch or a
tokenizer that does not belong to the model should cost seconds instead. Each check raises one
line naming the file or key and what to change:

* `check_data_files(config)`: every `data.train_files` / `data.valid_files` path or glob names
  readable files of a type the reader knows (a folder is "is a directory", not "not found");
* `check_tokenizer_fits_model(tokenizer, model_path)`: a `tokenizer.path` other than the model's
  own must be the model's vocabulary, or an extension of it with new pieces appended after the
  model's ids (the vocabulary-growth case); any other tokenizer would train every id on the
  wrong embedding row;
* `check_enough_samples(n_samples, config, world_size, files)`: the data set fills at least
  one global batch (called once the data is tokenised and its size known);
* `check_seq_len_fits_model(seq_len, model_config)` (pretraining) and `sft_max_length(...)`: no
  sequence longer than the positions the model has learnt (`longest_sequence`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import ConfigError, PromptDataConfig, RunConfig, SFTDataConfig
from .data.records import DataError, expand_files

log = logging.getLogger("nanotune")

PRETRAIN_SUFFIXES = (".txt", ".jsonl", ".json")
SFT_SUFFIXES = (".jsonl", ".json")


def check_data_files(config: RunConfig) -> None:
    """Every configured data file exists, is a readable file, and has a suffix its reader reads."""
    if not config.data.train_files:
        raise ConfigError("data.train_files is empty: give the training files (paths or globs)")
    suffixes = SFT_SUFFIXES if isinstance(config.data, (SFTDataConfig, PromptDataConfig)) else PRETRAIN_SUFFIXES
    for key in ("train_files", "valid_files"):
        patterns = getattr(config.data, key)
        if not patterns:
            continue
        try:
            files = expand_files(patterns)
        except DataError as error:
            raise DataError(f"data.{key}: {error}") from None
        for path in files:
            if path.suffix not in suffixes:
                expected = ", ".join(suffixes)
                raise DataError(f"data.{key}: {path}: unsupported file type {path.suffix!r}; expected {expected}")
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError as error:
                raise DataError(f"data.{key}: {path}: cannot be read ({error.strerror})") from None


def check_enough_samples(n_samples: int, config: RunConfig, world_size: int, files) -> None:
    """At least one global batch (batch_size x grad_accum x world_size samples) in the data set.

    Fewer would leave an epoch with no step; the sampler refuses it too, but naming its own
    arguments, not the keys a user can change.
    """
    batch_size, grad_accum = config.train.batch_size, config.train.grad_accum
    global_batch = batch_size * grad_accum * world_size
    if n_samples >= global_batch:
        return
    if isinstance(config.data, PromptDataConfig):
        what = "prompts"
    elif isinstance(config.data, SFTDataConfig):
        what = "samples" if not config.data.packing else f"packed rows of data.max_length {config.data.max_length}"
    else:
        what = f"blocks of data.seq_len {config.data.seq_len} tokens"
    names = ", ".join(str(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files))
    raise ConfigError(
        f"{names}: {n_samples} {what}, fewer than one global batch of {global_batch} "
        f"(train.batch_size {batch_size} x train.grad_accum {grad_accum} x {world_size} rank(s)); "
        "lower train.batch_size or train.grad_accum, or add data"
    )


def check_tokenizer_fits_model(tokenizer, model_path: str | os.PathLike) -> None:
    """Refuse a tokenizer whose ids mean other pieces than the model's own tokenizer's.

    The model learned one embedding row per id of its own tokenizer. Another tokenizer is fine
    only if it spells every one of those ids with the same piece and adds its new pieces after
    them (a merged Chinese vocabulary: `build_model` then grows the embeddings). A model folder
    without a tokenizer cannot be checked and passes. Reads only the two tokenizer files.
    """
    from .tokenizer import Tokenizer, TokenizerError

    try:
        own = Tokenizer.from_file(model_path)
    except TokenizerError:
        return
    if Path(own.path).resolve() == Path(tokenizer.path).resolve():
        return
    n_model, n_configured = own.vocab_size, tokenizer.vocab_size
    differing = [i for i in range(min(n_model, n_configured)) if own.id_to_piece(i) != tokenizer.id_to_piece(i)]
    n_missing = max(0, n_model - n_configured)
    if not differing and not n_missing:
        return
    if differing:
        first = differing[0]
        example = (f"; e.g. id {first} is {own.id_to_piece(first)!r} in the model's and "
                   f"{tokenizer.id_to_piece(first)!r} in tokenizer.path")
    else:
        example = ""
    missing = f" and {n_missing} of the model's ids are missing from it" if n_missing else ""
    raise ConfigError(
        f"tokenizer.path {tokenizer.path} does not fit model.path {model_path} (whose tokenizer is {own.path}): "
        f"{len(differing)} of the model's {n_model} ids map to other pieces{missing}{example}; "
        "a tokenizer may only extend the model's (the same pieces, new ones appended): "
        "leave tokenizer.path empty to use the model's own"
    )


def longest_sequence(model_config) -> int:
    """The most positions the model can take: `max_position_embeddings`, times the `factor` of a
    linear or dynamic `rope_scaling` (for llama3-type scaling, `max_position_embeddings` is already
    the extended length, as Llama 3.1's config.json states it)."""
    scaling = model_config.rope_scaling or {}
    factor = scaling.get("factor", 1.0) if scaling.get("rope_type") in ("linear", "dynamic") else 1.0
    return int(model_config.max_position_embeddings * factor)


def _position_limit_text(model_config) -> str:
    limit, n_positions = longest_sequence(model_config), model_config.max_position_embeddings
    if limit == n_positions:
        return f"the model's max_position_embeddings {n_positions}"
    return f"the model's {limit} positions (max_position_embeddings {n_positions} x its rope_scaling factor)"


ROPE_SCALING_HINT = ("rope scaling is the way to go longer (rope_scaling in the model's config.json, "
                     "e.g. {\"rope_type\": \"linear\", \"factor\": 2.0}, then train on the longer sequences)")


def check_seq_len_fits_model(seq_len: int, model_config) -> None:
    """Pretraining blocks of `data.seq_len` tokens must fit the positions the model has learnt:
    a position past them gets rotary angles the model never saw, and the loss there is noise."""
    if seq_len > longest_sequence(model_config):
        raise ConfigError(f"data.seq_len {seq_len} is more than {_position_limit_text(model_config)}: lower "
                          f"data.seq_len, or extend the context: {ROPE_SCALING_HINT}")


def sft_max_length(max_length: int, model_config, truncation: str) -> int:
    """min(data.max_length, the model's positions), saying so in one line when that limits it.

    Conversations longer than the result are then handled by `data.truncation` (dropped or cut)
    and counted in the data set's log line, as any conversation over `data.max_length` is.
    """
    limit = longest_sequence(model_config)
    if max_length <= limit:
        return max_length
    handled = "dropped" if truncation == "drop" else f"cut ({truncation})"
    log.warning("data.max_length %d is more than %s: conversations are limited to %d tokens, longer ones %s "
                "by data.truncation; %s", max_length, _position_limit_text(model_config), limit, handled,
                ROPE_SCALING_HINT)
    return limit
