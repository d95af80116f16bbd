"""One `Tokenizer` over the two file formats LLaMA tokenizers come in.

* SentencePiece `tokenizer.model` (LLaMA-1/2, Chinese-LLaMA, BELLE): read with `sentencepiece`.
* HuggingFace `tokenizer.json` (LLaMA-3, Qwen, anything saved by `transformers`): read with
  `tokenizers`.

`encode` never adds special tokens by itself: BOS and EOS are asked for explicitly
(`encode(text, bos=True, eos=True)`), because where they go is the business of the data code
(packing, chat templates), and a tokenizer that silently adds a BOS is the most common source of a
doubled `<s><s>` in fine-tuning data.

`sentencepiece_to_hf_json` converts a SentencePiece BPE model into an equivalent `tokenizer.json`
(the LLaMA layout: a "▁" prepended, spaces turned into "▁", byte fallback), so that both libraries,
and `transformers`, read one vocabulary and give the same ids.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .files import write_text_atomically


class TokenizerError(ValueError):
    """A tokenizer file that is missing or cannot be read."""


class Tokenizer:
    """A tokenizer with the ids and methods the rest of nanotune needs; see `from_file`."""

    def __init__(self, backend, path: Path):
        self._backend = backend
        self.path = path  # the file it was read from (part of data cache keys)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike, prefer: str = "sentencepiece") -> "Tokenizer":
        """Read a `.model` (SentencePiece), a `tokenizer.json`, or a folder holding either.

        A folder with both prefers SentencePiece (`prefer="sentencepiece"`), the reference for
        LLaMA-2-style vocabularies; `prefer="hf"` takes `tokenizer.json` instead.
        """
        path = Path(path)
        if path.is_dir():
            spm, hf = path / "tokenizer.model", path / "tokenizer.json"
            candidates = [spm, hf] if prefer == "sentencepiece" else [hf, spm]
            found = [p for p in candidates if p.exists()]
            if not found:
                raise TokenizerError(f"{path}: no tokenizer.model or tokenizer.json in this folder")
            path = found[0]
        if not path.exists():
            raise TokenizerError(f"{path}: tokenizer file not found")
        if path.suffix == ".json":
            return cls(_HFBackend(path), path)
        return cls(_SentencePieceBackend(path), path)

    # -- the interface -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._backend.bos_id

    @property
    def eos_id(self) -> int | None:
        return self._backend.eos_id

    @property
    def pad_id(self) -> int:
        """The pad piece if the vocabulary has one, else EOS (padding is masked out anyway)."""
        pad = self._backend.pad_id
        return pad if pad is not None else self.eos_id

    @property
    def kind(self) -> str:
        return self._backend.kind

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._backend.encode_batch([text])[0]
        return self._add_special(ids, bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Encode many texts at once (SentencePiece and tokenizers both use several threads)."""
        return [self._add_special(ids, bos, eos) for ids in self._backend.encode_batch(list(texts))]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens (BOS, EOS, pad) are left out."""
        return self._backend.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._backend.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        """Id of a piece, or None if the vocabulary has no such piece."""
        return self._backend.piece_to_id(piece)

    def piece_text(self, token_id: int) -> str:
        """The text a single piece stands for ("▁hello" -> " hello"); "" for special and byte pieces."""
        return self._backend.piece_text(token_id)

    def save(self, folder: str | os.PathLike) -> None:
        """Copy the tokenizer into `folder`, beside a saved model, under the names HF expects.

        A SentencePiece model also gets its `tokenizer.json` twin, so `transformers` loads the folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, folder / self._canonical_name())
        if self.path.name in ("tokenizer.model", "tokenizer.json"):
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                companion = self.path.parent / name
                if companion.exists() and companion != self.path:
                    shutil.copyfile(companion, folder / name)
        if self.kind == "sentencepiece" and not (folder / "tokenizer.json").exists():
            write_hf_tokenizer_files(folder / "tokenizer.model", folder)

    def _canonical_name(self) -> str:
        return "tokenizer.json" if self.kind == "hf" else "tokenizer.model"

    def _add_special(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.path}: this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise TokenizerError(f"{self.path}: this tokenizer has no EOS token")
            ids = ids + [self.eos_id]
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, {self.path}, vocab_size={self.vocab_size})"


class _SentencePieceBackend:
    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{path}: not a SentencePiece model ({error})") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id = _non_negative(self.sp.bos_id())
        self.eos_id = _non_negative(self.sp.eos_id())
        self.pad_id = _non_negative(self.sp.pad_id())

    def encode_batch(self, texts):
        if len(texts) == 1:
            return [self.sp.Encode(texts[0])]  # a list input would start SentencePiece's thread pool
        return self.sp.Encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.sp.Decode(ids)

    def id_to_piece(self, token_id):
        return self.sp.IdToPiece(token_id)

    def piece_to_id(self, piece):
        token_id = self.sp.PieceToId(piece)
        if token_id == self.sp.unk_id() and piece != self.sp.IdToPiece(token_id):
            return None
        return token_id

    def piece_text(self, token_id):
        if self.sp.IsControl(token_id) or self.sp.IsUnknown(token_id) or self.sp.IsByte(token_id):
            return ""
        return self.sp.IdToPiece(token_id).replace("\u2581", " ")


class _HFBackend:
    kind = "hf"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"{path}: not a tokenizers JSON file ({error})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        special = _special_tokens_beside(path)
        self.bos_id = self._find(special.get("bos_token"), ["<s>", "<|begin_of_text|>", "<|im_start|>"])
        self.eos_id = self._find(special.get("eos_token"), ["</s>", "<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"])
        self.pad_id = self._find(special.get("pad_token"), ["<pad>", "<|finetune_right_pad_id|>"])

    def _find(self, configured, fallbacks):
        names = [configured] if configured else fallbacks
        for name in names:
            token_id = self.tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, token_id):
        return self.tok.id_to_token(token_id)

    def piece_to_id(self, piece):
        return self.tok.token_to_id(piece)

    def piece_text(self, token_id):
        piece = self.tok.id_to_token(token_id)
        if piece is None or (piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6):
            return ""
        if token_id in (self.bos_id, self.eos_id, self.pad_id):
            return ""
        if self.tok.token_to_id("\u2581") is not None:  # SentencePiece-style vocabulary
            return piece.replace("\u2581", " ")
        return self.tok.decode([token_id], skip_special_tokens=True)  # byte-level (LLaMA-3 style)


def _non_negative(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def _special_tokens_beside(path: Path) -> dict:
    """bos/eos/pad token strings from tokenizer_config.json or special_tokens_map.json next to `path`."""
    found = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = path.parent / name
        if not file.exists():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise TokenizerError(f"{file}: invalid JSON ({error})") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


# ----------------------------------------------------------------------------------------------
# SentencePiece BPE -> tokenizer.json
# ----------------------------------------------------------------------------------------------

SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED, SPM_UNUSED, SPM_BYTE = 1, 2, 3, 4, 5, 6


def load_sentencepiece_proto(path: str | os.PathLike):
    """The parsed `ModelProto` of a SentencePiece model (needs protobuf)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as error:  # protobuf's DecodeError
        raise TokenizerError(f"{path}: not a SentencePiece model ({error})") from None
    return proto


def bpe_merges_from_scores(pieces: list[tuple[str, float]], mergeable: set[int]) -> list[tuple[str, str]]:
    """The merge list a BPE with SentencePiece's behaviour needs, best merge first.

    SentencePiece BPE repeatedly joins the adjacent pair whose joined piece has the highest score.
    `tokenizers` BPE joins the pair with the lowest rank in its merge list. So every way of
    splitting a piece into two pieces of the vocabulary is a merge, ranked by the joined piece's
    score (higher first; equal scores by id). With equal scores the two libraries break ties
    differently, which is why merged vocabularies must give new pieces distinct scores.
    """
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    ranked = []
    for token_id in mergeable:
        piece, score = pieces[token_id]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and vocab[left] in mergeable and vocab[right] in mergeable:
                ranked.append((-score, token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def sentencepiece_to_hf_json(model_path: str | os.PathLike):
    """A `tokenizers.Tokenizer` that encodes exactly as the SentencePiece BPE model at `model_path`.

    Supported: BPE models with LLaMA's normalisation (identity rule, no whitespace collapsing), with
    or without byte fallback and the dummy "▁" prefix. Anything else is refused rather than
    converted approximately.
    """
    from tokenizers import AddedToken, Regex, decoders, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    proto = load_sentencepiece_proto(model_path)
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2:  # 1 unigram, 2 bpe, 3 word, 4 char
        raise TokenizerError(f"{model_path}: only SentencePiece BPE models can be converted")
    if normalizer.precompiled_charsmap or normalizer.name not in ("identity", ""):
        raise TokenizerError(
            f"{model_path}: normalizer {normalizer.name!r} is not supported (LLaMA uses 'identity')"
        )
    pieces = [(p.piece, p.score) for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    mergeable = {i for i, t in enumerate(types) if t == SPM_NORMAL}
    merges = bpe_merges_from_scores(pieces, mergeable)
    unk_piece = pieces[trainer.unk_id][0] if trainer.unk_id >= 0 else None
    model = BPE(
        vocab=vocab,
        merges=merges,
        unk_token=unk_piece,
        fuse_unk=True,
        byte_fallback=bool(trainer.byte_fallback),
    )
    tokenizer = HFTokenizer(model)

    steps = []
    if normalizer.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if normalizer.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    steps.append(normalizers.Replace(" ", "\u2581"))
    tokenizer.normalizer = normalizers.Sequence(steps)

    decode_steps = [decoders.Replace("\u2581", " ")]
    if trainer.byte_fallback:
        decode_steps.append(decoders.ByteFallback())
    decode_steps.append(decoders.Fuse())
    if normalizer.add_dummy_prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode_steps)

    added = [
        AddedToken(piece, special=types[i] == SPM_CONTROL or types[i] == SPM_UNKNOWN, normalized=False)
        for i, (piece, _) in enumerate(pieces)
        if types[i] in (SPM_CONTROL, SPM_UNKNOWN, SPM_USER_DEFINED)
    ]
    tokenizer.add_tokens([t for t in added if not t.special])
    tokenizer.add_special_tokens([t for t in added if t.special])

    if trainer.bos_id >= 0:
        bos = pieces[trainer.bos_id][0]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, trainer.bos_id)]
        )
    return tokenizer


def write_hf_tokenizer_files(model_path: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json for a SentencePiece model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    proto = load_sentencepiece_proto(model_path)
    trainer = proto.trainer_spec
    tokenizer = sentencepiece_to_hf_json(model_path)
    piece = lambda i: proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None  # noqa: E731
    special = {"bos_token": piece(trainer.bos_id), "eos_token": piece(trainer.eos_id), "unk_token": piece(trainer.unk_id)}
    if trainer.pad_id >= 0:
        special["pad_token"] = piece(trainer.pad_id)
    special = {k: v for k, v in special.items() if v is not None}
    # "PreTrainedTokenizerFast" makes transformers use tokenizer.json exactly as written. With
    # "LlamaTokenizer", transformers 5 rebuilds the pre-tokenizer itself and then differs from
    # SentencePiece on text that starts with spaces.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": trainer.bos_id >= 0,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 1_000_000_000,
        **special,
    }
    write_text_atomically(folder / "tokenizer.json", tokenizer.to_str())
    write_text_atomically(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    write_text_atomically(folder / "special_tokens_map.json", json.dumps(special, indent=2, ensure_ascii=False))
