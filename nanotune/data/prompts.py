"""Prompts for online RL: JSON/JSONL records read, checked and encoded for sampling.

A record is a prompt plus whatever the reward functions need to score an answer to it:

    {"prompt": "What is 17 + 25?", "answer": "42"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}], "answer": "42"}

`messages` is a conversation that ends with a user turn; a `prompt` string is one user turn. Both
are rendered with the chat template up to the assistant's header (`encode_prompt`), the very text
an SFT'd model learnt to answer. Every other field (`answer`, `passage`, ...) is kept, untouched,
for the rewards (rewards.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .formats import check_conversation
from .records import DataError, expand_files, iter_json_records, reject_record
from .sft import encode_prompt
from .templates import Template

log = logging.getLogger("nanotune")


@dataclass
class PromptRecord:
    """One prompt: what the rewards see (`prompt`, `fields`) and where it came from (`line`)."""

    prompt: str | list[dict]  # the record's own `prompt` string or `messages` list, for the rewards
    messages: list[dict]  # the conversation the template renders
    fields: dict = field(default_factory=dict)  # every other field of the record
    line: str = ""  # "file:line", for error messages
    input_ids: list[int] = field(default_factory=list)  # the rendered prompt, once encoded


def read_prompt_records(files, skip_invalid: bool = False) -> list[PromptRecord]:
    """Every prompt record of `files` (paths or globs), checked; a bad one is one line naming
    file, line and field, or (with `skip_invalid`) skipped and counted."""
    records, stats = [], {"invalid": 0}
    for path in expand_files(files):
        for line_number, value in iter_json_records(path):
            where = f"{path}:{line_number}"
            try:
                records.append(prompt_record(value, where))
            except DataError as error:
                reject_record(where, error, skip_invalid, stats, what="prompt record")
    if stats["invalid"]:
        log.warning("prompt data: %d invalid records skipped (data.skip_invalid = true)", stats["invalid"])
    return records


def prompt_record(value: object, where: str = "") -> PromptRecord:
    """A parsed JSON value -> PromptRecord, or DataError (without file and line: the caller adds them)."""
    if not isinstance(value, dict):
        raise DataError(f"expected an object with 'prompt' or 'messages', got {type(value).__name__}")
    if "messages" in value:
        messages = value["messages"]
        check_conversation(messages, allow_final_user=True)
        if messages[-1]["role"] != "user":
            raise DataError("field 'messages': a prompt ends with a user turn (the reply is what is sampled)")
        prompt = messages
    elif "prompt" in value:
        prompt = value["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError("field 'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": prompt}]
    else:
        raise DataError(f"no 'prompt' or 'messages' field (fields: {', '.join(map(repr, value)) or 'none'})")
    fields = {key: item for key, item in value.items() if key not in ("prompt", "messages")}
    return PromptRecord(prompt=prompt, messages=messages, fields=fields, line=where)


def encode_prompt_records(records: list[PromptRecord], tokenizer, template: Template,
                          max_prompt_length: int) -> list[PromptRecord]:
    """The records whose rendered prompt has at most `max_prompt_length` tokens, encoded; the
    others are dropped (a cut prompt would ask another question) and counted."""
    kept = []
    for record in records:
        record.input_ids = encode_prompt(record.messages, tokenizer, template)
        if len(record.input_ids) <= max_prompt_length:
            kept.append(record)
    if len(kept) < len(records):
        log.warning("prompt data: %d of %d prompts dropped as longer than data.max_prompt_length %d tokens",
                    len(records) - len(kept), len(records), max_prompt_length)
    return kept


def fields_of(records: list[PromptRecord], repeat: int) -> dict[str, list]:
    """The records' extra fields as lists aligned with their completions, each record's values
    `repeat` times in a row (its group): {"answer": [a, a, a, b, b, b]}. A field some records lack is
    None for them."""
    names = sorted({name for record in records for name in record.fields})
    return {name: [record.fields.get(name) for record in records for _ in range(repeat)] for name in names}
