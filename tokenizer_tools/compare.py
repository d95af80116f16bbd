"""Measure tokenizers side by side on one text.

    python -m tokenizer_tools.compare --tokenizer llama2/tokenizer.model --tokenizer merged/ --input zh_eval.txt

For each tokenizer (a `.model`, a `tokenizer.json` or a folder holding either):

* vocabulary size;
* tokens per line and characters per token: what a vocabulary extension is for (the same text in
  fewer tokens means more text per context window and per training step);
* lines whose `decode(encode(line))` is not the line: must be 0 for a tokenizer used for training,
  or generated text will differ from what was learned;
* the share of unknown tokens (text lost) and of byte-fallback tokens (text spelled byte by byte,
  which is how LLaMA-2 spells most Chinese characters);
* encoding speed in lines and characters per second (batched, all threads).

Text files give one line per line (empty lines are skipped); `.jsonl`/`.json` files give one
record's `--text-field` per "line".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nanotune.data.records import DataError, expand_files, os_error_line
from nanotune.tokenizer import Tokenizer, TokenizerError
from tokenizer_tools.train_spm import HelpFormatter, iter_texts

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class TokenizerStats:
    tokenizer: str
    vocab_size: int
    lines: int
    characters: int
    tokens: int
    tokens_per_line: float
    characters_per_token: float
    roundtrip_failures: int
    unknown_tokens: int | None  # None: the vocabulary has no "<unk>" piece
    unknown_rate: float | None
    byte_tokens: int
    byte_rate: float
    seconds: float
    lines_per_second: float
    characters_per_second: float


def read_lines(path: Path, max_lines: int | None = None, text_field: str = "text") -> list[str]:
    """Non-empty lines (or record texts) of `path`, at most `max_lines`."""
    lines = []
    for _, _, text in iter_texts(expand_files([path]), text_field):
        if text:
            lines.append(text)
            if max_lines is not None and len(lines) >= max_lines:
                break
    return lines


def _special_ids(tokenizer: Tokenizer) -> tuple[int | None, set[int]]:
    """The unknown-token id (None if the vocabulary has none) and the ids of the 256 byte pieces."""
    unknown = tokenizer.piece_to_id("<unk>")
    byte_ids = {tokenizer.piece_to_id(f"<0x{b:02X}>") for b in range(256)} - {None}
    byte_ids = {i for i in byte_ids if _BYTE_PIECE.fullmatch(tokenizer.id_to_piece(i) or "")}
    return unknown, byte_ids


def measure(tokenizer: Tokenizer, lines: list[str], name: str | None = None,
            batch_size: int = 1000, progress: bool = True) -> TokenizerStats:
    """Encode `lines` in batches (timed), then decode each to check the round trip (not timed)."""
    from tqdm import tqdm

    label = name or str(tokenizer.path)
    encoded: list[list[int]] = []
    seconds = 0.0
    batches = range(0, len(lines), batch_size)
    for first in tqdm(batches, desc=f"encoding with {Path(label).name}", disable=not progress, leave=False):
        batch = lines[first:first + batch_size]
        start = time.perf_counter()
        encoded += tokenizer.encode_batch(batch)
        seconds += time.perf_counter() - start
    failures = sum(tokenizer.decode(ids) != line for ids, line in zip(encoded, lines))
    unknown_id, byte_ids = _special_ids(tokenizer)
    tokens = sum(len(ids) for ids in encoded)
    characters = sum(len(line) for line in lines)
    unknown = None if unknown_id is None else sum(ids.count(unknown_id) for ids in encoded)
    n_bytes = sum(1 for ids in encoded for i in ids if i in byte_ids)
    seconds = max(seconds, 1e-9)
    return TokenizerStats(
        tokenizer=label,
        vocab_size=tokenizer.vocab_size,
        lines=len(lines),
        characters=characters,
        tokens=tokens,
        tokens_per_line=tokens / max(len(lines), 1),
        characters_per_token=characters / max(tokens, 1),
        roundtrip_failures=failures,
        unknown_tokens=unknown,
        unknown_rate=None if unknown is None else unknown / max(tokens, 1),
        byte_tokens=n_bytes,
        byte_rate=n_bytes / max(tokens, 1),
        seconds=seconds,
        lines_per_second=len(lines) / seconds,
        characters_per_second=characters / seconds,
    )


def format_table(results: list[TokenizerStats]) -> str:
    """One row per tokenizer; the last column compares tokens per line with the first tokenizer."""
    header = ["tokenizer", "vocab", "tokens/line", "chars/token", "roundtrip fails", "unk %", "byte %",
              "lines/s", "chars/s", "tokens vs first"]
    rows = [header]
    for r in results:
        rows.append([
            r.tokenizer,
            f"{r.vocab_size:,}",
            f"{r.tokens_per_line:.1f}",
            f"{r.characters_per_token:.3f}",
            f"{r.roundtrip_failures}/{r.lines}",
            "n/a" if r.unknown_rate is None else f"{100 * r.unknown_rate:.3f}",
            f"{100 * r.byte_rate:.2f}",
            f"{r.lines_per_second:,.0f}",
            f"{r.characters_per_second:,.0f}",
            f"{r.tokens / max(results[0].tokens, 1):.3f}",
        ])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tokenizer_tools.compare",
        description="Compare tokenizers on a text: vocabulary size, tokens per line, characters per token, "
        "round-trip failures, unknown and byte-fallback tokens, encoding speed.",
        epilog="Example: python -m tokenizer_tools.compare --tokenizer llama2/tokenizer.model "
        "--tokenizer merged/ --input zh_eval.txt --max-lines 10000",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--tokenizer", action="append", required=True, type=Path,
                        help="a .model, a tokenizer.json or a folder holding either (repeat for each tokenizer)")
    parser.add_argument("--input", required=True, type=Path, help="text file (one line per line) or .jsonl/.json")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.json records")
    parser.add_argument("--max-lines", type=int, default=None, help="use only the first N non-empty lines")
    parser.add_argument("--prefer", choices=["sentencepiece", "hf"], default="sentencepiece",
                        help="for a folder holding both: which file to read")
    parser.add_argument("--json", action="store_true", help="print JSON (a list, one object per tokenizer)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tokenizers = [Tokenizer.from_file(path, prefer=args.prefer) for path in args.tokenizer]
        lines = read_lines(args.input, args.max_lines, args.text_field)
        if not lines:
            raise DataError(f"{args.input}: no non-empty lines to compare on")
    except (TokenizerError, DataError) as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an output folder that cannot be made or written, an unreadable input
        print(f"compare: error: {os_error_line(error)}", file=sys.stderr)
        return 2
    results = [measure(tokenizer, lines, str(path), progress=not args.no_progress)
               for tokenizer, path in zip(tokenizers, args.tokenizer)]
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2, ensure_ascii=False))
    else:
        print(f"{len(lines):,} lines, {results[0].characters:,} characters from {args.input}")
        print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
