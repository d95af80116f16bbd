"""SFT data sets in the formats they are published in -> conversations, one shape for all.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`:
an optional system message first, then user and assistant turns alternating, starting with the
user and ending with the assistant (a trailing user message has no reply to learn from and is
dropped). Everything downstream (chat templates, tokenisation, masking) sees only this shape, so
adding a data format is one reader function here and one line in `READERS`.

Formats (one JSON record each, in `.jsonl` or a `.json` array):

  messages  OpenAI: {"messages": [{"role": "user", "content": "..."}, ...]}
  sharegpt  ShareGPT / BELLE multi-turn: {"conversations": [{"from": "human", "value": "..."},
            {"from": "gpt", "value": "..."}], "system": optional}; `from` is human/user, gpt/assistant
            or system
  alpaca    Stanford Alpaca / BELLE single-turn: {"instruction", "input" (optional), "output",
            "history": optional [[question, answer], ...] of earlier turns, "system": optional};
            the user turn is the instruction, then a newline and the input when there is one
  panda     PandaLLM: {"input": "...", "target": "..."}
  tcm_qg    the TCM question-generation seed set: {"id", "text", "annotations": [{"Q", "A"}, ...],
            "source"}; ONE conversation per annotation: the user gives the document and the answer
            (worded by `TCM_QG_INSTRUCTION`), the assistant replies with the question

`read_conversations` detects the format of each file from its first record (or takes the one
named) and reports a bad record as `file:line: what is wrong`, or, with `skip_invalid=True`,
skips it and counts it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .records import DataError, expand_files, iter_json_records, iter_jsonl_values, reject_record

log = logging.getLogger("nanotune")

ROLES = ("system", "user", "assistant")

# The user turn of a TCM question-generation example. The task is "document + answer -> question",
# so the instruction says so in the language of the data ("From the passage and the answer below,
# ask a question. Passage: ... Answer: ..."). Changing it changes what the model is trained to
# follow: keep training and evaluation on the same wording.
TCM_QG_INSTRUCTION = "根据下面的文章和答案，提出一个问题。\n文章：{text}\n答案：{answer}"

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# --------------------------------------------------------------------------------------------------
# Checking a conversation
# --------------------------------------------------------------------------------------------------


def check_conversation(messages: list[dict], *, allow_final_user: bool = False) -> None:
    """Raise `DataError` (no file/line: the caller adds it) unless `messages` is a valid conversation.

    Valid: an optional system message first, then user / assistant alternating, starting with a
    user turn, with at least one assistant turn and non-empty text in every message. With
    `allow_final_user` (a prompt for generation) it may end with a user turn and need no reply.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError("the conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"message {i}: expected an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"message {i}: unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise DataError(f"message {i} ({role}): content must be a string, not {type(content).__name__}")
        if not content.strip():
            raise DataError(f"message {i} ({role}): empty content")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            index = i + (len(messages) - len(turns))
            raise DataError(
                f"message {index}: roles out of order: expected {expected!r}, got {message['role']!r} "
                "(a conversation is [system], user, assistant, user, assistant, ...)"
            )
    if not allow_final_user and not any(m["role"] == "assistant" for m in turns):
        raise DataError("the conversation has no assistant turn (nothing to learn from)")
    if not allow_final_user and turns[-1]["role"] != "assistant":
        raise DataError("the conversation ends with a user turn")


def _finish(messages: list[dict]) -> list[dict]:
    """Drop empty system prompts and an unanswered final user turn, then check the result."""
    messages = [m for m in messages if not (m.get("role") == "system" and isinstance(m.get("content"), str) and not m["content"].strip())]
    if len(messages) >= 2 and messages[-1].get("role") == "user" and messages[-2].get("role") == "assistant":
        messages = messages[:-1]  # common in ShareGPT dumps: the last question was never answered
    check_conversation(messages)
    return messages


def _field(record: dict, key: str, *, required: bool = True, where: str = "") -> object:
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"field {where}{key!r} is missing")
        return None
    return record[key]


def _text(record: dict, key: str, *, required: bool = True, where: str = "") -> str:
    value = _field(record, key, required=required, where=where)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"field {where}{key!r} must be a string, not {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------------
# One reader per format: record -> list of conversations
# --------------------------------------------------------------------------------------------------


def read_messages_record(record: dict) -> list[list[dict]]:
    messages = _field(record, "messages")
    if not isinstance(messages, list):
        raise DataError("field 'messages' must be a list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"field 'messages'[{i}] must be an object with 'role' and 'content'")
        if "role" not in message:
            raise DataError(f"field 'messages'[{i}].role is missing")
        if "content" not in message or message["content"] is None:
            raise DataError(f"field 'messages'[{i}].content is missing")
    return [_finish([{"role": m["role"], "content": m["content"]} for m in messages])]


def read_sharegpt_record(record: dict) -> list[list[dict]]:
    turns = _field(record, "conversations")
    if not isinstance(turns, list):
        raise DataError("field 'conversations' must be a list of {from, value} objects")
    messages = []
    system = _text(record, "system", required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"field 'conversations'[{i}] must be an object with 'from' and 'value'")
        speaker = _text(turn, "from", where=f"'conversations'[{i}].")
        if speaker.lower() not in SHAREGPT_ROLES:
            raise DataError(
                f"field 'conversations'[{i}].from: unknown role {speaker!r} "
                f"(expected one of {', '.join(SHAREGPT_ROLES)})"
            )
        messages.append({"role": SHAREGPT_ROLES[speaker.lower()], "content": _text(turn, "value", where=f"'conversations'[{i}].")})
    return [_finish(messages)]


def read_alpaca_record(record: dict) -> list[list[dict]]:
    messages = []
    system = _text(record, "system", required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = _field(record, "history", required=False) or []
    if not isinstance(history, list):
        raise DataError("field 'history' must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"field 'history'[{i}] must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _text(record, "instruction")
    extra_input = _text(record, "input", required=False)
    user = f"{instruction}\n{extra_input}" if extra_input.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "output")}]
    return [_finish(messages)]


def read_panda_record(record: dict) -> list[list[dict]]:
    return [_finish([
        {"role": "user", "content": _text(record, "input")},
        {"role": "assistant", "content": _text(record, "target")},
    ])]


def read_tcm_qg_record(record: dict) -> list[list[dict]]:
    text = _text(record, "text")
    if not text.strip():
        raise DataError("field 'text' is empty")
    annotations = _field(record, "annotations")
    if not isinstance(annotations, list) or not annotations:
        raise DataError("field 'annotations' must be a non-empty list of {Q, A} objects")
    conversations = []
    for i, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise DataError(f"field 'annotations'[{i}] must be an object with 'Q' and 'A'")
        question = _text(annotation, "Q", where=f"'annotations'[{i}].")
        answer = _text(annotation, "A", where=f"'annotations'[{i}].")
        for key, value in (("A", answer), ("Q", question)):
            if not value.strip():
                raise DataError(f"field 'annotations'[{i}].{key} is empty")
        user = TCM_QG_INSTRUCTION.format(text=text.strip(), answer=answer.strip())
        conversations.append(_finish([{"role": "user", "content": user}, {"role": "assistant", "content": question.strip()}]))
    return conversations


READERS = {
    "messages": read_messages_record,
    "sharegpt": read_sharegpt_record,
    "alpaca": read_alpaca_record,
    "panda": read_panda_record,
    "tcm_qg": read_tcm_qg_record,
}


def detect_format(record: object) -> str:
    """The format of one record, from the keys it has (see the module docstring)."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys and "annotations" in keys:
        return "tcm_qg"
    if "input" in keys and "target" in keys:
        return "panda"
    raise DataError(
        f"cannot tell the format from the keys {sorted(keys)}; expected 'messages', 'conversations', "
        "'instruction'+'output', 'text'+'annotations' or 'input'+'target' (or name the format)"
    )


def record_to_conversations(record: object, format: str) -> list[list[dict]]:
    """The conversations in one record (one for most formats, one per annotation for tcm_qg)."""
    if format not in READERS:
        raise ValueError(f"unknown data format {format!r}; expected one of {', '.join(READERS)}")
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    return READERS[format](record)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def iter_conversation_records(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    format: str = "auto",
    skip_invalid: bool = False,
    stats: dict | None = None,
) -> Iterator[tuple[Path, int, list[list[dict]]]]:
    """(file, line, conversations of that record) for every valid record of every file.

    Records are kept together (not flattened) so that a train/dev split by record keeps all the
    questions about one document on the same side. `stats`, if given, receives the counts
    `records`, `invalid` and `conversations`.
    """
    if format != "auto" and format not in READERS:
        raise ValueError(f"unknown data format {format!r}; expected auto or one of {', '.join(READERS)}")
    stats = stats if stats is not None else {}
    for key in ("records", "invalid", "conversations"):
        stats.setdefault(key, 0)
    for path in expand_files(paths):
        if path.suffix not in (".jsonl", ".json"):
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; conversations come in .jsonl or .json")
        file_format = None if format == "auto" else format
        for line, record, error in _iter_records(path, skip_invalid):
            stats["records"] += 1
            try:
                if error is not None:
                    raise DataError(error)
                if file_format is None:
                    file_format = detect_format(record)
                conversations = record_to_conversations(record, file_format)
            except DataError as error:
                reject_record(f"{path}:{line}", error, skip_invalid, stats)
                continue
            stats["conversations"] += len(conversations)
            yield path, line, conversations


def _iter_records(path: Path, skip_invalid: bool) -> Iterator[tuple[int, object, str | None]]:
    """(line, record, None), or (line, None, error) for a line that is not JSON (or not UTF-8) when skipping.

    `iter_json_records` stops at the first bad line; with `skip_invalid` a `.jsonl` file is read
    line by line here instead, so that one broken line costs one record, not the rest of the file.
    """
    if not (skip_invalid and path.suffix == ".jsonl"):
        for line, record in iter_json_records(path):
            yield line, record, None
        return
    yield from iter_jsonl_values(path)


def read_conversations(
    path_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
    format: str = "auto",
    skip_invalid: bool = False,
    stats: dict | None = None,
) -> list[list[dict]]:
    """Every conversation in the files (paths or globs), in file order.

    `format="auto"` detects each file's format from its first record. A bad record raises
    `DataError("file:line: ...")`, or with `skip_invalid=True` is skipped, counted in
    `stats["invalid"]` and logged on the "nanotune" log.
    """
    stats = stats if stats is not None else {}
    conversations = []
    for _, _, record_conversations in iter_conversation_records(path_or_paths, format, skip_invalid, stats):
        conversations.extend(record_conversations)
    if stats.get("invalid"):
        log.warning("skipped %d invalid records of %d", stats["invalid"], stats["records"])
    return conversations
