"""Loss, learning rate and gradient norm against step, for one run or several overlaid.

    python -m nanotune.plot runs/tiny_sft                       # -> runs/tiny_sft/curves.png
    python -m nanotune.plot runs/a runs/b --out compare.png      # two runs on the same axes

Reads each run's `metrics.jsonl` (train records: loss, lr, grad_norm; eval records: eval_loss) and
draws three panels. matplotlib is an optional extra (`pip install nanotune[plot]`); without it the
command says so in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import run_main
from .config import ConfigError


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run, in step order; a line cut off by a kill is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (is {run_dir} a run's output_dir?)")
    train, evals = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        split = record.get("split") or ("eval" if "eval_loss" in record else "train")
        (evals if split == "eval" else train).append(record)
    return train, evals


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Draw the curves of `run_dirs` into the PNG `out`; return `out`."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the plot needs matplotlib: pip install matplotlib (or pip install nanotune[plot])") from None
    figure, (loss_axis, lr_axis, norm_axis) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for run_dir in run_dirs:
        train, evals = read_metrics(run_dir)
        label = run_dir.name
        line, = loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{label} train")
        if evals:
            loss_axis.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--", color=line.get_color(),
                           label=f"{label} eval")
        lr_axis.plot([r["step"] for r in train], [r.get("lr") for r in train], color=line.get_color(), label=label)
        norm_axis.plot([r["step"] for r in train], [r.get("grad_norm") for r in train], color=line.get_color(), label=label)
    loss_axis.set_ylabel("loss")
    loss_axis.legend(fontsize="small")
    lr_axis.set_ylabel("learning rate")
    norm_axis.set_ylabel("gradient norm")
    norm_axis.set_xlabel("step")
    for axis in (loss_axis, lr_axis, norm_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Plot loss (train and eval), lr and grad norm against step.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="output_dir of one or more runs")
    parser.add_argument("--out", type=Path, default=None, help="the PNG to write (default: FIRST_RUN/curves.png)")
    args = parser.parse_args(argv)
    out = plot_runs(args.run_dirs, args.out or args.run_dirs[0] / "curves.png")
    print(f"wrote {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    run_main(main)
