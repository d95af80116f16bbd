"""Convert preference data to nanotune's one form: JSONL of TRL's conversational preference records.

    python -m nanotune.data.convert_preference --input in.json [more ...] --output pairs.jsonl \\
        [--format auto] [--dev-size 100] [--dev-output dev.jsonl] [--skip-invalid]

Each line is {"prompt": [messages ending with a user turn], "chosen": [{"role": "assistant", ...}],
"rejected": [...]} (+ "margin" when the source had one): the form TRL's DPOTrainer and
RewardTrainer read as they are, and the form every reader of data/preference.py reads back to the
same pair. With `--dev-size N` the first N records go to a dev file (default `<output stem>.dev.jsonl`).
Both files are written atomically; a bad record stops the conversion with its `file:line`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanotune.data.convert import default_dev_path
from nanotune.data.preference import READERS, iter_preference_records
from nanotune.data.records import DataError, os_error_line
from nanotune.files import write_lines_atomically


def write_pairs(path: Path, pairs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_lines_atomically(path, (json.dumps(pair.to_record(), ensure_ascii=False) for pair in pairs))


def convert_pairs(inputs, output, format: str = "auto", dev_size: int = 0, dev_output=None, skip_invalid=False) -> dict:
    """Convert `inputs` (files or globs) and return the counts the CLI prints."""
    output = Path(output)
    dev_path = Path(dev_output) if dev_output else default_dev_path(output)
    stats: dict = {}
    train, dev = [], []
    for index, (_, _, pair) in enumerate(iter_preference_records(inputs, format, skip_invalid, stats)):
        (dev if index < dev_size else train).append(pair)
    write_pairs(output, train)
    if dev_size > 0:
        write_pairs(dev_path, dev)
    return {**stats, "train_pairs": len(train), "dev_pairs": len(dev), "output": str(output),
            **({"dev_output": str(dev_path)} if dev_size > 0 else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", default="auto", choices=["auto", *READERS], help="input format (default: detect)")
    parser.add_argument("--input", required=True, nargs="+", help="input .json/.jsonl/.txt files or globs")
    parser.add_argument("--output", required=True, help="output .jsonl")
    parser.add_argument("--dev-size", type=int, default=0, help="put the first N records in a dev file")
    parser.add_argument("--dev-output", default=None, help="dev file (default: <output stem>.dev.jsonl)")
    parser.add_argument("--skip-invalid", action="store_true", help="skip and count bad records instead of stopping")
    args = parser.parse_args(argv)
    if args.dev_size < 0:
        parser.error("--dev-size must be >= 0")
    try:
        stats = convert_pairs(args.input, args.output, args.format, args.dev_size, args.dev_output, args.skip_invalid)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {os_error_line(error)}", file=sys.stderr)
        return 2
    print(f"records: {stats['records']} read, {stats['invalid']} invalid skipped")
    print(f"train: {stats['train_pairs']} pairs -> {stats['output']}")
    if "dev_output" in stats:
        print(f"dev: {stats['dev_pairs']} pairs -> {stats['dev_output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
