"""What every command-line entry point shares: logging set-up and one-line errors for bad input.

A user who mistypes a key or points at a broken file should read one line that names the file,
line or key, not a traceback through the library. Errors that are bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError
from .data.records import DataError, os_error_line
from .run_log import TrainingDiverged
from .tokenizer import TokenizerError

# A path the user gave that the system refuses (no such file, a folder where a file was meant,
# no permission) is a user error too; other OSErrors (a full disk, I/O errors) keep their traceback.
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError, TrainingDiverged) + PATH_ERRORS


def setup_logging() -> None:
    """INFO on rank 0, warnings only on the other ranks (so 8 GPUs do not print everything 8 times)."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None):
    """Call `main(argv)` and return what it returns; a user error becomes `error: <message>` on
    stderr and exit status 2 (argparse's own errors already exit with 2)."""
    try:
        return main(argv)
    except USER_ERRORS as error:
        print(f"error: {user_error_text(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: what was being written has been removed on the way out
        print("interrupted: stopped; the checkpoints written so far are kept (resume with "
              "--checkpoint.resume=true where the run saved any)", file=sys.stderr)
        sys.exit(130)


def user_error_text(error: BaseException) -> str:
    """One line: our errors' messages as they are, an OSError as `path: reason`."""
    if isinstance(error, OSError):
        return os_error_line(error)
    return " ".join(str(error).split("\n"))


# -- argparse helpers for the tools' flags -------------------------------------------------------


def at_least(minimum: int | float, kind: type = int) -> Callable[[str], int | float]:
    """An argparse `type` that reads a number and refuses one below `minimum`
    (`--batch-size 0` -> "argument --batch-size: must be >= 1, not 0")."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}") from None
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {text}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse `type` for a number > 0 (`--repetition-penalty`)."""
    value = at_least(0.0, float)(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def probability(text: str) -> float:
    """An argparse `type` for a number in (0, 1] (`--top-p`)."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {text}")
    return value


def resolve_device(parser: argparse.ArgumentParser, device: str | None) -> str:
    """`--device`: default cuda when there is one, else cpu; cuda without CUDA is a usage error."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device is available (use --device cpu)")
    if not (device == "cpu" or device.startswith("cuda")):
        parser.error(f"--device {device}: expected cpu, cuda or cuda:N")
    return device


def check_model_folder(path: str | os.PathLike) -> None:
    """A folder to load as a whole model: refuse a LoRA adapter folder with what to do instead
    (the generic "no config.json" would leave the user guessing)."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        raise CheckpointError(
            f"{path}: a LoRA adapter folder (adapter_config.json), not a model; give it as --adapter {path} "
            f"(with --model BASE), or merge it into its base first "
            f"(python merge.py lora --base BASE --adapter {path} --out MERGED) and give MERGED"
        )
