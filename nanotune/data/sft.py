"""SFT samples: conversations -> token ids and labels, truncation, padding and packing.

The one rule of supervised fine-tuning: the model is trained only to produce the assistant's
replies, each followed by the token that ends it (EOS, or the template's end marker), and it sees
every other token only as context. In nanotune's convention (the same as pretraining) labels are
shifted once, here:

    labels[t] = input_ids[t + 1]  if token t + 1 belongs to an assistant reply or its end marker
    labels[t] = -100              otherwise (so the last position is always -100)

so the model's loss is a plain sum over positions and never has to know about shifting. Every
assistant turn of a multi-turn conversation is trained, not only the last one. (With a template
that drops the reasoning of earlier replies, as `qwen3` does, `reasoning_turns="every"` makes one
sample per reply instead, so that every reply is trained with its reasoning: see
`one_conversation_per_reply`.)

Tokenisation follows the template's segments (see `templates.py`): text between two special
tokens is tokenised in one call, exactly as it will be at inference, and the tokens are attributed
to segments afterwards by tokenising each prefix and comparing (`tokenize_segments`). Tokenising
the prompt and the reply separately and concatenating would be simpler, and wrong: SentencePiece
gives " Hello" different tokens at the start of a call than after "[/INST]", and a model trained on
one tokenisation is then prompted with the other.
"""

from __future__ import annotations

import bisect
import logging
from array import array
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch

from .formats import read_conversations
from .templates import Segment, Template, get_template
from ..loss import IGNORE_INDEX

log = logging.getLogger("nanotune")

TRUNCATION_STRATEGIES = ("drop", "truncate", "truncate_left")
REASONING_TURNS = ("last", "every")

# --------------------------------------------------------------------------------------------------
# Segments -> tokens
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizedConversation:
    """Token ids with, for every token, whether it is trained, its exchange and whether it is BOS."""

    ids: list[int] = field(default_factory=list)
    trainable: list[bool] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    is_bos: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, token_ids: list[int], trainable: bool, turn: int, is_bos: bool = False) -> None:
        self.ids += token_ids
        self.trainable += [trainable] * len(token_ids)
        self.turns += [turn] * len(token_ids)
        self.is_bos += [is_bos] * len(token_ids)

    def head(self, n: int) -> "TokenizedConversation":
        return TokenizedConversation(self.ids[:n], self.trainable[:n], self.turns[:n], self.is_bos[:n])


def tokenize_segments(segments: list[Segment], tokenizer) -> TokenizedConversation:
    """Token ids of the segments, each token attributed to the segment its text came from.

    Special segments become the tokenizer's BOS / EOS ids. A run of text segments is encoded in
    one call; to find where each segment's tokens start, every prefix of the run is encoded too,
    and the segment boundary is where the prefix's tokens stop agreeing with the whole run's. When
    a token straddles a boundary (a merge across it: a prompt ending "the trai" and a reply starting
    "ning" give the piece "raining"), it goes to the later segment, so a reply is never missing its
    first characters from the loss. (LLaMA's templates put a space or a special token at every
    boundary, and SentencePiece never merges across a space, so this is rare in practice.)
    """
    out = TokenizedConversation()
    run: list[Segment] = []

    def flush():
        if run:
            _tokenize_text_run(run, tokenizer, out)
            run.clear()

    for segment in _merge_neighbours(segments):
        if segment.special is None:
            run.append(segment)
            continue
        flush()
        if segment.special not in ("bos", "eos"):
            raise ValueError(f"unknown special segment {segment.special!r} (expected 'bos' or 'eos')")
        token_id = tokenizer.bos_id if segment.special == "bos" else tokenizer.eos_id
        if token_id is None:
            raise ValueError(f"{tokenizer.path}: the template needs a {segment.special.upper()} token and this tokenizer has none")
        out.append([token_id], segment.trainable, segment.turn, is_bos=segment.special == "bos")
    flush()
    return out


def _merge_neighbours(segments: list[Segment]) -> list[Segment]:
    """Join adjacent text segments of the same kind: fewer prefixes to encode, same tokens."""
    merged: list[Segment] = []
    for segment in segments:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and segment.special is None
            and previous.special is None
            and (previous.trainable, previous.turn) == (segment.trainable, segment.turn)
        ):
            merged[-1] = Segment(previous.text + segment.text, None, segment.trainable, segment.turn)
        else:
            merged.append(segment)
    return merged


def _tokenize_text_run(run: list[Segment], tokenizer, out: TokenizedConversation) -> None:
    prefixes, text = [], ""
    for segment in run:
        text += segment.text
        prefixes.append(text)
    # One call per prefix: for a handful of short texts this is ~4x faster than encode_batch,
    # whose thread pool costs more than the work (measured with the LLaMA-2 SentencePiece model).
    encoded = [tokenizer.encode(prefix) for prefix in prefixes]
    full = encoded[-1]
    start = 0
    for k, segment in enumerate(run):
        end = len(full) if k == len(run) - 1 else max(start, _common_prefix_length(encoded[k], full))
        out.append(full[start:end], segment.trainable, segment.turn)
        start = end


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    if b[: len(a)] == a:  # the usual case, compared in C
        return len(a)
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# --------------------------------------------------------------------------------------------------
# Conversations -> samples
# --------------------------------------------------------------------------------------------------


def encode_prompt(messages: list[dict], tokenizer, template: str | Template) -> list[int]:
    """Token ids of a conversation ending with a user turn, followed by the assistant's header.

    This is what generation feeds the model. It is tokenised by the same rules as training data, so
    for a conversation [..., user, assistant] the ids of `encode_prompt(conversation[:-1])` are the
    start of `encode_conversation(conversation)["input_ids"]` (barring a merge across the boundary).
    """
    template = get_template(template)
    return tokenize_segments(template.segments(messages, add_generation_prompt=True), tokenizer).ids


def encode_conversation(
    messages: list[dict],
    tokenizer,
    template: str | Template,
    max_length: int | None = None,
    train_on_prompt: bool = False,
    truncation: str = "truncate",
    last_reply_only: bool = False,
) -> dict | None:
    """{"input_ids": [...], "labels": [...]} for one conversation, or None if it is not usable.

    `truncation` applies when the conversation is longer than `max_length` tokens:
      "drop"           the sample is left out (None)
      "truncate"       keep the exchanges that fit and cut the last reply at max_length; an
                       exchange whose prompt does not fit with at least one reply token is dropped
      "truncate_left"  drop the oldest exchanges (keeping the system prompt) until it fits; if
                       even the last exchange alone is too long, cut its reply as "truncate" does
    None is also returned when no token is left to train on. `train_on_prompt=True` trains on
    every token except BOS (useful for data where the prompt is worth learning too);
    `last_reply_only=True` trains only the final reply (the earlier ones are context).
    """
    sample, _ = encode_conversation_with_outcome(
        messages, tokenizer, template, max_length, train_on_prompt, truncation, last_reply_only
    )
    return sample


def encode_conversation_with_outcome(
    messages, tokenizer, template, max_length=None, train_on_prompt=False, truncation="truncate", last_reply_only=False
) -> tuple[dict | None, str]:
    """`encode_conversation` plus what happened: "kept", "truncated", "dropped" or "no_target"."""
    if truncation not in TRUNCATION_STRATEGIES:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_STRATEGIES)}, not {truncation!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, not {max_length}")
    template = get_template(template)

    def tokenize(kept_messages) -> TokenizedConversation:
        segments = template.segments(kept_messages)
        if last_reply_only:
            final = max(s.turn for s in segments)
            segments = [s if s.turn == final else replace(s, trainable=False) for s in segments]
        return tokenize_segments(segments, tokenizer)

    tokens = tokenize(messages)
    outcome = "kept"
    if max_length is not None and len(tokens) > max_length:
        if truncation == "drop":
            return None, "dropped"
        if truncation == "truncate":
            tokens = _cut_right(tokens, max_length)
        else:
            tokens = _drop_oldest_turns(messages, tokenize, max_length)
        outcome = "truncated"
    labels = _shifted_labels(tokens, train_on_prompt)
    if all(label == IGNORE_INDEX for label in labels):
        return None, "no_target"
    return {"input_ids": tokens.ids, "labels": labels}, outcome


def _shifted_labels(tokens: TokenizedConversation, train_on_prompt: bool) -> list[int]:
    """labels[t] = ids[t+1] where token t+1 is a target, else -100; the last position is -100."""
    ids = tokens.ids
    is_target = [t or (train_on_prompt and not b) for t, b in zip(tokens.trainable, tokens.is_bos)]
    return [ids[t + 1] if is_target[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX] * bool(ids)


def _cut_right(tokens: TokenizedConversation, max_length: int) -> TokenizedConversation:
    """The first max_length tokens, backing off to the start of the cut exchange if none of its
    reply made it in (a prompt without its answer teaches nothing and wastes the context)."""
    cut_turn = tokens.turns[max_length]  # the exchange of the first token that does not fit
    kept_reply = any(tokens.trainable[t] and tokens.turns[t] == cut_turn for t in range(max_length))
    if kept_reply:
        return tokens.head(max_length)
    return tokens.head(tokens.turns.index(cut_turn))


def _drop_oldest_turns(messages, tokenize, max_length: int) -> TokenizedConversation:
    """Tokens of the system prompt plus the most recent exchanges that fit in max_length.

    The conversation is re-rendered (`tokenize`) without its oldest exchanges (so llama2 folds the
    system prompt into the new first user turn); the number to drop is found by bisection.
    """
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]  # user, assistant, user, assistant, ...
    n_exchanges = (len(turns) + 1) // 2

    def tokenize_from(first: int) -> TokenizedConversation:
        return tokenize(system + turns[2 * first :])

    low, high = 1, n_exchanges - 1  # answer in [low, high]: high (only the last exchange) always counts
    while low < high:
        middle = (low + high) // 2
        if len(tokenize_from(middle)) <= max_length:
            high = middle
        else:
            low = middle + 1
    tokens = tokenize_from(high)
    return _cut_right(tokens, max_length) if len(tokens) > max_length else tokens


def one_conversation_per_reply(messages: list[dict]) -> list[list[dict]]:
    """The conversation cut after each assistant reply: [..., user1, reply1], [..., reply2], ...

    For templates that write only the final reply with its reasoning (`qwen3`): encoded with
    `last_reply_only=True`, each reply is trained once, as the final reply of the conversation
    so far, with its `<think>` block, exactly as the model writes it at inference, and the earlier
    replies are context without their reasoning, as the model sees them then. The price is that
    the conversation's prefix is encoded (and attended over) once per reply.
    """
    return [messages[: i + 1] for i, message in enumerate(messages) if message["role"] == "assistant"]


# --------------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------------


class SFTDataset(torch.utils.data.Dataset):
    """Encoded samples, stored flat (int32 ids and labels plus offsets) to keep millions cheap.

    `dataset[i]` is {"input_ids": (T,), "labels": (T,)} LongTensors; `lengths[i]` is T, for
    length-grouped batching; `stats` counts what happened while building it.
    """

    def __init__(self, samples, stats: dict | None = None):
        ids, labels, offsets = array("i"), array("i"), [0]
        for sample in samples:
            ids.extend(sample["input_ids"])
            labels.extend(sample["labels"])
            offsets.append(len(ids))
        self._ids = torch.frombuffer(ids, dtype=torch.int32) if ids else torch.zeros(0, dtype=torch.int32)
        self._labels = torch.frombuffer(labels, dtype=torch.int32) if labels else torch.zeros(0, dtype=torch.int32)
        self._buffers = (ids, labels)  # keep the memory torch.frombuffer points to alive
        self._offsets = offsets
        self.lengths = [end - start for start, end in zip(offsets, offsets[1:])]
        self.stats = dict(stats or {})

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict:
        start, end = self._offsets[index], self._offsets[index + 1]
        return {"input_ids": self._ids[start:end].long(), "labels": self._labels[start:end].long()}


def build_sft_dataset(
    files,
    tokenizer,
    template: str | Template,
    *,
    max_length: int | None,
    truncation: str = "truncate",
    train_on_prompt: bool = False,
    format: str = "auto",
    skip_invalid: bool = False,
    reasoning_turns: str = "last",
) -> SFTDataset:
    """Read the files, encode every conversation, and log what was dropped, truncated or skipped.

    `reasoning_turns` matters only for templates that drop earlier replies' reasoning (`qwen3`):
    "last" encodes each conversation once, as the template renders it (every reply trained, only
    the final one with its think block); "every" makes one sample per reply, each trained with
    its reasoning (`one_conversation_per_reply`). Outcomes are then counted per sample.
    """
    if reasoning_turns not in REASONING_TURNS:
        raise ValueError(f"reasoning_turns must be one of {', '.join(REASONING_TURNS)}, not {reasoning_turns!r}")
    template = get_template(template)
    per_reply = reasoning_turns == "every" and template.drops_earlier_reasoning
    stats: dict = {}
    conversations = read_conversations(files, format=format, skip_invalid=skip_invalid, stats=stats)
    for key in ("kept", "truncated", "dropped", "no_target", "tokens", "target_tokens"):
        stats[key] = 0
    samples = []
    for conversation in conversations:
        for messages in one_conversation_per_reply(conversation) if per_reply else [conversation]:
            sample, outcome = encode_conversation_with_outcome(
                messages, tokenizer, template, max_length, train_on_prompt, truncation, last_reply_only=per_reply
            )
            stats[outcome] += 1
            if sample is not None:
                samples.append(sample)
                stats["tokens"] += len(sample["input_ids"])
                stats["target_tokens"] += sum(label != IGNORE_INDEX for label in sample["labels"])
    stats["samples"] = len(samples)
    log.info(
        "SFT data (%s template): %d records (%d invalid skipped) -> %d conversations -> %d samples; "
        "%d truncated, %d dropped as longer than %s tokens, %d skipped with no token to train on; "
        "%d tokens, %d of them targets",
        template.name, stats["records"], stats["invalid"], stats["conversations"], stats["samples"],
        stats["truncated"], stats["dropped"], max_length, stats["no_target"], stats["tokens"], stats["target_tokens"],
    )
    return SFTDataset(samples, stats)


# --------------------------------------------------------------------------------------------------
# Batches: packing
# --------------------------------------------------------------------------------------------------


def plan_packing(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Bins of sample indices, each bin's total length <= seq_len: best-fit decreasing.

    Longest first, each into the open bin with the least room that still fits it (or a new bin).
    Conversations are never split: a reply cut from its prompt would be trained without context.
    Open bins are kept by remaining room, so finding the best fit is a bisection over at most
    seq_len distinct room values.
    """
    too_long = [i for i, n in enumerate(lengths) if n > seq_len]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"sample {i} has {lengths[i]} tokens, more than seq_len {seq_len} ({len(too_long)} such samples); "
            "encode with max_length <= seq_len"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct room values of open bins
    bins_with_room: dict[int, list[int]] = defaultdict(list)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            b = bins_with_room[room].pop()
            if not bins_with_room[room]:
                rooms.pop(k)
        else:
            room, b = seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        room -= n
        if room > 0:
            if not bins_with_room[room]:
                bisect.insort(rooms, room)
            bins_with_room[room].append(b)
    return bins


def make_packed_block(samples: list[dict], seq_len: int, pad_id: int = 0) -> dict:
    """Several samples in one row of seq_len tokens, as pretraining packs documents.

    position_ids restart at 0 for each conversation and document_ids (0, 1, 2, ... in the block)
    make `Llama` attend only within a conversation, so each is computed exactly as if alone.
    Padding at the end has document id -1 and labels -100. No label crosses a boundary: the last
    label of every sample is already -100.
    """
    input_ids = torch.full((seq_len,), pad_id, dtype=torch.long)  # (T,)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)  # (T,)
    position_ids = torch.zeros(seq_len, dtype=torch.long)  # (T,)
    document_ids = torch.full((seq_len,), -1, dtype=torch.long)  # (T,)
    start = 0
    for document, sample in enumerate(samples):
        n = len(sample["input_ids"])
        if start + n > seq_len:
            raise ValueError(f"samples of {start + n} tokens do not fit in seq_len {seq_len}")
        input_ids[start : start + n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[start : start + n] = torch.as_tensor(sample["labels"], dtype=torch.long)
        position_ids[start : start + n] = torch.arange(n)
        document_ids[start : start + n] = document
        start += n
    position_ids[start:] = torch.arange(seq_len - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "document_ids": document_ids}


def pack_conversations(samples, seq_len: int, pad_id: int = 0) -> list[dict]:
    """Encoded samples -> packed blocks (dicts of (seq_len,) LongTensors), see `plan_packing`."""
    samples = list(samples)
    bins = plan_packing([len(s["input_ids"]) for s in samples], seq_len)
    return [make_packed_block([samples[i] for i in b], seq_len, pad_id) for b in bins]


class PackedSFTDataset(torch.utils.data.Dataset):
    """Packed blocks over an `SFTDataset` (or a list of samples); blocks are built on access.

    `stats["fill"]` is the fraction of real (non-padding) tokens, the figure packing is for.
    """

    def __init__(self, samples, seq_len: int, pad_id: int = 0):
        self.samples = samples
        self.seq_len = seq_len
        self.pad_id = pad_id
        lengths = samples.lengths if hasattr(samples, "lengths") else [len(s["input_ids"]) for s in samples]
        self.bins = plan_packing(lengths, seq_len)
        n_tokens = sum(lengths)
        self.stats = {
            "samples": len(lengths),
            "blocks": len(self.bins),
            "fill": n_tokens / (len(self.bins) * seq_len) if self.bins else 0.0,
        }

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict:
        return make_packed_block([self.samples[i] for i in self.bins[index]], self.seq_len, self.pad_id)
