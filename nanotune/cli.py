"""What every command-line entry point shares: logging set-up and one-line errors for bad input.

A user who mistypes a key or points at a broken file should read one line that names the file,
line or key, not a traceback through the library. Errors that are bugs keep their traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from .checkpoint import CheckpointError
from .config import ConfigError
from .data.records import DataError
from .tokenizer import TokenizerError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError)


def setup_logging() -> None:
    """INFO on rank 0, warnings only on the other ranks (so 8 GPUs do not print everything 8 times)."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call `main(argv)`; a user error becomes `error: <message>` on stderr and exit status 2."""
    try:
        main(argv)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
