"""Merge the pieces of a new SentencePiece BPE model into a LLaMA `tokenizer.model`.

    python -m tokenizer_tools.merge_spm --base llama/tokenizer.model --extra out/zh.model --output merged/

writes `merged/tokenizer.model`, `tokenizer.json`, `tokenizer_config.json` and
`special_tokens_map.json`. The merge edits the SentencePiece `ModelProto` directly:

* every base piece keeps its id, score and type, and the base normaliser and trainer settings stay,
  so a model trained on the base vocabulary reads the same ids as before;
* the normal pieces of the extra model that the base lacks are appended, in the extra model's
  order, as normal pieces.

What a newcomer gets wrong is the scores. In a BPE `tokenizer.model` a piece's score is its merge
priority: encoding repeatedly joins the adjacent pair whose joined piece scores highest. The common
recipe gives every new piece score 0. Then thousands of merges tie, SentencePiece breaks the ties by
position in the text (leftmost first) and the `tokenizers` library by rank in its merge list, and
the two libraries give different ids for the same Chinese line. Here the new pieces get scores
strictly below the base's lowest normal score and strictly decreasing in the extra model's order,
so there are no new ties, and:

* the base merges all happen before any new one: the merged tokenizer splits text as the base
  does and then only joins neighbouring tokens, so every new token is a run of old tokens;
* among the new pieces the extra model's own merge order is kept.

A new piece of several characters is reachable only if it can be built by joining two pieces that
are themselves reachable: BPE never creates a piece out of nothing. Because the extra model is
itself a BPE model, each of its pieces was created by joining two of its pieces, so those halves are
either in the base already or appended too; `unreachable_pieces` checks this, and a non-BPE extra
model (whose pieces need not have their halves) is refused.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nanotune.files import write_atomically
from nanotune.tokenizer import (
    SPM_NORMAL,
    TokenizerError,
    load_sentencepiece_proto,
    write_hf_tokenizer_files,
)
from tokenizer_tools.train_spm import HelpFormatter, iter_texts

_BPE = 2  # TrainerSpec.model_type: 1 unigram, 2 bpe, 3 word, 4 char
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


class MergeError(ValueError):
    """Models that cannot be merged (the message says which file and why)."""


# -- the merge -------------------------------------------------------------------------------------


def _float32(value: float) -> float:
    """`value` as the protobuf `float` score field will store it."""
    return struct.unpack("f", struct.pack("f", value))[0]


def scores_below(lowest: float, count: int) -> list[float]:
    """`count` scores, all below `lowest`, strictly decreasing after rounding to float32.

    Steps of 1 where float32 can tell them apart; LLaMA-2 gives its whitespace pieces -1e9, where
    float32 numbers are 64 apart, so there the step doubles until every score is distinct.
    """
    step = 1.0
    while True:
        scores = [_float32(lowest - step * (k + 1)) for k in range(count)]
        previous = [_float32(lowest)] + scores[:-1]
        if all(score < before for score, before in zip(scores, previous)):
            return scores
        step *= 2


@dataclass
class MergeResult:
    proto: object  # the merged sentencepiece_model_pb2.ModelProto
    base_size: int
    added: list[str]  # new pieces, in id order from base_size on
    already_in_base: int  # normal pieces of the extra model the base has already
    not_normal: int  # control, unknown, byte and user-defined pieces of the extra model (never added)


def merge_models(base, extra) -> MergeResult:
    """The base `ModelProto` with the extra model's new normal pieces appended (see module doc)."""
    merged = type(base)()
    merged.CopyFrom(base)
    known = {piece.piece for piece in base.pieces}
    new_pieces, already, not_normal = [], 0, 0
    for piece in extra.pieces:
        if piece.type != SPM_NORMAL:
            not_normal += 1
        elif piece.piece in known:
            already += 1
        else:
            known.add(piece.piece)
            new_pieces.append(piece.piece)
    normal_scores = [piece.score for piece in base.pieces if piece.type == SPM_NORMAL]
    lowest = min(normal_scores) if normal_scores else 0.0
    for text, score in zip(new_pieces, scores_below(lowest, len(new_pieces))):
        piece = merged.pieces.add()
        piece.piece, piece.score, piece.type = text, score, SPM_NORMAL
    return MergeResult(merged, len(base.pieces), new_pieces, already, not_normal)


def check_mergeable(base, extra, base_path: Path, extra_path: Path) -> list[str]:
    """Refuse models that cannot be merged; return warnings for settings that differ."""
    if base.trainer_spec.model_type != _BPE:
        kind = _MODEL_TYPES.get(base.trainer_spec.model_type, "unknown")
        raise MergeError(f"{base_path}: a {kind} model; merge_spm merges into BPE models (LLaMA-1/2 style)")
    if extra.trainer_spec.model_type != _BPE:
        kind = _MODEL_TYPES.get(extra.trainer_spec.model_type, "unknown")
        raise MergeError(
            f"{extra_path}: a {kind} model; only BPE pieces come with the halves they are built from "
            "(train it with python -m tokenizer_tools.train_spm)"
        )
    warnings = []
    b, e = base.normalizer_spec, extra.normalizer_spec
    for name in ("name", "add_dummy_prefix", "remove_extra_whitespaces"):
        if getattr(b, name) != getattr(e, name):
            warnings.append(
                f"{extra_path}: normalizer {name} is {getattr(e, name)!r}, the base's is {getattr(b, name)!r}; "
                "its pieces may not match how the merged tokenizer (base normaliser) sees text"
            )
    if b.precompiled_charsmap != e.precompiled_charsmap and not warnings:
        warnings.append(f"{extra_path}: its normalisation rules differ from the base's")
    if base.trainer_spec.treat_whitespace_as_suffix != extra.trainer_spec.treat_whitespace_as_suffix:
        warnings.append(f"{extra_path}: treat_whitespace_as_suffix differs from the base; its '▁' pieces will not fit")
    return warnings


# -- checks ----------------------------------------------------------------------------------------


def unreachable_pieces(proto, first_id: int = 0) -> list[str]:
    """Pieces from `first_id` on that no sequence of BPE merges can build.

    A single character is reachable if it is a normal piece; a longer piece if it splits into two
    reachable normal pieces (SentencePiece only joins two symbols when the joined text is a piece).
    """
    normal = {p.piece for p in proto.pieces if p.type == SPM_NORMAL}
    memo: dict[str, bool] = {}

    def reachable(text: str) -> bool:
        if text not in memo:
            memo[text] = text in normal and (
                len(text) == 1 or any(reachable(text[:cut]) and reachable(text[cut:]) for cut in range(1, len(text)))
            )
        return memo[text]

    return [p.piece for p in list(proto.pieces)[first_id:] if p.type == SPM_NORMAL and not reachable(p.piece)]


def pieces_not_produced(proto, first_id: int = 0) -> list[str]:
    """Pieces from `first_id` on that are not the result of encoding their own text.

    A reachable piece can still be shadowed: when its text is encoded, higher-priority merges may
    take a different path. Such a piece is harmless, but its embedding row is never trained.
    """
    import sentencepiece as spm

    plain = type(proto)()
    plain.CopyFrom(proto)
    plain.normalizer_spec.add_dummy_prefix = False  # so "中国" is encoded as "中国", not "▁中国"
    sp = spm.SentencePieceProcessor(model_proto=plain.SerializeToString())
    ids = [i for i in range(first_id, len(proto.pieces)) if proto.pieces[i].type == SPM_NORMAL]
    texts = [proto.pieces[i].piece.replace("\u2581", " ") for i in ids]
    encoded = sp.Encode(texts)
    return [proto.pieces[i].piece for i, got in zip(ids, encoded) if got != [i]]


def disagreeing_lines(folder: Path, lines: list[str], progress: bool = False) -> list[int]:
    """Indices of `lines` that `tokenizer.model` and `tokenizer.json` in `folder` encode differently."""
    import sentencepiece as spm
    from tokenizers import Tokenizer as HFTokenizer
    from tqdm import tqdm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    different = []
    chunk_size = 2000
    for first in tqdm(range(0, len(lines), chunk_size), desc="sentencepiece vs tokenizers", disable=not progress):
        chunk = lines[first:first + chunk_size]
        reference = sp.Encode(chunk)
        converted = [e.ids for e in hf.encode_batch(chunk, add_special_tokens=False)]
        different += [first + i for i, (a, b) in enumerate(zip(reference, converted)) if a != b]
    return different


# -- writing ---------------------------------------------------------------------------------------


def write_merged(proto, folder: Path) -> None:
    """tokenizer.model plus its HF twin files, each written under a temporary name, then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "tokenizer.model", lambda temporary: temporary.write_bytes(proto.SerializeToString()))
    write_hf_tokenizer_files(folder / "tokenizer.model", folder)


def _read_check_lines(path: Path, limit: int) -> list[str]:
    from nanotune.data.records import expand_files

    lines = []
    for _, _, text in iter_texts(expand_files([path])):
        if text:
            lines.append(text)
        if len(lines) >= limit:
            break
    return lines


# -- command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tokenizer_tools.merge_spm",
        description="Append the new pieces of a SentencePiece BPE model to a LLaMA tokenizer.model "
        "(no original id moves) and write the HF tokenizer files beside it.",
        epilog="Example: python -m tokenizer_tools.merge_spm --base llama2/tokenizer.model "
        "--extra out/zh.model --output merged/ --check-input zh_eval.txt",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--base", required=True, type=Path, help="the LLaMA tokenizer.model (or a folder holding one)")
    parser.add_argument("--extra", required=True, type=Path,
                        help="the new BPE model, e.g. from tokenizer_tools.train_spm")
    parser.add_argument("--output", required=True, type=Path, help="folder for tokenizer.model and the HF files")
    parser.add_argument("--check-input", type=Path,
                        help="text (or .jsonl) whose lines both libraries must encode to the same ids")
    parser.add_argument("--check-lines", type=int, default=10000, help="lines of --check-input to check")
    return parser


def main(argv: list[str] | None = None) -> int:
    from nanotune.data.records import DataError, os_error_line

    args = build_parser().parse_args(argv)
    base_path = args.base / "tokenizer.model" if args.base.is_dir() else args.base
    try:
        for path in (base_path, args.extra):
            if not path.is_file():
                raise MergeError(f"{path}: file not found")
        base, extra = load_sentencepiece_proto(base_path), load_sentencepiece_proto(args.extra)
        for warning in check_mergeable(base, extra, base_path, args.extra):
            print(f"merge_spm: warning: {warning}", file=sys.stderr)
        start = time.perf_counter()
        result = merge_models(base, extra)
        write_merged(result.proto, args.output)
        seconds = time.perf_counter() - start
        check_lines = _read_check_lines(args.check_input, args.check_lines) if args.check_input else []
    except (MergeError, TokenizerError, DataError) as error:
        print(f"merge_spm: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an output folder that cannot be made or written, an unreadable input
        print(f"merge_spm: error: {os_error_line(error)}", file=sys.stderr)
        return 2

    n_new = len(result.added)
    scores = [p.score for p in list(result.proto.pieces)[result.base_size:]]
    print(f"base:    {result.base_size} pieces ({base_path})")
    print(f"extra:   {len(extra.pieces)} pieces ({args.extra}): {result.already_in_base} normal pieces already "
          f"in the base, {result.not_normal} special/byte/user-defined pieces not added")
    print(f"added:   {n_new} pieces, ids {result.base_size}..{result.base_size + n_new - 1}"
          + (f", scores {scores[0]:.10g} down to {scores[-1]:.10g}" if scores else ""))
    print(f"final:   {len(result.proto.pieces)} pieces -> {args.output}/tokenizer.model, tokenizer.json, "
          f"tokenizer_config.json, special_tokens_map.json ({seconds:.1f} s)")

    unreachable = unreachable_pieces(result.proto, result.base_size)
    shadowed = pieces_not_produced(result.proto, result.base_size)
    print(f"check:   {n_new - len(unreachable)}/{n_new} new pieces can be built by merges; "
          f"{n_new - len(shadowed)}/{n_new} are what their own text encodes to")
    if unreachable:
        print(f"merge_spm: warning: {len(unreachable)} new pieces can never be produced, e.g. "
              f"{unreachable[:10]} (their halves are not normal pieces of the merged model)", file=sys.stderr)

    texts = [piece.replace("\u2581", " ") for piece in result.added] + check_lines
    disagreements = disagreeing_lines(args.output, texts, progress=len(texts) > 20000)
    print(f"check:   sentencepiece and tokenizer.json give the same ids on {len(texts) - len(disagreements)}/"
          f"{len(texts)} texts ({n_new} new pieces' texts + {len(check_lines)} lines of --check-input)")
    if disagreements:
        print(f"merge_spm: error: the two libraries disagree, e.g. on {texts[disagreements[0]]!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
