"""Pretraining data: read text, tokenise it once into a cache, pack documents into full blocks.

Padding every document to a fixed length wastes most of the compute on a corpus of mixed lengths
(see `benchmarks/data_pipeline.py`). Packing instead lays the documents end to end, each as
`[bos] + tokens + [eos]`, and cuts the stream into blocks of `seq_len` tokens:

    stream     [bos a a a a eos][bos b b eos][bos c c c c c c eos] ...
    block 0    bos a a a a eos bos b          document_ids 0 0 0 0 0 0 1 1
    block 1    b eos bos c c c c c            document_ids 1 1 2 2 2 2 2 2   (b continues here)

Every token is used exactly once (nothing is cut off). Each block carries `document_ids`, and
`Llama.forward(..., document_ids=...)` attends block-diagonally, so no document sees another,
and positions restart at 0 at every document start, also where a document continues from the
previous block. `labels[t]` is the next token of the same document in the same block, or -100 at
a document's last token in the block: no token learns to predict a neighbour's first token.

Three pieces, in the order the data flows:

* `read_documents` and `build_token_cache` (in `token_cache.py`): files -> a flat token array on disk.
* `pack_documents`: the readable reference for packing, a generator over token lists.
* `PackedDataset`: the same blocks by index straight from the cache, for a shuffling sampler;
  tested block for block against `pack_documents`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..config import weighted_sources
from .records import DataError
from .sampler import MixedDataset
from .token_cache import TokenCache, build_token_cache, read_documents  # noqa: F401 (re-exported)
from ..loss import IGNORE_INDEX  # -100: a label that carries no loss

PADDING_DOCUMENT_ID = -1  # padding in the final block: a "document" no real token attends to
PADDING_TOKEN_ID = 0  # any id would do: padding is never attended to by real tokens nor predicted


# ----------------------------------------------------------------------------------------------
# Packing, the reference
# ----------------------------------------------------------------------------------------------


def pack_documents(
    docs: Iterable[Sequence[int]], seq_len: int, bos_id: int | None = None, eos_id: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Blocks of `seq_len` tokens from the documents `[bos] + doc + [eos]`, laid end to end.

    Yields dicts of 1-D LongTensors `input_ids`, `labels`, `position_ids`, `document_ids`. A
    document's id is its index in `docs`. Only the last block can hold padding (document id -1,
    label -100). Written for reading, token by token; `PackedDataset` is the fast version.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, not {seq_len}")
    input_ids: list[int] = []
    document_ids: list[int] = []
    for document_id, tokens in enumerate(docs):
        stream = [bos_id] * (bos_id is not None) + [int(t) for t in tokens] + [eos_id] * (eos_id is not None)
        for token in stream:
            input_ids.append(token)
            document_ids.append(document_id)
            if len(input_ids) == seq_len:
                yield _block_from_stream(input_ids, document_ids, seq_len)
                input_ids, document_ids = [], []
    if input_ids:
        yield _block_from_stream(input_ids, document_ids, seq_len)


def _block_from_stream(input_ids: list[int], document_ids: list[int], seq_len: int) -> dict[str, torch.Tensor]:
    """Pad to seq_len, then derive labels and positions from the document ids alone."""
    n_real = len(input_ids)
    input_ids = input_ids + [PADDING_TOKEN_ID] * (seq_len - n_real)
    document_ids = document_ids + [PADDING_DOCUMENT_ID] * (seq_len - n_real)
    labels, position_ids = [], []
    for t in range(seq_len):
        next_is_same_document = t + 1 < n_real and document_ids[t + 1] == document_ids[t]
        labels.append(input_ids[t + 1] if next_is_same_document else IGNORE_INDEX)
        starts_a_run = t == 0 or document_ids[t] != document_ids[t - 1]
        # Padding positions count up like any run, as `positions_from_document_ids` would give.
        position_ids.append(0 if starts_a_run else position_ids[-1] + 1)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
        "document_ids": torch.tensor(document_ids, dtype=torch.long),
    }


# ----------------------------------------------------------------------------------------------
# Packing from the cache, by index
# ----------------------------------------------------------------------------------------------


class PackedDataset:
    """Map-style dataset: `dataset[i]` is the i-th block `pack_documents` would yield.

    The stream is the cache's documents `documents` (all, in order, by default; a train or
    validation split otherwise), each with BOS/EOS. Only the cumulative lengths are kept in memory
    (8 bytes per document); a block is found by binary search and sliced from the memmap, so any
    block costs the same to get, whatever the order the sampler asks for them in.
    """

    def __init__(
        self,
        cache: TokenCache,
        seq_len: int,
        bos_id: int | None = None,
        eos_id: int | None = None,
        documents: Sequence[int] | np.ndarray | None = None,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, not {seq_len}")
        self.cache, self.seq_len, self.bos_id, self.eos_id = cache, seq_len, bos_id, eos_id
        if documents is None:
            documents = np.arange(len(cache))
        self.documents = np.asarray(documents, dtype=np.int64)  # (N,) cache index of stream document j
        if len(self.documents) and (self.documents.min() < 0 or self.documents.max() >= len(cache)):
            raise IndexError(f"documents must be indices into the cache's {len(cache)} documents")
        self.n_bos = int(bos_id is not None)
        n_special = self.n_bos + int(eos_id is not None)
        lengths = cache.document_lengths()[self.documents] + n_special  # (N,) stream tokens per document
        self.document_ends = np.cumsum(lengths)  # (N,) stream position just past document j
        self.n_tokens = int(self.document_ends[-1]) if len(lengths) else 0

    def __len__(self) -> int:
        return math.ceil(self.n_tokens / self.seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        T = self.seq_len
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        block_start = index * T
        block_end = min(block_start + T, self.n_tokens)
        input_ids = np.full(T, PADDING_TOKEN_ID, dtype=np.int64)  # (T,)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)  # (T,)
        position_ids = np.zeros(T, dtype=np.int64)  # (T,)
        document_ids = np.full(T, PADDING_DOCUMENT_ID, dtype=np.int64)  # (T,)

        j = int(np.searchsorted(self.document_ends, block_start, side="right"))  # first document in the block
        cursor = block_start
        while cursor < block_end:
            document_start = int(self.document_ends[j - 1]) if j else 0
            piece_end = min(int(self.document_ends[j]), block_end)
            piece = self._stream_tokens(j, cursor - document_start, piece_end - document_start)
            a, b = cursor - block_start, piece_end - block_start  # the piece's place in the block
            input_ids[a:b] = piece
            labels[a : b - 1] = piece[1:]  # the last token of the piece has no next token here
            position_ids[a:b] = np.arange(b - a)  # restart at 0, also for a continued document
            document_ids[a:b] = j
            cursor, j = piece_end, j + 1
        n_real = block_end - block_start
        position_ids[n_real:] = np.arange(T - n_real)  # padding counts up as one run
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
            "document_ids": torch.from_numpy(document_ids),
        }

    def _stream_tokens(self, j: int, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of stream document j = [bos] + tokens + [eos], without building it whole."""
        body = self.cache.document(int(self.documents[j]))
        parts = []
        if self.bos_id is not None and start == 0:
            parts.append(np.array([self.bos_id], dtype=np.int64))
        body_start, body_end = max(start - self.n_bos, 0), min(end - self.n_bos, len(body))
        if body_end > body_start:
            parts.append(body[body_start:body_end].astype(np.int64))
        if self.eos_id is not None and end == self.n_bos + len(body) + 1:
            parts.append(np.array([self.eos_id], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def real_token_fraction(self) -> float:
        """Tokens that are not padding, over all block positions (1.0 but for the last block)."""
        return self.n_tokens / (len(self) * self.seq_len) if len(self) else 0.0


# ----------------------------------------------------------------------------------------------
# Train and validation
# ----------------------------------------------------------------------------------------------


def split_documents(n_documents: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) document indices: a seeded random `valid_fraction` of documents held out.

    Documents, not blocks, are held out, so no validation text ever shares a block with (or was
    seen in) training. Each half is sorted, to read the memmap front to back.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), not {valid_fraction}")
    n_valid = round(n_documents * valid_fraction)
    if valid_fraction > 0:
        n_valid = max(n_valid, 1)
    if n_valid >= n_documents and n_documents:
        raise ValueError(
            f"valid_fraction {valid_fraction} of {n_documents} documents leaves no document for training"
        )
    order = np.random.default_rng(seed).permutation(n_documents)
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


def build_pretrain_datasets(
    tokenizer,
    *,
    train_files,
    valid_files=(),
    valid_fraction: float = 0.0,
    seq_len: int,
    cache_dir,
    text_fields: tuple[str, ...] | str = ("text",),
    field_separator: str = "\n",
    txt_mode: str = "line",
    skip_invalid: bool = False,
    seed: int = 0,
    num_workers: int | None = None,
) -> tuple[PackedDataset, PackedDataset | None]:
    """(train, valid or None): validation from separate files, or a held-out fraction of documents.

    Weighted `train_files` (`config.DataFile` entries: mixing) give one token cache and one block
    stream per source, so a block holds one source's documents and a source's weight counts
    whole blocks; train is then a `MixedDataset` of the sources' blocks for the sampler to mix,
    and a held-out fraction is taken from each source.
    """
    if valid_files and valid_fraction:
        raise ValueError("give valid_files or valid_fraction, not both")
    reader = dict(text_fields=text_fields, field_separator=field_separator, txt_mode=txt_mode, skip_invalid=skip_invalid)
    sources = None if isinstance(train_files, (str, os.PathLike)) else weighted_sources(list(train_files))
    if sources is not None:
        options = dict(reader, valid_fraction=valid_fraction, seq_len=seq_len, cache_dir=cache_dir, seed=seed,
                       num_workers=num_workers)
        parts = [build_pretrain_datasets(tokenizer, train_files=[source.path], **options) for source in sources]
        weights, names = [source.weight for source in sources], [source.path for source in sources]
        train = MixedDataset([train for train, _ in parts], weights, names)
        if valid_files:
            valid_options = {**options, "valid_fraction": 0.0}
            return train, build_pretrain_datasets(tokenizer, train_files=valid_files, **valid_options)[0]
        return train, (MixedDataset([valid for _, valid in parts], weights, names) if valid_fraction > 0 else None)

    def blocks(cache, documents=None):
        return PackedDataset(cache, seq_len, tokenizer.bos_id, tokenizer.eos_id, documents)

    train_cache = build_token_cache(train_files, tokenizer, cache_dir, **reader, num_workers=num_workers)
    if len(train_cache) == 0:
        raise DataError(f"{train_files}: no documents in the training files")
    if valid_files:
        valid_cache = build_token_cache(valid_files, tokenizer, cache_dir, **reader, num_workers=num_workers)
        if len(valid_cache) == 0:
            raise DataError(f"{valid_files}: no documents in the validation files")
        return blocks(train_cache), blocks(valid_cache)
    if valid_fraction > 0:
        train_documents, valid_documents = split_documents(len(train_cache), valid_fraction, seed)
        return blocks(train_cache, train_documents), blocks(train_cache, valid_documents)
    return blocks(train_cache), None
