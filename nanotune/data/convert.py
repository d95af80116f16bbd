"""Convert an SFT data set to nanotune's one format: JSONL of {"messages": [...]}, one per line.

    python -m nanotune.data.convert --format alpaca --input in.json --output out.jsonl \\
        [--dev-size 1000] [--dev-output dev.jsonl] [--skip-invalid]

Converting once up front means every later step (training, evaluation, inspection with `head`)
reads one simple format, and a bad record is found now, with its file and line, not an hour into
a run. With `--dev-size N` the first N *records* go to a dev file (default `<output stem>.dev.jsonl`)
and the rest to the output, as the BELLE recipe splits with head/tail. Splitting by record keeps
all the conversations made from one record (the questions about one TCM document) on one side,
so the dev set never holds a document the model was trained on. Both files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .formats import READERS, iter_conversation_records
from .records import DataError, os_error_line
from ..files import write_lines_atomically


def write_jsonl_atomic(path: Path, conversations: list[list[dict]]) -> None:
    """Write {"messages": ...} lines to a temporary name in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_lines_atomically(path, (json.dumps({"messages": messages}, ensure_ascii=False) for messages in conversations))


def default_dev_path(output: Path) -> Path:
    return output.with_name(output.stem + ".dev.jsonl")


def convert(
    inputs: list[str],
    output: str | os.PathLike,
    format: str = "auto",
    dev_size: int = 0,
    dev_output: str | os.PathLike | None = None,
    skip_invalid: bool = False,
) -> dict:
    """Convert `inputs` (files or globs) and return the counts that the CLI prints."""
    output = Path(output)
    dev_path = Path(dev_output) if dev_output else default_dev_path(output)
    stats: dict = {}
    train, dev = [], []
    for index, (_, _, conversations) in enumerate(iter_conversation_records(inputs, format, skip_invalid, stats)):
        (dev if index < dev_size else train).extend(conversations)
    write_jsonl_atomic(output, train)
    if dev_size > 0:
        write_jsonl_atomic(dev_path, dev)
    stats.update(train_conversations=len(train), dev_conversations=len(dev), output=str(output))
    if dev_size > 0:
        stats["dev_output"] = str(dev_path)
    return stats


def conversion_cli(argv, description: str, readers, input_help: str, convert_function, unit: str) -> int:
    """The command line both converters share (SFT conversations here, preference pairs in
    convert_preference.py): the same options, the same one-line errors before anything is
    written, the same report. `convert_function(inputs, output, format, dev_size, dev_output,
    skip_invalid)` returns the counts, with `train_<unit>` and `dev_<unit>`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--format", default="auto", choices=["auto", *readers], help="input format (default: detect per file)")
    parser.add_argument("--input", required=True, nargs="+", help=input_help)
    parser.add_argument("--output", required=True, help="output .jsonl")
    parser.add_argument("--dev-size", type=int, default=0, help="put the first N records in a dev file")
    parser.add_argument("--dev-output", default=None, help="dev file (default: <output stem>.dev.jsonl)")
    parser.add_argument("--skip-invalid", action="store_true", help="skip and count bad records instead of stopping")
    args = parser.parse_args(argv)
    if args.dev_size < 0:
        parser.error("--dev-size must be >= 0")
    try:
        for path in (args.output, args.dev_output):
            if path and Path(path).is_dir():
                raise DataError(f"{path}: is a directory; give the .jsonl file to write")
        stats = convert_function(args.input, args.output, args.format, args.dev_size, args.dev_output, args.skip_invalid)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an output folder that cannot be made or written
        print(f"error: {os_error_line(error)}", file=sys.stderr)
        return 2
    print(f"records: {stats['records']} read, {stats['invalid']} invalid skipped")
    print(f"train: {stats[f'train_{unit}']} {unit} -> {stats['output']}")
    if "dev_output" in stats:
        print(f"dev: {stats[f'dev_{unit}']} {unit} -> {stats['dev_output']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return conversion_cli(argv, __doc__.split("\n\n")[0], READERS, "input .json/.jsonl files or globs", convert,
                          "conversations")


if __name__ == "__main__":
    sys.exit(main())
