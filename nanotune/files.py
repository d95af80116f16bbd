"""Nothing half-written: every file and folder nanotune writes appears whole or not at all.

A file is written under a temporary name in its own folder (so on the same file system) and then
moved onto its real name with `os.replace`, which is atomic: a reader, or a run killed half-way,
finds the old file or the new one, never a mix. A folder (a model, a checkpoint) is filled under
a new `NAME.tmp-<pid>-<random>` and then moved into place with `replace_folder`.

A file's temporary name is the real name plus `.tmp`, overwritten by the next write; a folder's
is new each time, so no sibling of the destination is ever touched, and a leftover of a killed
process is removed by `remove_stale_temporaries`. Callers create the folder they write into.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
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
    """A new, empty folder beside `path` to fill before `replace_folder` moves it onto `path`.

    Its name, `NAME.tmp-<pid>-<random>`, is new each time: nothing already beside `path` (a
    user's own `NAME.tmp`, another process's folder) is ever touched. One left by a killed
    process is removed later by `remove_stale_temporaries`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-{os.getpid()}-", dir=path.parent))


def replace_folder(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Move a completed folder into place; an old folder there is removed only after the move.

    A folder cannot be renamed onto a non-empty one, so the old folder is first renamed aside
    (to a new `NAME.old-<pid>-<random>`): at every moment one complete folder exists under
    `NAME` or that name, and no other sibling is touched.
    """
    source, destination = Path(source), Path(destination)
    if destination.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{destination.name}.old-{os.getpid()}-", dir=destination.parent))
        os.replace(destination, old)  # onto the new, empty folder
        os.replace(source, destination)
        shutil.rmtree(old)
    else:
        os.replace(source, destination)


STALE_NAME = re.compile(r"^.+\.(?:tmp|old)-(\d+)-[A-Za-z0-9_]+$")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders (`NAME.tmp-<pid>-...`, `NAME.old-<pid>-...`) that processes
    which are no longer running left in `folder` (killed mid-write); return what was removed."""
    folder = Path(folder)
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        match = STALE_NAME.match(entry.name)
        if match and entry.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
