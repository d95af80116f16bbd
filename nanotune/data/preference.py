"""Preference pairs: a prompt with a chosen and a rejected reply, read, encoded and batched.

Every record, whatever its source, becomes one `PreferencePair`: a prompt (a conversation of one
or more turns ending with a user turn, with an optional system message) and two replies to it.
The readers, by the keys of a record:

  trl          TRL's {"prompt", "chosen", "rejected"}: strings, or message lists; without "prompt",
               chosen and rejected are whole conversations sharing every message but the last
               (the implicit-prompt form). This is also nanotune's canonical form (message lists,
               written by `python -m nanotune.data.convert_preference`), which TRL reads as it is.
  alpaca       LLaMA-Factory's ranking data in Alpaca form: {"instruction", "input", "chosen",
               "rejected", "system"?, "history"?}
  sharegpt     LLaMA-Factory's ranking data in ShareGPT form and MedicalGPT's: {"conversations",
               "chosen", "rejected", "system"?}, chosen/rejected a {from, value} message or a string
  medicalgpt   MedicalGPT's older form: {"system", "history", "question", "response_chosen",
               "response_rejected"}
  qa_lines     text lines `问题 正确答案：... 错误答案：...` (a question, its correct answer, a wrong one)

A bad record is `file:line: what is wrong` (or, with `skip_invalid`, skipped and counted).

Encoding (`encode_pair`) lays prompt + reply out with the chat template as ONE text, as at
inference, for each reply. The prompt's tokens (the generation prompt, `encode_prompt`) must be the
first tokens of both encodings: where a template makes them differ (a token merging across the
boundary, or a template that writes the prompt differently for different replies), the record is
refused, naming it, rather than trained on two different prompts. Only the reply and its
end-of-turn token are trained; anything the template writes after that token (ChatML's newline)
is dropped, so a sequence's last token is its end of turn, where a reward model reads its score.

Batches (`PreferenceCollator`), with labels shifted once, as for SFT, and every pair k contributing
sequence 2k (chosen) and 2k+1 (rejected):
  padded   one row per sequence, right-padded: [chosen 0, rejected 0, chosen 1, ...]
  packed   whole pairs packed into rows of 2 * max_length tokens, each sequence its own document
           (block-diagonal attention); no pair is ever split between rows
  shared   as packed, but each pair is [prompt minus its last token, last prompt token + chosen,
           last prompt token + rejected]: the prompt is computed once, both replies attend to it
           and to themselves only (`shared_prefix_mask`), and their positions continue from it.
           The last prompt token is repeated in each reply's branch because its hidden state
           predicts the reply's first token, which differs between the two.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nanotune.data.formats import SHAREGPT_ROLES, check_conversation
from nanotune.data.records import (DataError, expand_files, iter_json_records, iter_jsonl_values, iter_text_lines,
                                   reject_record)
from nanotune.data.sft import encode_prompt, plan_packing, tokenize_segments
from nanotune.data.templates import Template, get_template
from nanotune.loss import IGNORE_INDEX

logger = logging.getLogger("nanotune")

TRUNCATION_STRATEGIES = ("drop", "truncate", "truncate_left")
LAYOUTS = ("padded", "packed", "shared")


@dataclass
class PreferencePair:
    """prompt: messages ending with a user turn; chosen, rejected: the two assistant replies.
    margin: how much better chosen is (reward models may use it; None = not given)."""

    prompt: list[dict]
    chosen: str
    rejected: str
    margin: float | None = None

    def check(self) -> "PreferencePair":
        """Raise DataError unless this is a usable pair (the caller adds the file and line)."""
        check_conversation(self.prompt, allow_final_user=True)
        if self.prompt[-1]["role"] != "user":
            raise DataError("the prompt must end with a user turn (the one both replies answer)")
        for name in ("chosen", "rejected"):
            reply = getattr(self, name)
            if not isinstance(reply, str):
                raise DataError(f"field {name!r} must be a string or an assistant message, not {type(reply).__name__}")
            if not reply.strip():
                raise DataError(f"field {name!r} is empty")
        if self.chosen == self.rejected:
            raise DataError("chosen and rejected are the same reply (nothing to prefer)")
        if self.margin is not None and not isinstance(self.margin, (int, float)):
            raise DataError(f"field 'margin' must be a number, not {type(self.margin).__name__}")
        return self

    def to_record(self) -> dict:
        """The canonical form: TRL's conversational preference record with an explicit prompt."""
        record = {"prompt": self.prompt, "chosen": [{"role": "assistant", "content": self.chosen}],
                  "rejected": [{"role": "assistant", "content": self.rejected}]}
        if self.margin is not None:
            record["margin"] = self.margin
        return record


# --------------------------------------------------------------------------------------------------
# Readers: record -> PreferencePair
# --------------------------------------------------------------------------------------------------


def _string(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise DataError(f"field {key!r} is missing")
        return ""
    if not isinstance(value, str):
        raise DataError(f"field {key!r} must be a string, not {type(value).__name__}")
    return value


def _messages(value, key: str) -> list[dict]:
    """A {role, content} (or ShareGPT {from, value}) message list, checked message by message."""
    if not isinstance(value, list):
        raise DataError(f"field {key!r} must be a string or a list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"field {key!r}[{i}] must be an object with 'role' and 'content'")
        role = message.get("role", SHAREGPT_ROLES.get(str(message.get("from", "")).lower()))
        content = message.get("content", message.get("value"))
        if role is None or content is None:
            raise DataError(f"field {key!r}[{i}]: expected 'role' and 'content' (or 'from' and 'value')")
        messages.append({"role": role, "content": content})
    return messages


def _reply(value, key: str) -> str:
    """A reply given as a string, one assistant message, or a list of exactly one."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    messages = _messages(value, key)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"field {key!r} must be one assistant reply (a string or one assistant message)")
    return messages[0]["content"]


def _with_system(system: str, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def _history(record: dict) -> list[dict]:
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError("field 'history' must be a list of [question, answer] pairs")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"field 'history'[{i}] must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def read_trl_record(record: dict) -> PreferencePair:
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise DataError(f"field {key!r} is missing")
    if record.get("prompt") is None:  # implicit prompt: two whole conversations sharing a prefix
        chosen, rejected = _messages(record["chosen"], "chosen"), _messages(record["rejected"], "rejected")
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            raise DataError("without a 'prompt', 'chosen' and 'rejected' must be conversations that share "
                            "every message but their last (the implicit-prompt form)")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise DataError("the last message of 'chosen' and of 'rejected' must be the assistant's reply")
        return PreferencePair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], record.get("margin"))
    prompt = record["prompt"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
    return PreferencePair(prompt, _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected"),
                          record.get("margin"))


def read_alpaca_record(record: dict) -> PreferencePair:
    instruction, extra = _string(record, "instruction"), _string(record, "input", required=False)
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    prompt = _with_system(_string(record, "system", required=False), _history(record) + [{"role": "user", "content": user}])
    return PreferencePair(prompt, _reply(record.get("chosen"), "chosen"), _reply(record.get("rejected"), "rejected"))


def read_sharegpt_record(record: dict) -> PreferencePair:
    if record.get("conversations") is None:
        raise DataError("field 'conversations' is missing")
    prompt = _with_system(_string(record, "system", required=False), _messages(record["conversations"], "conversations"))
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise DataError(f"field {key!r} is missing")
    return PreferencePair(prompt, _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected"))


def read_medicalgpt_record(record: dict) -> PreferencePair:
    prompt = _history(record) + [{"role": "user", "content": _string(record, "question")}]
    return PreferencePair(_with_system(_string(record, "system", required=False), prompt),
                          _string(record, "response_chosen"), _string(record, "response_rejected"))


QA_LINE = re.compile(r"^(?P<question>.+?)\s*正确答案[:：]\s*(?P<chosen>.+?)\s*错误答案[:：]\s*(?P<rejected>.+?)\s*$")


def read_qa_line(line: str) -> PreferencePair:
    """`问题 正确答案：A 错误答案：B` -> the question as the prompt, A chosen, B rejected."""
    match = QA_LINE.match(line)
    if match is None:
        raise DataError("expected `question 正确答案：correct answer 错误答案：wrong answer`")
    return PreferencePair([{"role": "user", "content": match["question"]}], match["chosen"], match["rejected"])


READERS = {
    "trl": read_trl_record,
    "alpaca": read_alpaca_record,
    "sharegpt": read_sharegpt_record,
    "medicalgpt": read_medicalgpt_record,
    "qa_lines": read_qa_line,
}


def detect_format(record: object) -> str:
    """The format of one JSON record, from its keys (see the module docstring)."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if "response_chosen" in keys:
        return "medicalgpt"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    if "chosen" in keys and "rejected" in keys:
        return "trl"
    raise DataError(
        f"cannot tell the preference format from the keys {sorted(keys)}; expected 'prompt'/'chosen'/'rejected', "
        "'instruction'+'chosen', 'conversations'+'chosen' or 'question'+'response_chosen' (or name the format)"
    )


def iter_preference_records(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    format: str = "auto",
    skip_invalid: bool = False,
    stats: dict | None = None,
) -> Iterator[tuple[Path, int, PreferencePair]]:
    """(file, line, pair) for every valid record of every file (.jsonl, .json, or .txt of qa_lines)."""
    if format != "auto" and format not in READERS:
        raise ValueError(f"unknown preference format {format!r}; expected auto or one of {', '.join(READERS)}")
    stats = stats if stats is not None else {}
    for key in ("records", "invalid"):
        stats.setdefault(key, 0)
    for path in expand_files(paths):
        for line, record, problem, file_format in _records_of_file(path, format, skip_invalid):
            stats["records"] += 1
            try:
                if problem is not None:
                    raise DataError(problem)
                reader = READERS[file_format or detect_format(record)]
                if reader is not read_qa_line and not isinstance(record, dict):
                    raise DataError(f"expected a JSON object, got {type(record).__name__}")
                pair = reader(record).check()
            except DataError as error:
                reject_record(f"{path}:{line}", error, skip_invalid, stats)
                continue
            yield path, line, pair


def _records_of_file(path: Path, format: str, skip_invalid: bool):
    """(line, record, problem, format) of one file; a .txt file is qa_lines, one record per line."""
    if path.suffix == ".txt":
        for line, text, problem in iter_text_lines(path):
            if problem is None and not text.strip():
                continue
            yield line, text, problem, "qa_lines"
        return
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; preference data is .jsonl, .json or .txt")
    file_format = None if format == "auto" else format
    values = iter_jsonl_values(path) if skip_invalid and path.suffix == ".jsonl" else (
        (line, record, None) for line, record in iter_json_records(path))
    for line, record, problem in values:
        if file_format is None and problem is None:
            try:
                file_format = detect_format(record)
            except DataError as error:
                yield line, record, str(error), None
                continue
        yield line, record, problem, file_format


def read_preference_pairs(paths, format: str = "auto", skip_invalid: bool = False, stats: dict | None = None):
    """Every pair of the files, in file order, with the (file, line) each came from."""
    return [(f"{path}:{line}", pair) for path, line, pair in iter_preference_records(paths, format, skip_invalid, stats)]


# --------------------------------------------------------------------------------------------------
# Encoding: a pair -> prompt ids + two reply ids
# --------------------------------------------------------------------------------------------------


def encode_reply(prompt: list[dict], reply: str, tokenizer, template: Template) -> tuple[list[int], list[int]]:
    """(ids of prompt + reply as one text, up to the reply's end of turn; how many are trained).

    Earlier replies inside a multi-turn prompt are context: only the final reply is trained.
    """
    segments = template.segments(prompt + [{"role": "assistant", "content": reply}])
    final = max(s.turn for s in segments)
    tokens = tokenize_segments(segments, tokenizer)
    trained = [t and turn == final for t, turn in zip(tokens.trainable, tokens.turns)]
    if not any(trained):
        raise DataError("the template leaves no token of the reply to train")
    end = len(trained) - trained[::-1].index(True)  # just after the last trained token
    return tokens.ids[:end], trained[:end]


def encode_pair(pair: PreferencePair, tokenizer, template: str | Template, max_length: int | None = None,
                truncation: str = "truncate") -> tuple[dict | None, str]:
    """({"prompt", "chosen", "rejected"} token ids (+ "margin"), outcome), outcome kept / truncated / dropped.

    Raises DataError when the prompt's own tokens are not the first tokens of prompt + chosen and of
    prompt + rejected (the caller names the record).
    `truncation` when prompt + the longer reply exceeds `max_length`:
      "drop"           the pair is left out (None)
      "truncate"       the prompt is cut from the left first (a leading BOS is kept), down to what
                       leaves the longer reply room (but to no less than half of max_length),
                       then the replies are cut at the right
      "truncate_left"  the oldest exchanges of the prompt are dropped first (the system prompt
                       kept), then as "truncate"
    """
    if truncation not in TRUNCATION_STRATEGIES:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_STRATEGIES)}, not {truncation!r}")
    template = get_template(template)
    prompt_ids, chosen, rejected = _encode_three(pair.prompt, pair, tokenizer, template)
    outcome = "kept"
    if max_length is not None and len(prompt_ids) + max(len(chosen), len(rejected)) > max_length:
        if truncation == "drop":
            return None, "dropped"
        if truncation == "truncate_left":
            prompt_ids, chosen, rejected = _drop_oldest_exchanges(pair, tokenizer, template, max_length)
        longest = max(len(chosen), len(rejected))
        keep = max(max_length - longest, max_length // 2, 1)
        if len(prompt_ids) > keep:
            starts_with_bos = tokenizer.bos_id is not None and prompt_ids[0] == tokenizer.bos_id
            prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep + 1:] if starts_with_bos and keep > 1 \
                else prompt_ids[len(prompt_ids) - keep:]
        room = max_length - len(prompt_ids)
        chosen, rejected = chosen[:room], rejected[:room]
        outcome = "truncated"
    sample = {"prompt": prompt_ids, "chosen": chosen, "rejected": rejected}
    if pair.margin is not None:
        sample["margin"] = float(pair.margin)
    return sample, outcome


def _encode_three(prompt: list[dict], pair: PreferencePair, tokenizer, template: Template):
    """(prompt ids, chosen reply ids, rejected reply ids), the prompt checked to be a prefix of both."""
    prompt_ids = encode_prompt(prompt, tokenizer, template)
    replies = []
    for name in ("chosen", "rejected"):
        ids, trained = encode_reply(prompt, getattr(pair, name), tokenizer, template)
        n = len(prompt_ids)
        if ids[:n] != prompt_ids or any(trained[:n]) or not all(trained[n:]):
            raise DataError(
                f"with the {template.name} template the prompt's tokens are not the first tokens of prompt + "
                f"{name} (a token merges across the boundary, or the template lays the prompt out differently "
                "for this reply); refusing the pair rather than training it on two different prompts"
            )
        replies.append(ids[n:])
    return prompt_ids, replies[0], replies[1]


def _drop_oldest_exchanges(pair: PreferencePair, tokenizer, template: Template, max_length: int):
    """The encoding of the pair without its prompt's oldest exchanges: the fewest dropped that fit."""
    system = pair.prompt[:1] if pair.prompt[0]["role"] == "system" else []
    turns = pair.prompt[len(system):]  # user, assistant, ..., user
    encoded = None
    for first in range(0, len(turns), 2):
        encoded = _encode_three(system + turns[first:], pair, tokenizer, template)
        if len(encoded[0]) + max(len(encoded[1]), len(encoded[2])) <= max_length:
            break
    return encoded


def sequence_of(prompt: list[int], reply: list[int]) -> tuple[list[int], list[int]]:
    """(input ids, shifted labels) of prompt + reply: labels[t] = ids[t + 1] for the reply tokens."""
    return prompt + reply, [IGNORE_INDEX] * (len(prompt) - 1) + reply + [IGNORE_INDEX]


class PreferenceDataset(torch.utils.data.Dataset):
    """Encoded pairs (dicts of id lists, plus "reference_chosen"/"reference_rejected" once
    precomputed); `where[i]` is the file:line pair i came from; `stats` counts what happened."""

    def __init__(self, samples: list[dict], where: list[str] | None = None, stats: dict | None = None):
        self.samples = samples
        self.where = where or [""] * len(samples)
        self.stats = dict(stats or {})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]

    def subset(self, indices) -> "PreferenceDataset":
        indices = sorted(int(i) for i in indices)
        return PreferenceDataset([self.samples[i] for i in indices], [self.where[i] for i in indices], self.stats)


def build_preference_dataset(files, tokenizer, template: str | Template, *, max_length: int | None,
                             truncation: str = "truncate", format: str = "auto",
                             skip_invalid: bool = False) -> PreferenceDataset:
    """Read and encode every pair of the files; log what was truncated, dropped or skipped."""
    template = get_template(template)
    stats: dict = {"kept": 0, "truncated": 0, "dropped": 0}
    samples, where = [], []
    for place, pair in read_preference_pairs(files, format, skip_invalid, stats):
        try:
            sample, outcome = encode_pair(pair, tokenizer, template, max_length, truncation)
        except DataError as error:
            reject_record(place, error, skip_invalid, stats, what="pair")
            continue
        stats[outcome] += 1
        if sample is not None:
            samples.append(sample)
            where.append(place)
    stats["pairs"] = len(samples)
    logger.info("preference data (%s template): %d records (%d invalid skipped) -> %d pairs; %d truncated, "
                "%d dropped as longer than %s tokens", template.name, stats["records"], stats["invalid"],
                len(samples), stats["truncated"], stats["dropped"], max_length)
    return PreferenceDataset(samples, where, stats)


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def pair_length(sample: dict, layout: str) -> int:
    """Tokens the pair takes in a row: both sequences whole, or the prompt once plus two branches."""
    P, C, R = len(sample["prompt"]), len(sample["chosen"]), len(sample["rejected"])
    return P + C + R + 1 if layout == "shared" else 2 * P + C + R


class PackedPairs(torch.utils.data.Dataset):
    """Rows of whole pairs for the packed and shared layouts: item i is {"pairs": [...]}, the
    pairs of row i (best-fit decreasing, `sft.plan_packing`). A row holds `row_length` tokens;
    with 2 * max_length every pair fits."""

    def __init__(self, pairs, row_length: int, layout: str):
        if layout not in ("packed", "shared"):
            raise ValueError(f"PackedPairs packs the packed or shared layout, not {layout!r}")
        self.pairs = pairs
        lengths = [pair_length(pairs[i], layout) for i in range(len(pairs))]
        self.rows = plan_packing(lengths, row_length)
        self.stats = {"pairs": len(lengths), "rows": len(self.rows),
                      "fill": sum(lengths) / (len(self.rows) * row_length) if self.rows else 0.0}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"pairs": [self.pairs[i] for i in sorted(self.rows[index])]}


def without_pairs(item: dict) -> dict:
    """`item` with every pair weighted 0: it adds nothing to the sums (evaluation pads with it)."""
    if "pairs" in item:
        return {"pairs": [{**pair, "weight": 0.0} for pair in item["pairs"]]}
    return {**item, "weight": 0.0}


class PreferenceCollator:
    """Items (pairs, or rows of pairs) -> one batch of tensors in the chosen layout.

    Every layout gives
      input_ids, labels (B, T)   labels shifted, -100 where no reply token follows
      sequence_ids (B, T)        2k for chosen of pair k, 2k+1 for its rejected, -1 elsewhere
      last_token (2P,)           flat index (into B * T) of each sequence's last token (its end of turn)
      pair_weight (P,)           1 for a real pair, 0 for evaluation's padding
      margin (P,), and reference_chosen / reference_rejected (P,) when the pairs carry them
    packed adds document_ids (B, T) (one per sequence, -1 padding); shared adds document_ids (one
    per pair), branch_ids (B, T) (0 prompt, 1 chosen, 2 rejected) and position_ids (B, T).
    """

    def __init__(self, pad_id: int, layout: str = "padded", row_length: int | None = None, pad_to_multiple_of: int = 8):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        if layout != "padded" and not row_length:
            raise ValueError(f"the {layout} layout needs a row_length")
        self.pad_id, self.layout, self.row_length = pad_id, layout, row_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict:
        if self.layout == "padded":
            rows = [[sequence_of(p["prompt"], p[reply])] for p in items for reply in ("chosen", "rejected")]
            pairs = items
        else:
            pairs = [pair for item in items for pair in item["pairs"]]
            rows = [self._row(item["pairs"]) for item in items]
        return self._tensors(rows, pairs)

    def _row(self, pairs: list[dict]) -> list[tuple]:
        """The pieces of one packed row: (ids, labels[, positions, branch]) per sequence or branch."""
        pieces = []
        for pair in pairs:
            if self.layout == "packed":
                pieces += [sequence_of(pair["prompt"], pair["chosen"]), sequence_of(pair["prompt"], pair["rejected"])]
                continue
            prefix, last = pair["prompt"][:-1], pair["prompt"][-1:]
            L = len(prefix)
            pieces.append((prefix, [IGNORE_INDEX] * L, list(range(L)), 0))
            for branch, name in ((1, "chosen"), (2, "rejected")):
                ids, labels = sequence_of(last, pair[name])
                pieces.append((ids, labels, list(range(L, L + len(ids))), branch))
        return pieces

    def _tensors(self, rows: list[list[tuple]], pairs: list[dict]) -> dict:
        longest = max(sum(len(piece[0]) for piece in row) for row in rows)
        if self.layout == "padded":
            T = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        else:
            T = self.row_length
        B, P = len(rows), len(pairs)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        sequence_ids = torch.full((B, T), -1, dtype=torch.long)  # (B, T)
        document_ids = torch.full((B, T), -1, dtype=torch.long)  # (B, T)
        branch_ids = torch.zeros((B, T), dtype=torch.long)  # (B, T)
        position_ids = torch.zeros((B, T), dtype=torch.long)  # (B, T)
        last_token = torch.zeros(2 * P, dtype=torch.long)  # (2P,)
        sequence, document = 0, 0
        for b, row in enumerate(rows):
            start = 0
            for piece in row:
                ids, piece_labels = piece[0], piece[1]
                end = start + len(ids)
                input_ids[b, start:end] = torch.tensor(ids)
                labels[b, start:end] = torch.tensor(piece_labels)
                if self.layout == "shared":
                    _, _, positions, branch = piece
                    position_ids[b, start:end] = torch.tensor(positions)
                    branch_ids[b, start:end] = branch
                    document_ids[b, start:end] = document
                    if branch == 2:  # a pair ends with its rejected branch
                        document += 1
                    if branch == 0:
                        start = end
                        continue
                else:
                    document_ids[b, start:end] = sequence
                sequence_ids[b, start:end] = sequence
                last_token[sequence] = b * T + end - 1
                sequence += 1
                start = end
            position_ids[b, start:] = torch.arange(T - start)
        batch = {"input_ids": input_ids, "labels": labels, "sequence_ids": sequence_ids, "last_token": last_token,
                 "pair_weight": torch.tensor([float(p.get("weight", 1.0)) for p in pairs]),
                 "margin": torch.tensor([float(p.get("margin", 0.0)) for p in pairs])}
        if all("reference_chosen" in p for p in pairs):
            batch["reference_chosen"] = torch.tensor([p["reference_chosen"] for p in pairs], dtype=torch.float32)
            batch["reference_rejected"] = torch.tensor([p["reference_rejected"] for p in pairs], dtype=torch.float32)
        if self.layout == "packed":
            batch["document_ids"] = document_ids
        if self.layout == "shared":
            batch.update(document_ids=document_ids, branch_ids=branch_ids, position_ids=position_ids)
        return batch


def shared_prefix_mask(document_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool for the shared layout: token t sees token s iff s <= t, both belong to the
    same pair, and s is in the pair's prompt or in t's own branch (chosen never sees rejected)."""
    T = document_ids.shape[1]
    same_pair = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    visible_branch = (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])  # (B, T, T)
    return (same_pair & causal & visible_branch).unsqueeze(1)
