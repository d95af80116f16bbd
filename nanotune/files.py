"""Nothing half-written: every file and folder nanotune writes appears whole or not at all.

A file is written under a temporary name in its own folder (so on the same file system) and then
moved onto its real name with `os.replace`, which is atomic: a reader, or a run killed half-way,
finds the old file or the new one, never a mix. A folder (a model, a checkpoint) is filled under
`NAME.tmp` and then moved into place with `replace_folder`.

The temporary name is the real name plus `.tmp`, so a leftover from a killed run is easy to spot
and is overwritten by the next write. Callers create the folder they write into.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path


def temporary_path(path: str | os.PathLike) -> Path:
    """Where `path` is written before it is renamed: `NAME.tmp` in the same folder."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(temporary)` fills a temporary file beside `path`, which then replaces `path`.

    If `write` fails, the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    temporary = temporary_path(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """`path` holds `text` (UTF-8), written under a temporary name and renamed."""
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_lines_atomically(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """One line per item (a newline added to each), streamed to a temporary file and renamed.

    `lines` may be a generator: a large JSONL file is never held in memory as one string.
    """

    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")

    write_atomically(path, write)


def temporary_folder(path: str | os.PathLike) -> Path:
    """An empty `NAME.tmp` beside the folder `path` (a leftover from a killed run is removed first)."""
    temporary = temporary_path(path)
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    return temporary


def replace_folder(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Move a completed folder into place; an old folder there is removed only after the move.

    A folder cannot be renamed onto a non-empty one, so the old folder is first renamed aside
    (`NAME.old`): at every moment one complete folder exists under `NAME` or `NAME.old`.
    """
    source, destination = Path(source), Path(destination)
    if destination.exists():
        old = destination.with_name(destination.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(destination, old)
        os.replace(source, destination)
        shutil.rmtree(old)
    else:
        os.replace(source, destination)
