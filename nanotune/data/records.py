"""Reading JSON records with their line numbers, so that a bad record is reported where it is.

Both pretraining (`.jsonl`/`.json` with a text field) and SFT (conversations) read records; both
must say "corpus.jsonl:1234: field 'text' is null", not raise a bare KeyError from deep inside.

* `.jsonl`: one JSON value per line; blank lines are skipped.
* `.json`: a JSON array of records (or a single object); each record's line is where it starts.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


class DataError(ValueError):
    """Bad input data. The message starts with `file:line:` and names the field."""


def expand_files(patterns: Iterable[str | os.PathLike] | str) -> list[Path]:
    """Paths and globs -> sorted, de-duplicated list of files; a pattern matching nothing is an error."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        pattern = str(pattern)
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern")
            files.extend(Path(m) for m in matches if Path(m).is_file())
        else:
            path = Path(pattern)
            if not path.is_file():
                raise DataError(f"{path}: file not found")
            files.append(path)
    seen, unique = set(), []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def iter_json_records(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every record of a `.jsonl` or `.json` file.

    A line that is not JSON raises `DataError` naming the file and line.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
        return
    text = path.read_text(encoding="utf-8")
    yield from _iter_json_array(path, text)


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
