"""Collect what examples/arith_grpo/run.sh produced into OUT_DIR/report.json and print a table.

    python examples/arith_grpo/report.py --out-dir runs/arith_grpo [--load-at-start 0.5]

It only reads files the stages wrote, so it can be re-run on a finished folder:

    OUT_DIR/eval/before.json, after.json   evaluate.py of the SFT and the GRPO model: greedy held-out
                                           accuracy (%), all sums and split by carry / no carry
    OUT_DIR/grpo/metrics.jsonl             the GRPO log: per logged step the mean reward of the
                                           sampled answers (at temperature 1, so below the greedy
                                           accuracy), and at the end eval_exact_number
    OUT_DIR/stage_times.tsv                "stage<TAB>start<TAB>end" (Unix seconds) per stage

The reward curve is printed as numbers and as a sparkline; a PNG is written only when matplotlib
is installed (it is not a dependency of nanotune).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - low) / span * len(SPARKS)))] for v in values)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        sys.exit(f"error: {path}: {error} (did every stage of run.sh finish?)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--load-at-start", type=float, default=None)
    args = parser.parse_args(argv)
    out = args.out_dir
    before, after = read_json(out / "eval" / "before.json"), read_json(out / "eval" / "after.json")
    lines = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    curve = [{"step": r["step"], "reward": r["reward"]} for r in lines if "reward" in r]
    final_eval = next((r for r in reversed(lines) if "eval_exact_number" in r), {})
    minutes = {}
    for line in (out / "stage_times.tsv").read_text(encoding="utf-8").splitlines():
        name, start, end = line.split("\t")
        minutes[name] = (float(end) - float(start)) / 60
    report = {
        "accuracy_before": before["accuracy_all"], "accuracy_after": after["accuracy_all"],
        "gain_points": after["accuracy_all"] - before["accuracy_all"],
        "carry": {"before": before["accuracy_carry"], "after": after["accuracy_carry"], "n": before["n_carry"]},
        "no_carry": {"before": before["accuracy_no_carry"], "after": after["accuracy_no_carry"],
                     "n": before["n_no_carry"]},
        "n_heldout": before["n_all"],
        "grpo_eval_exact_number": 100 * final_eval["eval_exact_number"] if final_eval else None,
        "reward_curve": curve,
        "minutes": minutes, "total_minutes": sum(minutes.values()),
        "load_average_at_start": args.load_at_start, "load_average_at_end": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 3))
        axes.plot([p["step"] for p in curve], [p["reward"] for p in curve])
        axes.set(xlabel="GRPO step", ylabel="mean reward (sampled)", title="arith_grpo: reward curve")
        figure.tight_layout()
        figure.savefig(out / "reward_curve.png", dpi=100)
        report["reward_curve_png"] = str(out / "reward_curve.png")
    except ImportError:
        report["reward_curve_png"] = None
    temporary = out / "report.json.tmp"
    temporary.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    temporary.replace(out / "report.json")

    print(f"held-out accuracy, greedy ({report['n_heldout']} sums)   before GRPO   after GRPO")
    for name, key in (("all sums", "all"), (f"with a carry ({report['carry']['n']})", "carry"),
                      (f"without a carry ({report['no_carry']['n']})", "no_carry")):
        print(f"  {name:36s} {before[f'accuracy_{key}']:9.1f}%   {after[f'accuracy_{key}']:9.1f}%")
    print(f"  gain: {report['gain_points']:+.1f} points")
    rewards = [p["reward"] for p in curve]
    print(f"reward curve (mean reward of the sampled answers, steps {curve[0]['step']}-{curve[-1]['step']}): "
          f"{sparkline(rewards)}  {rewards[0]:.3f} -> {rewards[-1]:.3f}")
    print("  " + " ".join(f"{p['step']}:{p['reward']:.2f}" for p in curve))
    stages = ", ".join(f"{name} {value:.2f}" for name, value in minutes.items())
    print(f"minutes: {report['total_minutes']:.2f} ({stages}); load average {args.load_at_start} at the start, "
          f"{report['load_average_at_end']:.2f} at the end, {report['cpu_count']} CPUs")
    print(f"report: {out / 'report.json'}")


if __name__ == "__main__":
    main()
