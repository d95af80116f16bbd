"""One `Tokenizer` over the two file formats LLaMA tokenizers come in.

* SentencePiece `tokenizer.model` (LLaMA-1/2, Chinese-LLaMA, BELLE): read with `sentencepiece`.
* HuggingFace `tokenizer.json` (LLaMA-3, Qwen, anything saved by `transformers`): read with
  `tokenizers`.

`encode` never adds special tokens by itself: BOS and EOS are asked for explicitly
(`encode(text, bos=True, eos=True)`), because where they go is the business of the data code
(packing, chat templates), and a tokenizer that silently adds a BOS is the most common source of a
doubled `<s><s>` in fine-tuning data.

BOS, EOS and pad are what the folder's `tokenizer_config.json` (or `special_tokens_map.json`) says,
and a key it sets to null means "none": Qwen has no BOS, so `bos_id` is None and no BOS is put in
front of pretraining documents or conversations, even though its vocabulary happens to contain an
ordinary piece spelled `<s>`. Only a `tokenizer.json` with no such file beside it, converted from a
LLaMA-2-style SentencePiece model, falls back to the pieces `<s>`, `</s>`, `<pad>`.

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

    @property
    def special_tokens(self) -> dict[str, str]:
        """The text of BOS, EOS, pad and unk ("bos_token": "<s>", ...), for a Jinja chat template.

        These are the names transformers hands a chat template; a token this tokenizer lacks is absent.
        """
        return self._backend.special_tokens

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template saved with this tokenizer, or None.

        Read as transformers reads it: `chat_template.jinja` beside the tokenizer if present, else
        `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates, of which
        "default" is taken).
        """
        return read_chat_template(self.path.parent)

    def save(self, folder: str | os.PathLike, chat_template: str | None = None) -> None:
        """Copy the tokenizer into `folder`, beside a saved model, under the names HF expects.

        A SentencePiece model also gets its `tokenizer.json` twin, so `transformers` loads the folder.
        `chat_template` (a Jinja string) is written into `tokenizer_config.json`, so that
        `apply_chat_template` on the saved folder lays conversations out as training did; see
        `nanotune.data.template_check.saved_chat_template` for the string that does.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, folder / self._canonical_name())
        if self.path.name in ("tokenizer.model", "tokenizer.json"):
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
                companion = self.path.parent / name
                if companion.exists() and companion != self.path:
                    shutil.copyfile(companion, folder / name)
        if self.kind == "sentencepiece" and not (folder / "tokenizer.json").exists():
            write_hf_tokenizer_files(folder / "tokenizer.model", folder)
        config_file = folder / "tokenizer_config.json"
        if not config_file.exists():  # a bare tokenizer.json: say what transformers should build
            config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
            write_text_atomically(config_file, json.dumps(config, indent=2, ensure_ascii=False))
        if chat_template is not None:
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config["chat_template"] = chat_template
            write_text_atomically(config_file, json.dumps(config, indent=2, ensure_ascii=False))
            if (folder / "chat_template.jinja").exists():  # transformers would read that one first
                write_text_atomically(folder / "chat_template.jinja", chat_template)

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
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id,
                 "unk_token": _non_negative(self.sp.unk_id())}
        self.special_tokens = {key: self.sp.IdToPiece(i) for key, i in names.items() if i is not None}

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
        self.sentencepiece_style = self.tok.token_to_id("\u2581") is not None  # LLaMA-2-like, not byte-level
        declared = _special_tokens_beside(path)
        # Without a config file, only a SentencePiece-converted vocabulary has conventional names
        # to fall back on; a byte-level one (Qwen, LLaMA-3) always ships a tokenizer_config.json.
        fallbacks = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"} if self.sentencepiece_style else {}
        self.special_tokens = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            name = declared[key] if key in declared else fallbacks.get(key)
            if name is not None and self.tok.token_to_id(name) is None:
                if key in declared:
                    raise TokenizerError(f"{path.parent}: {key} {name!r} of the tokenizer config is not in {path.name}")
                name = None
            if name is not None:
                self.special_tokens[key] = name
        self.bos_id, self.eos_id, self.pad_id = (
            self.tok.token_to_id(self.special_tokens[key]) if key in self.special_tokens else None
            for key in ("bos_token", "eos_token", "pad_token")
        )

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
        if self.sentencepiece_style:
            return piece.replace("\u2581", " ")
        return self.tok.decode([token_id], skip_special_tokens=True)  # byte-level (LLaMA-3 style)


def _non_negative(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TokenizerError(f"{file}: invalid JSON ({error})") from None


def _special_tokens_beside(path: Path) -> dict[str, str | None]:
    """The bos/eos/pad/unk token strings that tokenizer_config.json or special_tokens_map.json next
    to `path` declare; a key they set to null is present with the value None (the token is absent).

    tokenizer_config.json wins over special_tokens_map.json, as in transformers. A value may be a
    string or an AddedToken object {"content": ...}.
    """
    declared = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = path.parent / name
        if not file.exists():
            continue
        data = _read_json(file)
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if key not in data:
                continue
            value = data[key]
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None and not isinstance(value, str):
                raise TokenizerError(f"{file}: {key} must be a string, an AddedToken object or null")
            declared[key] = value
    return declared


def read_chat_template(folder: str | os.PathLike) -> str | None:
    """The Jinja chat template of a tokenizer folder (`chat_template.jinja` first, then
    `tokenizer_config.json`'s "chat_template", as transformers reads them), or None."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    if not config_file.exists():
        return None
    template = _read_json(config_file).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


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
