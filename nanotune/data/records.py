"""Reading JSON records with their line numbers, so that a bad record is reported where it is.

Both pretraining (`.jsonl`/`.json` with a text field) and SFT (conversations) read records; both
must say "corpus.jsonl:1234: field 'text' is null", not raise a bare KeyError from deep inside.

* `.jsonl`: one JSON value per line; blank lines are skipped.
* `.json`: a JSON array of records (or a single object); each record's line is where it starts.

Every reader decodes strictly: a line that is not UTF-8, or a JSON string escape that makes a
lone surrogate ("\\ud800", which no UTF-8 text can hold), is `file:line: not valid UTF-8`, and a
UTF-8 byte-order mark at the start of a file is stripped, never read as text.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path


log = logging.getLogger("nanotune")


class DataError(ValueError):
    """Bad input data. The message starts with `file:line:` and names the field."""


def reject_record(where: str, problem: object, skip_invalid: bool, stats: dict, what: str = "record") -> None:
    """What every reader does with a record that fails its checks, called from its `except DataError`.

    Without `skip_invalid`: raise `where: problem`, one line, before anything is trained on. With it:
    count the record in `stats["invalid"]` and warn about the first ten, so that a file with thousands of
    bad records says so without flooding the log (the reader's summary gives the total).
    """
    message = f"{where}: {problem}"
    if not skip_invalid:
        raise DataError(message) from None
    stats["invalid"] = stats.get("invalid", 0) + 1
    if stats["invalid"] <= 10:
        log.warning("skipping invalid %s: %s", what, message)


def expand_files(patterns: Iterable[str | os.PathLike] | str) -> list[Path]:
    """Paths and globs -> sorted, de-duplicated list of files; a pattern matching nothing is an error.

    A folder is not a file: it is reported as "is a directory" (with the glob to write instead),
    never as "not found", and a glob that matches only folders names the pattern.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        pattern = str(pattern)
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern")
            matched_files = [Path(m) for m in matches if Path(m).is_file()]
            if not matched_files:
                raise DataError(f"{pattern}: matches only directories ({matches[0]}, ...), no file")
            files.extend(matched_files)
        else:
            path = Path(pattern)
            if path.is_dir():
                example = path / "*.jsonl"
                raise DataError(f"{path}: is a directory, not a file (to read the files in it, give {example} or similar)")
            if not path.exists():
                raise DataError(f"{path}: file not found")
            if not path.is_file():
                raise DataError(f"{path}: not a regular file")
            files.append(path)
    seen, unique = set(), []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def os_error_line(error: OSError) -> str:
    """`path: reason` for a refused path (no such file, a folder, no permission, a full disk), the
    one line a command-line tool prints instead of a traceback."""
    if error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return str(error)


BOM = "\ufeff"  # a UTF-8 byte-order mark (some editors write it): stripped, never read as text
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # the only way JSON text makes one


def iter_text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text without its line ending, None) for every line of a text file, or
    (line number, None, "not valid UTF-8 (...)") for a line that does not decode.

    Read as bytes and decoded line by line, so a file of any size streams and one bad line is
    reported by its number (the caller decides whether to stop or skip). A BOM is stripped.
    """
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield line_number, None, f"not valid UTF-8 ({error.reason} at byte {error.start})"
                continue
            if line_number == 1:
                text = text.removeprefix(BOM)
            yield line_number, text.rstrip("\r\n"), None


def iter_jsonl_values(path: str | os.PathLike) -> Iterator[tuple[int, object, str | None]]:
    """(line number, value, None) for every non-blank line of a `.jsonl` file, or
    (line number, None, problem) for a line that is not UTF-8, not JSON, or holds a lone surrogate.

    The problem has no `file:line:` prefix; callers that stop raise it with one, callers that
    `skip_invalid` count it and go on (each line is independent of the others).
    """
    for line_number, text, problem in iter_text_lines(path):
        if problem is None and not text.strip():
            continue
        if problem is None:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                problem = f"not valid JSON ({error.msg})"
            else:  # only a \uD8xx escape makes a surrogate: most lines need no walk through the value
                problem = lone_surrogate_problem(value) if _SURROGATE_ESCAPE.search(text) else None
        yield (line_number, None, problem) if problem else (line_number, value, None)


def lone_surrogate_problem(value: object) -> str | None:
    """A JSON escape such as "\\ud800" decodes to half of a UTF-16 surrogate pair: a string no
    UTF-8 can hold, which later crashes the tokenizer. None if `value` holds no such string."""
    found = _find_surrogate(value)
    return None if found is None else f"not valid UTF-8 (a lone surrogate \\u{ord(found):04x} in a JSON string)"


def _find_surrogate(value: object) -> str | None:
    if isinstance(value, str):
        match = _SURROGATE.search(value)
        return match.group() if match else None
    if isinstance(value, dict):
        parts = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        parts = value
    else:
        return None
    for part in parts:
        found = _find_surrogate(part)
        if found is not None:
            return found
    return None


def iter_json_records(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every record of a `.jsonl` or `.json` file.

    A line that is not UTF-8, not JSON, or holds a lone surrogate raises `DataError` naming the
    file and line. A BOM is stripped.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        for line_number, value, problem in iter_jsonl_values(path):
            if problem:
                raise DataError(f"{path}:{line_number}: {problem}")
            yield line_number, value
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({error.reason})") from None
    may_hold_surrogates = _SURROGATE_ESCAPE.search(text) is not None
    for line_number, value in _iter_json_array(path, text):
        problem = lone_surrogate_problem(value) if may_hold_surrogates else None
        if problem:
            raise DataError(f"{path}:{line_number}: {problem}")
        yield line_number, value


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, object]]:
    decoder = json.JSONDecoder()
    position = _skip_whitespace(text, 0)
    if position == len(text):
        return
    if text[position] != "[":  # a single object
        try:
            value, _ = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        yield text.count("\n", 0, position) + 1, value
        return
    position = _skip_whitespace(text, position + 1)
    line, line_counted_to = 1, 0
    while position < len(text) and text[position] != "]":
        line += text.count("\n", line_counted_to, position)
        line_counted_to = position
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        yield line, value
        position = _skip_whitespace(text, position)
        if position < len(text) and text[position] == ",":
            position = _skip_whitespace(text, position + 1)
        elif position < len(text) and text[position] != "]":
            line = text.count("\n", 0, position) + 1
            raise DataError(f"{path}:{line}: expected ',' or ']' between records")
    if position >= len(text):
        raise DataError(f"{path}: the JSON array is not closed (truncated file?)")


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position
