"""Train a SentencePiece BPE model whose pieces can be merged into a LLaMA vocabulary.

    python -m tokenizer_tools.train_spm --input zh_*.txt --vocab-size 20000 --output out/zh

writes `out/zh.model` and `out/zh.vocab`. The defaults are LLaMA's own trainer settings where they
decide what a piece *is*, because pieces are merged by their text: a model trained with another
normaliser (the default `nmt_nfkc` folds full-width punctuation, which LLaMA never does) or without
the dummy "▁" prefix would add pieces that the merged tokenizer never produces.

* identity normalisation, spaces kept as they are (no whitespace collapsing), a dummy "▁" prefix;
* BPE (a merged LLaMA vocabulary is a BPE vocabulary; its scores are merge priorities);
* byte fallback and digits split one by one, as in LLaMA;
* character coverage 0.9995, SentencePiece's advice for languages with large character sets.

The corpus is streamed to the trainer line by line (`sentence_iterator`), never loaded whole; the
trainer keeps only `--input-sentence-size` sampled sentences (reservoir sampling with
`--shuffle`), so a corpus of many gigabytes trains in bounded memory. Text files give one sentence
per line; `.jsonl`/`.json` files give the lines of each record's `--text-field`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nanotune.data.records import DataError, expand_files, iter_json_records, iter_text_lines, os_error_line

# The settings that make a model mergeable into LLaMA-1/2 (see the module docstring).
LLAMA_TRAINER_DEFAULTS = {
    "model_type": "bpe",
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": True,
    "allow_whitespace_only_pieces": True,
    "max_sentencepiece_length": 16,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
}
# Options this module sets itself; `--spm-option` may not override them.
_RESERVED_OPTIONS = {"input", "model_prefix", "sentence_iterator", "model_writer", "vocab_size"}


class TrainError(RuntimeError):
    """SentencePiece refused the training run (its message says why)."""


# -- reading the corpus --------------------------------------------------------------------------


def iter_texts(files: list[Path], text_field: str = "text") -> Iterator[tuple[Path, int, str]]:
    """(file, line number, text) for every line of a text file or every record of a JSON file.

    Text files are read as bytes and decoded line by line, so a file of any size streams, and a
    line that is not UTF-8 is reported by its line number instead of crashing the trainer.
    """
    for path in files:
        if path.suffix in (".jsonl", ".json"):
            for line_number, record in iter_json_records(path):
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_number}: expected an object with field {text_field!r}")
                text = record.get(text_field)
                if not isinstance(text, str):
                    found = "missing" if text_field not in record else f"a {type(text).__name__}"
                    raise DataError(f"{path}:{line_number}: field {text_field!r} is {found}, expected a string")
                yield path, line_number, text
            continue
        for line_number, text, problem in iter_text_lines(path):  # a BOM is stripped
            if problem is not None:
                raise DataError(f"{path}:{line_number}: {problem}")
            yield path, line_number, text


@dataclass
class CorpusStats:
    """What the sentence stream saw; filled in while the trainer reads."""

    sentences: int = 0
    characters: int = 0
    too_long: int = 0
    examples: list[str] = field(default_factory=list)


def iter_sentences(files: list[Path], stats: CorpusStats, max_sentence_length: int,
                   text_field: str = "text", progress: bool = True) -> Iterator[str]:
    """Non-empty lines for the trainer, with a progress bar over the bytes of the input files.

    Lines longer than `max_sentence_length` bytes are skipped here and counted, because the
    trainer would skip them anyway, with a warning per line that floods the terminal.
    """
    from tqdm import tqdm

    total = sum(path.stat().st_size for path in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading corpus", disable=not progress) as bar:
        current, done_before = None, 0
        for path, _, text in iter_texts(files, text_field):
            if path != current:  # a new file: account for the whole of the previous one
                if current is not None:
                    done_before += current.stat().st_size
                    bar.n = done_before
                current = path
            for sentence in text.split("\n"):
                size = len(sentence.encode("utf-8"))
                bar.update(size + 1)
                if not sentence.strip():
                    continue
                if size > max_sentence_length:
                    stats.too_long += 1
                    continue
                stats.sentences += 1
                stats.characters += len(sentence)
                if len(stats.examples) < 3:
                    stats.examples.append(sentence)
                yield sentence
        bar.n = total
        bar.refresh()


# -- training ------------------------------------------------------------------------------------


def parse_spm_options(pairs: list[str]) -> dict[str, str]:
    """`["key=value", ...]` -> dict, refusing options this tool sets itself."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise TrainError(f"--spm-option {pair!r}: expected key=value, e.g. max_sentencepiece_length=8")
        if key in _RESERVED_OPTIONS:
            raise TrainError(f"--spm-option {pair!r}: {key} is set by train_spm itself")
        options[key] = value
    return options


def train_sentencepiece(
    files: list[Path],
    output: Path,
    vocab_size: int,
    *,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 0,
    shuffle: bool = True,
    num_threads: int | None = None,
    byte_fallback: bool = True,
    split_digits: bool = True,
    max_sentence_length: int = 16384,
    user_defined_symbols: list[str] | None = None,
    text_field: str = "text",
    extra_options: dict[str, str] | None = None,
    verbose: bool = False,
    progress: bool = True,
) -> CorpusStats:
    """Train on `files` and write `<output>.model` and `<output>.vocab` (atomically).

    `input_sentence_size=0` trains on every sentence; otherwise that many are sampled
    (uniformly with `shuffle`, the first ones without). `extra_options` go to the trainer as they
    are (any `TrainerSpec`/`NormalizerSpec` field) and override the settings above.
    """
    import sentencepiece as spm

    output.parent.mkdir(parents=True, exist_ok=True)
    temporary_prefix = output.parent / f".{output.name}.tmp{os.getpid()}"
    stats = CorpusStats()
    options = {
        **LLAMA_TRAINER_DEFAULTS,
        "vocab_size": vocab_size,
        "character_coverage": character_coverage,
        "input_sentence_size": input_sentence_size,
        "shuffle_input_sentence": shuffle,
        "num_threads": num_threads or min(os.cpu_count() or 1, 16),
        "byte_fallback": byte_fallback,
        "split_digits": split_digits,
        "max_sentence_length": max_sentence_length,
        "minloglevel": 0 if verbose else 1,
        **(extra_options or {}),
    }
    if user_defined_symbols:
        options["user_defined_symbols"] = list(user_defined_symbols)
    bad_input: list[DataError] = []

    def sentences() -> Iterator[str]:
        # The trainer (C++) turns an exception of the iterator into its own RuntimeError;
        # keep ours, so bad input is reported as `file:line: ...`, not as a trainer failure.
        try:
            yield from iter_sentences(files, stats, max_sentence_length, text_field, progress)
        except DataError as error:
            bad_input.append(error)
            raise

    try:
        spm.SentencePieceTrainer.Train(sentence_iterator=sentences(), model_prefix=str(temporary_prefix), **options)
    except (RuntimeError, OSError, DataError) as error:
        for suffix in (".model", ".vocab"):
            Path(f"{temporary_prefix}{suffix}").unlink(missing_ok=True)
        if bad_input:
            raise bad_input[0] from None
        message = str(error).strip()
        if "Vocabulary size too high" in message:
            message += " (the corpus is too small for that many pieces; or --spm-option hard_vocab_limit=false)"
        raise TrainError(f"sentencepiece refused to train: {message}") from None
    for suffix in (".model", ".vocab"):
        os.replace(f"{temporary_prefix}{suffix}", f"{output}{suffix}")
    return stats


def summary(model_path: Path, stats: CorpusStats, seconds: float) -> str:
    """Pieces by type, the corpus seen, and how the first sentences are split."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    n = sp.GetPieceSize()
    kinds = {"normal": 0, "byte": 0, "control/unknown": 0, "user-defined": 0}
    multi_character = 0
    for i in range(n):
        if sp.IsByte(i):
            kinds["byte"] += 1
        elif sp.IsControl(i) or sp.IsUnknown(i):
            kinds["control/unknown"] += 1
        else:
            kinds["normal"] += 1
            multi_character += len(sp.IdToPiece(i)) > 1
    lines = [
        f"wrote {model_path} and {model_path.with_suffix('.vocab')} in {seconds:.1f} s",
        f"pieces: {n} ({', '.join(f'{count} {kind}' for kind, count in kinds.items() if count)}; "
        f"{multi_character} of more than one character)",
        f"corpus: {stats.sentences:,} sentences, {stats.characters:,} characters read"
        + (f"; {stats.too_long:,} longer than --max-sentence-length skipped" if stats.too_long else ""),
    ]
    for sentence in stats.examples:
        shown = sentence[:60]
        pieces = sp.EncodeAsPieces(shown)
        lines.append(f"  {shown!r}{'...' if len(sentence) > 60 else ''}\n"
                     f"    -> {len(pieces)} pieces: {' '.join(pieces[:30])}{' ...' if len(pieces) > 30 else ''}")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth reading."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, [], False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tokenizer_tools.train_spm",
        description="Train a SentencePiece BPE model with LLaMA-compatible settings, to merge into a "
        "LLaMA vocabulary with tokenizer_tools.merge_spm.",
        epilog="Example: python -m tokenizer_tools.train_spm --input zh_wiki.txt zh_news.jsonl "
        "--vocab-size 20000 --input-sentence-size 5000000 --output out/zh",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True,
                        help="text files (one sentence per line) or .jsonl/.json files; globs allowed")
    parser.add_argument("--output", required=True, type=Path,
                        help="output prefix: writes OUTPUT.model and OUTPUT.vocab")
    parser.add_argument("--vocab-size", type=int, default=20000,
                        help="pieces in the model, special and byte pieces included")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.json records")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="share of characters the alphabet must cover; rarer characters fall back to bytes")
    parser.add_argument("--input-sentence-size", type=int, default=0,
                        help="train on this many sampled sentences (0: all); 2-10 million is plenty for 20k pieces")
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                        help="sample sentences uniformly over the whole corpus (otherwise take the first ones)")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16), help="trainer threads")
    parser.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                        help="spell unknown characters as UTF-8 byte pieces (as LLaMA does)")
    parser.add_argument("--split-digits", action=argparse.BooleanOptionalAction, default=True,
                        help="one piece per digit (as LLaMA does)")
    parser.add_argument("--max-sentence-length", type=int, default=16384,
                        help="longer lines (in UTF-8 bytes) are skipped")
    parser.add_argument("--user-defined-symbols", nargs="*", default=[], metavar="SYMBOL",
                        help="pieces always kept whole, e.g. domain markers")
    parser.add_argument("--spm-option", action="append", default=[], metavar="KEY=VALUE",
                        help="any other SentencePiece trainer option, e.g. max_sentencepiece_length=8 (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="show the trainer's own log (its merge progress)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        files = expand_files(args.input)
        extra_options = parse_spm_options(args.spm_option)
        if args.vocab_size < 10:
            raise TrainError(f"--vocab-size {args.vocab_size}: too small for a BPE model")
        print(f"training a {args.vocab_size}-piece BPE model on {len(files)} file(s); "
              "the merges after reading take most of the time (--verbose shows them)", file=sys.stderr)
        start = time.perf_counter()
        stats = train_sentencepiece(
            files, args.output, args.vocab_size,
            character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size,
            shuffle=args.shuffle,
            num_threads=args.threads,
            byte_fallback=args.byte_fallback,
            split_digits=args.split_digits,
            max_sentence_length=args.max_sentence_length,
            user_defined_symbols=args.user_defined_symbols,
            text_field=args.text_field,
            extra_options=extra_options,
            verbose=args.verbose,
            progress=not args.no_progress,
        )
        seconds = time.perf_counter() - start
    except (DataError, TrainError) as error:
        print(f"train_spm: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an output folder that cannot be made or written, an unreadable input
        print(f"train_spm: error: {os_error_line(error)}", file=sys.stderr)
        return 2
    print(summary(Path(f"{args.output}.model"), stats, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
