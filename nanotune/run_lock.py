"""One run per output_dir at a time: a lock file holding the running process's PID.

Two runs writing into one folder would interleave their metrics, overwrite each other's config and
race to write `final/`. The first run takes `output_dir/.nanotune.lock` (an exclusive `flock`,
which the kernel drops when the process dies, so a crash leaves no lock that needs removing by
hand) and writes its PID and host into it; a second run finds the lock taken and stops with one
line naming that PID. Where the file system has no `flock` (some network mounts), the PID alone
decides: a lock whose process is gone on this host is stale and taken over.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from .config import ConfigError

log = logging.getLogger("nanotune")

LOCK_FILE = ".nanotune.lock"
_held: dict[Path, object] = {}  # output_dir -> the open lock file, for as long as this process runs there


def lock_output_dir(output_dir: str | os.PathLike) -> None:
    """Take the lock of `output_dir` for this process (again, harmlessly, if it holds it already)."""
    output_dir = Path(output_dir).resolve()
    if output_dir in _held:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(path)
        handle.close()
        raise ConfigError(
            f"{output_dir}: another run is writing into this output_dir (PID {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}); wait for it to finish or choose another output_dir"
        ) from None
    except OSError:  # no flock on this file system: decide by the PID written in the file
        holder = _read_holder(path)
        if holder and _is_alive(holder):
            handle.close()
            raise ConfigError(f"{output_dir}: another run is writing into this output_dir (PID {holder['pid']})") from None
        if holder:
            log.info("%s: taking over the lock of PID %s, which is no longer running", output_dir, holder["pid"])
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    handle.flush()
    _held[output_dir] = handle


def unlock_output_dir(output_dir: str | os.PathLike) -> None:
    """Give the lock back (the end of a run); a no-op if this process does not hold it."""
    handle = _held.pop(Path(output_dir).resolve(), None)
    if handle is not None:
        handle.seek(0)
        handle.truncate()  # the file stays (removing it would race with a run opening it), empty
        handle.close()  # closing drops the flock


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _is_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: we cannot tell, so we do not take its lock
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, KeyError):
        return True
    return True


@atexit.register
def _release_all() -> None:
    for output_dir in list(_held):
        unlock_output_dir(output_dir)
