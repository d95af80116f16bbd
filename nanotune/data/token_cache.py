"""Text files -> documents -> one flat array of token ids on disk, tokenised once.

Continued pretraining reads the same corpus for many epochs and many runs; tokenising it every
time costs minutes to hours. So the corpus is tokenised once into a cache folder:

    <cache_dir>/<key>/tokens.bin    every document's tokens end to end (uint16, or uint32 when the
                                    vocabulary has more than 65535 pieces), read as a numpy memmap
    <cache_dir>/<key>/offsets.npy   int64, n_documents + 1: document i is tokens[offsets[i]:offsets[i+1]]
    <cache_dir>/<key>/meta.json     what was read, how, and the counts

The key is a hash of everything the tokens depend on: the tokenizer file's bytes, each data file's
content, size and type, and the reader options. A second run with the same inputs finds the folder
and starts at once; a changed file gives a new key and is read again. The folder is written under a
temporary name and renamed into place, so a run killed half-way never leaves a cache that looks
complete. Hashing reads the files (about 1 GB/s); tokenising is a thousand times slower than that.

Documents are stored WITHOUT BOS/EOS: where those go is the business of packing.

This module does not import torch, so tokenising worker processes start quickly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..files import remove_stale_temporaries
from .records import DataError, expand_files, iter_json_records, iter_jsonl_values, iter_text_lines

log = logging.getLogger("nanotune")

CACHE_FORMAT_VERSION = 2  # 2: a BOM is stripped, lone surrogates refused
TXT_MODES = ("line", "paragraph")
CHUNK_CHARACTERS = 1 << 20  # texts are tokenised in chunks of about this many characters


# ----------------------------------------------------------------------------------------------
# Reading documents
# ----------------------------------------------------------------------------------------------


def read_documents(
    files,
    *,
    text_fields: tuple[str, ...] | str = ("text",),
    field_separator: str = "\n",
    txt_mode: str = "line",
    skip_invalid: bool = False,
) -> Iterator[str]:
    """Every document of `files` (paths or globs), in order, as a string.

    * `.txt`: `txt_mode="line"` makes each non-blank line a document; `"paragraph"` makes each run
      of lines between blank lines one document (its lines joined with "\\n").
    * `.jsonl` (one object per line) and `.json` (an array of objects): the `text_fields` of each
      record, joined with `field_separator`; e.g. `("title", "content")` for PandaLLM-style data.
      Empty fields are left out of the join.
    Documents with no visible characters are skipped: they would only teach BOS -> EOS.

    A bad record raises `DataError("file:line: field 'text': ...")`. With `skip_invalid=True` it is
    skipped instead, and the number of skipped records per file is logged (logger "nanotune").
    A `.json` array that is not valid JSON is an error even then: nothing after the break can be
    trusted. (A `.jsonl` line is independent of the others, so a broken one is simply skipped.)
    """
    options = _reader_options(text_fields, field_separator, txt_mode, skip_invalid)
    for path in expand_files(files):
        yield from _documents_of_file(path, options)


def _reader_options(text_fields, field_separator, txt_mode, skip_invalid) -> dict:
    """The reader options as one plain dict (also part of the cache key)."""
    if isinstance(text_fields, str):
        text_fields = (text_fields,)
    if not text_fields:
        raise ValueError("text_fields must name at least one field")
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode must be one of {TXT_MODES}, not {txt_mode!r}")
    return {
        "text_fields": list(text_fields),
        "field_separator": field_separator,
        "txt_mode": txt_mode,
        "skip_invalid": bool(skip_invalid),
    }


def _documents_of_file(path: Path, options: dict, skipped: list | None = None) -> Iterator[str]:
    """Documents of one file; bad records raise, or are skipped, counted and logged."""
    if path.suffix == ".txt":
        records = _txt_documents(path, options["txt_mode"])
    elif path.suffix in (".jsonl", ".json"):
        records = _json_documents(path, options["text_fields"], options["field_separator"])
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected .txt, .jsonl or .json")
    n_skipped, first_problem = 0, None
    for text, problem in records:
        if problem is not None:
            if not options["skip_invalid"]:
                raise DataError(problem)
            n_skipped += 1
            first_problem = first_problem or problem
        elif text.strip():
            yield text
    if n_skipped:
        log.warning("%s: skipped %d invalid records (the first: %s)", path, n_skipped, first_problem)
        if skipped is not None:
            skipped.append(n_skipped)


def _txt_documents(path: Path, txt_mode: str) -> Iterator[tuple[str | None, str | None]]:
    """(text, None) per document, or (None, "file:line: problem") for a line that is not UTF-8."""
    paragraph: list[str] = []
    for line_number, line, problem in iter_text_lines(path):
        if problem is not None:
            yield None, f"{path}:{line_number}: {problem}"
        elif txt_mode == "line":
            yield line, None
        elif line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph), None
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph), None


def _json_documents(path, text_fields, field_separator) -> Iterator[tuple[str | None, str | None]]:
    """(joined text, None) per record, or (None, "file:line: field 'x': problem")."""
    if path.suffix == ".jsonl":
        records = _jsonl_records(path)
    else:  # a .json array: a syntax error ends the file, so iter_json_records raises it at once
        records = ((line, value, None) for line, value in iter_json_records(path))
    for line_number, record, problem in records:
        if problem is not None:
            yield None, problem
            continue
        if not isinstance(record, dict):
            fields = ", ".join(repr(name) for name in text_fields)
            yield None, f"{path}:{line_number}: expected a JSON object with field {fields}, got {type(record).__name__}"
            continue
        parts, problem = [], None
        for name in text_fields:
            value = record.get(name)
            if name not in record:
                problem = f"{path}:{line_number}: field {name!r}: missing"
            elif not isinstance(value, str):
                problem = f"{path}:{line_number}: field {name!r}: expected a string, got {type(value).__name__}"
            if problem:
                break
            if value:
                parts.append(value)
        yield (None, problem) if problem else (field_separator.join(parts), None)


def _jsonl_records(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """Like `iter_json_records` for .jsonl, but a bad line (bad JSON, bad UTF-8, a lone surrogate)
    is handed back as a problem, so that `skip_invalid` can skip it and reading goes on."""
    for line_number, value, problem in iter_jsonl_values(path):
        yield line_number, value, None if problem is None else f"{path}:{line_number}: {problem}"


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------


class TokenCache:
    """A tokenised corpus on disk: `tokens` (memmap, all documents end to end) and `offsets`.

    Nothing is loaded into memory: `document(i)` is a view into the memmap, so a corpus larger than
    RAM is fine and every DataLoader worker shares the page cache.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(self.meta["dtype"])
        self.offsets = np.load(self.folder / "offsets.npy", mmap_mode="r")  # (n_documents + 1,) int64
        if self.meta["n_tokens"] == 0:  # numpy cannot memory-map an empty file
            self.tokens = np.zeros(0, dtype=dtype)
        else:
            self.tokens = np.memmap(self.folder / "tokens.bin", dtype=dtype, mode="r")  # (n_tokens,)
        if len(self.tokens) != self.offsets[-1]:
            raise DataError(f"{self.folder}: tokens.bin holds {len(self.tokens)} tokens, offsets say {self.offsets[-1]}")

    def __reduce__(self):
        # Pickled (for DataLoader workers that spawn) as its folder, not as the memmap's contents.
        return TokenCache, (self.folder,)

    def __len__(self) -> int:
        """The number of documents."""
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, i: int) -> np.ndarray:
        """The tokens of document i (no BOS/EOS), a read-only view."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document, (n_documents,) int64."""
        return np.diff(np.asarray(self.offsets))

    def __repr__(self) -> str:
        return f"TokenCache({self.folder}, {len(self)} documents, {self.n_tokens} tokens)"


def build_token_cache(
    files,
    tokenizer,
    cache_dir: str | os.PathLike,
    *,
    text_fields: tuple[str, ...] | str = ("text",),
    field_separator: str = "\n",
    txt_mode: str = "line",
    skip_invalid: bool = False,
    num_workers: int | None = None,
) -> TokenCache:
    """Tokenise `files` once into `cache_dir/<key>/`, or open the cache a previous run made.

    `num_workers`: None or 1 tokenises in this process with the tokenizer's batch encoder, which
    already spreads a batch over every core (SentencePiece and `tokenizers` both use threads);
    N > 1 starts N worker processes, each encoding whole chunks one text at a time (for tokenizers
    whose batch encoder does not scale). The reader options are those of `read_documents`.
    """
    options = _reader_options(text_fields, field_separator, txt_mode, skip_invalid)
    paths = expand_files(files)
    key = cache_key(paths, tokenizer.path, options)
    folder = Path(cache_dir) / key
    if (folder / "meta.json").exists():
        cache = TokenCache(folder)
        log.info("token cache hit: %s (%d documents, %d tokens)", folder, len(cache), cache.n_tokens)
        return cache

    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder.parent)  # what builds killed midway left (their PID is gone)
    temporary = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-{os.getpid()}-", dir=folder.parent))  # same file system
    try:
        meta = _write_tokens(paths, tokenizer, options, temporary, num_workers)
        meta.update(key=key, files=[str(p) for p in paths], tokenizer=str(tokenizer.path), options=options)
        (temporary / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        try:
            os.replace(temporary, folder)
        except OSError:  # another process finished the same cache first; theirs is identical
            if not (folder / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    cache = TokenCache(folder)
    log.info("token cache written: %s (%d documents, %d tokens)", folder, len(cache), cache.n_tokens)
    return cache


def cache_key(paths: list[Path], tokenizer_path, options: dict) -> str:
    """Hex digest of the tokenizer's bytes, each file's type, size and content, and the options."""
    digest = hashlib.sha256(f"nanotune token cache v{CACHE_FORMAT_VERSION}\n".encode())
    digest.update(f"tokenizer {file_sha256(tokenizer_path)}\n".encode())
    for path in paths:
        digest.update(f"file {path.suffix} {path.stat().st_size} {file_sha256(path)}\n".encode())
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the cache (and the page cache it occupies) when every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _write_tokens(paths, tokenizer, options, folder: Path, num_workers) -> dict:
    """Read, tokenise and append to folder/tokens.bin chunk by chunk; write offsets.npy."""
    dtype = token_dtype(tokenizer.vocab_size)
    skipped: list[int] = []
    documents = (text for path in paths for text in _documents_of_file(path, options, skipped))
    lengths: list[np.ndarray] = []
    n_tokens, started = 0, time.perf_counter()
    bar = tqdm(desc=f"tokenising {len(paths)} file(s)", unit=" docs", unit_scale=True, disable=None)  # none without a terminal
    with open(folder / "tokens.bin", "wb") as out:
        for tokens, document_lengths in _encode_chunks(_chunks(documents), tokenizer, dtype, num_workers):
            out.write(tokens.tobytes())
            lengths.append(document_lengths)
            n_tokens += len(tokens)
            bar.update(len(document_lengths))
            bar.set_postfix(tokens=n_tokens, refresh=False)
    bar.close()
    offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    np.save(folder / "offsets.npy", offsets)
    seconds = time.perf_counter() - started
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "n_documents": len(offsets) - 1,
        "n_tokens": n_tokens,
        "n_skipped_records": sum(skipped),
        "seconds": round(seconds, 3),
    }


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    """Lists of texts of about CHUNK_CHARACTERS characters (big enough to keep every core busy)."""
    chunk, size = [], 0
    for text in documents:
        chunk.append(text)
        size += len(text)
        if size >= CHUNK_CHARACTERS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_chunks(chunks, tokenizer, dtype, num_workers) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(flat tokens, lengths) per chunk, in order."""
    if num_workers is None or num_workers <= 1:
        for texts in chunks:
            yield _flatten(tokenizer.encode_batch(texts), dtype)
        return
    # At most 2 chunks per worker in flight: the reader must not run ahead and fill the memory.
    with ProcessPoolExecutor(num_workers, initializer=_load_worker_tokenizer, initargs=(str(tokenizer.path),)) as pool:
        in_flight = deque()
        for texts in chunks:
            in_flight.append(pool.submit(_encode_in_worker, texts, dtype.name))
            if len(in_flight) >= 2 * num_workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def _flatten(encoded: list[list[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter((i for ids in encoded for i in ids), dtype=np.int64, count=int(lengths.sum()))
    if len(tokens) and tokens.max() > np.iinfo(dtype).max:
        raise DataError(f"token id {tokens.max()} does not fit the cache's {dtype.name}")
    return tokens.astype(dtype), lengths


_worker_tokenizer = None


def _load_worker_tokenizer(tokenizer_path: str) -> None:
    global _worker_tokenizer
    from ..tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)


def _encode_in_worker(texts: list[str], dtype_name: str) -> tuple[np.ndarray, np.ndarray]:
    # One text at a time: the batch encoder would start its own threads in every process.
    return _flatten([_worker_tokenizer.encode(text) for text in texts], np.dtype(dtype_name))
