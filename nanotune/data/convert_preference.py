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

import json
import sys
from pathlib import Path

from nanotune.data.convert import conversion_cli, default_dev_path
from nanotune.data.preference import READERS, iter_preference_records
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
    return conversion_cli(argv, __doc__.split("\n\n")[0], READERS, "input .json/.jsonl/.txt files or globs",
                          convert_pairs, "pairs")


if __name__ == "__main__":
    sys.exit(main())
