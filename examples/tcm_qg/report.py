"""Collect what examples/tcm_qg/run.sh produced into OUT_DIR/report.json and print a short table.

    python examples/tcm_qg/report.py --out-dir runs/tcm_qg --records examples/tcm_qg/data/tcm_qg.json \
        --dev-records 25 [--load-at-start 0.5]

It only reads files the stages wrote, so it can be re-run on a finished folder:

    OUT_DIR/eval/before.json, after.json   `python -m nanotune.evaluate --json` of the pretrained and the
                                           SFT model on the dev questions (loss, BLEU-4, ROUGE-L)
    OUT_DIR/eval/*.predictions.jsonl       {"prompt", "reference", "prediction"} per dev question
    OUT_DIR/pt/metrics.jsonl, sft/...      the training logs: the last "loss" line is the final train
                                           loss (the mean over the last logging window, not one batch),
                                           the last "eval_loss" line the loss on the held-out data
    OUT_DIR/stage_times.tsv                "stage<TAB>start<TAB>end" (Unix seconds) per stage
    OUT_DIR/eval/pref_sft.json, pref_dpo.json   `evaluate --pairs --json`: held-out preference accuracy
                                           of the SFT and the DPO model (summed log-probs of the replies)
    OUT_DIR/eval/after_dpo.json            the DPO model's dev questions, scored as "after"
    OUT_DIR/dpo/metrics.jsonl, preference_times.tsv   the DPO stage's log and its stages' minutes

"before" is the pretrained model given exactly the prompt the SFT model is given: it has read the
domain's text but never seen the task, so its scores are the floor that fine-tuning must beat.

The leakage check: records whose ids share everything before the last dash (`tcmqg-herb-068-1`,
`tcmqg-herb-068-2`) are about one entity, and the dev set is the head of the file, so an entity
can be on both sides of the cut. The report counts the dev entities that also occur in training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere: nanotune is importable

from nanotune.data.records import DataError, iter_json_records  # noqa: E402

N_EXAMPLES = 4  # dev questions shown side by side in the report


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file not found (did the stage that writes it finish?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None


def get_field(result: dict, key: str, path: Path):
    """result[key], or a one-line error naming the file and the field."""
    if not isinstance(result, dict) or key not in result:
        raise DataError(f"{path}: field {key!r} is missing (was it written by `python -m nanotune.evaluate --json`?)")
    return result[key]


def final_losses(metrics_path: Path) -> dict:
    """{"train_loss", "eval_loss"}: the last value of each in a training run's metrics.jsonl."""
    found = {}
    for line_number, record in iter_json_records(metrics_path):
        if not isinstance(record, dict):
            raise DataError(f"{metrics_path}:{line_number}: expected a JSON object")
        if "loss" in record:
            found["train_loss"] = record["loss"]
        if "eval_loss" in record:
            found["eval_loss"] = record["eval_loss"]
    for key, field in (("train_loss", "loss"), ("eval_loss", "eval_loss")):
        if key not in found:
            raise DataError(f"{metrics_path}: no line with field {field!r} (the run did not finish?)")
    return found


def stage_minutes(times_path: Path) -> tuple[dict, float]:
    """({stage: minutes} in the order the stages ran, total minutes), from run.sh's timestamps.

    The total runs from the first start to the last end, so it also counts the moments between
    stages (Python starting up), which the per-stage figures leave out."""
    minutes, starts, ends = {}, [], []
    if not times_path.is_file():
        raise DataError(f"{times_path}: file not found (run.sh writes it)")
    for line_number, line in enumerate(times_path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split("\t")
        try:
            name, start, end = parts[0], float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise DataError(f"{times_path}:{line_number}: expected 'stage<TAB>start<TAB>end', got {line!r}") from None
        minutes[name] = (end - start) / 60.0
        starts.append(start)
        ends.append(end)
    if not minutes:
        raise DataError(f"{times_path}: no stage finished")
    return minutes, (max(ends) - min(starts)) / 60.0


def dev_leakage(records_path: Path, dev_records: int) -> dict:
    """How many dev entities (id prefixes) also have records in the training part of the file."""
    entities = []
    for line_number, record in iter_json_records(records_path):
        identifier = record.get("id") if isinstance(record, dict) else None
        if not isinstance(identifier, str) or "-" not in identifier:
            raise DataError(f"{records_path}:{line_number}: field 'id' must look like tcmqg-<kind>-<entity>-<n>")
        entities.append(identifier.rsplit("-", 1)[0])
    dev, train = set(entities[:dev_records]), set(entities[dev_records:])
    return {"dev_records": min(dev_records, len(entities)), "dev_entities": len(dev),
            "dev_entities_also_in_train": sorted(dev & train)}


def examples(out_dir: Path, n: int) -> list[dict]:
    """`n` dev questions spread evenly over the dev set, with both models' questions."""
    before_path = out_dir / "eval" / "before.predictions.jsonl"
    after_path = out_dir / "eval" / "after.predictions.jsonl"
    before = [record for _, record in iter_json_records(before_path)]
    after = [record for _, record in iter_json_records(after_path)]
    pairs = list(zip(before, after))
    return [
        {"reference": get_field(a, "reference", after_path), "before": get_field(b, "prediction", before_path),
         "after": get_field(a, "prediction", after_path)}
        for b, a in (pairs[i * len(pairs) // n] for i in range(min(n, len(pairs))))
    ]


def preference_report(out_dir: Path) -> tuple[dict, list[float]]:
    """The preference stage: accuracy and margin on the dev pairs before (SFT) and after DPO, the DPO
    model's BLEU-4 / ROUGE-L on the dev questions, its losses and minutes; and its stage bounds."""
    paths = {name: out_dir / "eval" / f"{name}.json" for name in ("pref_sft", "pref_dpo", "after_dpo")}
    results = {name: read_json(path) for name, path in paths.items()}
    dpo = final_losses(out_dir / "dpo" / "metrics.jsonl")
    minutes, _ = stage_minutes(out_dir / "preference_times.tsv")
    bounds = [float(x) for line in (out_dir / "preference_times.tsv").read_text(encoding="utf-8").splitlines()
              for x in line.split("\t")[1:3]]
    return {
        "accuracy_sft": get_field(results["pref_sft"], "accuracy", paths["pref_sft"]),
        "accuracy_dpo": get_field(results["pref_dpo"], "accuracy", paths["pref_dpo"]),
        "margin_sft": get_field(results["pref_sft"], "margin", paths["pref_sft"]),
        "margin_dpo": get_field(results["pref_dpo"], "margin", paths["pref_dpo"]),
        "n_dev_pairs": get_field(results["pref_dpo"], "n_pairs", paths["pref_dpo"]),
        "bleu4_dpo": get_field(results["after_dpo"], "bleu4", paths["after_dpo"]),
        "rougeL_dpo": get_field(results["after_dpo"], "rougeL", paths["after_dpo"]),
        "dpo_train_loss": dpo["train_loss"],
        "dpo_eval_loss": dpo["eval_loss"],
        "minutes": {name: round(value, 2) for name, value in minutes.items()},
    }, bounds


def build_report(out_dir: Path, records_path: Path, dev_records: int, load_at_start: float | None = None) -> dict:
    before_path, after_path = out_dir / "eval" / "before.json", out_dir / "eval" / "after.json"
    before, after = read_json(before_path), read_json(after_path)

    def both(key: str) -> tuple:
        return get_field(before, key, before_path), get_field(after, key, after_path)

    bleu4, rouge_l, dev_loss = both("bleu4"), both("rougeL"), both("loss")
    pretrain = final_losses(out_dir / "pt" / "metrics.jsonl")
    sft = final_losses(out_dir / "sft" / "metrics.jsonl")
    minutes, total_minutes = stage_minutes(out_dir / "stage_times.tsv")
    preference, bounds = preference_report(out_dir)
    core = [float(x) for line in (out_dir / "stage_times.tsv").read_text(encoding="utf-8").splitlines()
            for x in line.split("\t")[1:3]]
    total_minutes = (max(core + bounds) - min(core + bounds)) / 60.0  # every stage, the preference ones too
    return {
        "bleu4_before": bleu4[0],
        "bleu4_after": bleu4[1],
        "rougeL_before": rouge_l[0],
        "rougeL_after": rouge_l[1],
        "dev_loss_before": dev_loss[0],  # the loss of the dev questions given their prompts, as in SFT
        "dev_loss_after": dev_loss[1],
        "n_dev_questions": get_field(after, "n_predictions", after_path),
        "pretrain_train_loss": pretrain["train_loss"],
        "pretrain_eval_loss": pretrain["eval_loss"],
        "sft_train_loss": sft["train_loss"],
        "sft_eval_loss": sft["eval_loss"],
        "minutes": {name: round(value, 2) for name, value in minutes.items()},
        "total_minutes": round(total_minutes, 2),
        # Other work on the machine slows every stage; run.sh reads the load before it starts its own.
        "load_average_at_start": load_at_start,
        "split": dev_leakage(records_path, dev_records),
        "examples": examples(out_dir, N_EXAMPLES),
        "preference": preference,
    }


def write_json_atomic(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def table(report: dict) -> str:
    """The short summary run.sh ends with."""
    lines = [
        f"TCM question generation: {report['n_dev_questions']} dev questions, greedy, character-level metrics",
        f"{'':22}{'before SFT':>12}{'after SFT':>12}",
        f"{'BLEU-4':22}{report['bleu4_before']:12.2f}{report['bleu4_after']:12.2f}",
        f"{'ROUGE-L':22}{report['rougeL_before']:12.2f}{report['rougeL_after']:12.2f}",
        f"{'dev loss (questions)':22}{report['dev_loss_before']:12.3f}{report['dev_loss_after']:12.3f}",
        "",
        f"losses (final train / eval): pretrain {report['pretrain_train_loss']:.3f} / {report['pretrain_eval_loss']:.3f}, "
        f"SFT {report['sft_train_loss']:.3f} / {report['sft_eval_loss']:.3f}",
    ]
    preference = report["preference"]
    lines += [
        "",
        f"preference stage (DPO from the SFT model): {preference['n_dev_pairs']} held-out pairs",
        f"{'':22}{'SFT':>12}{'SFT + DPO':>12}",
        f"{'preference accuracy':22}{preference['accuracy_sft']:12.3f}{preference['accuracy_dpo']:12.3f}",
        f"{'log-prob margin':22}{preference['margin_sft']:12.2f}{preference['margin_dpo']:12.2f}",
        f"{'ROUGE-L':22}{report['rougeL_after']:12.2f}{preference['rougeL_dpo']:12.2f}",
        f"{'BLEU-4':22}{report['bleu4_after']:12.2f}{preference['bleu4_dpo']:12.2f}",
        f"DPO loss (final train / eval): {preference['dpo_train_loss']:.3f} / {preference['dpo_eval_loss']:.3f}",
        "",
        "minutes: " + ", ".join(f"{name} {value:.2f}" for name, value in {**report["minutes"], **preference["minutes"]}.items())
        + f"; total {report['total_minutes']:.2f}",
    ]
    if report["load_average_at_start"] is not None:
        lines.append(f"load average (1 min) when the run started: {report['load_average_at_start']:.2f}")
    leaked = report["split"]["dev_entities_also_in_train"]
    lines.append(f"dev split: {report['split']['dev_records']} records about {report['split']['dev_entities']} entities, "
                 f"{len(leaked)} of them also in training{' (' + ', '.join(leaked) + ')' if leaked else ''}")
    for example in report["examples"]:
        lines += ["", f"  reference  {example['reference']}",
                  f"  before     {example['before'][:60]}", f"  after      {example['after']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path, help="the OUT_DIR of run.sh")
    parser.add_argument("--records", required=True, type=Path, help="the QG records the dev set was cut from")
    parser.add_argument("--dev-records", required=True, type=int, help="how many leading records went to dev")
    parser.add_argument("--load-at-start", type=float, default=None,
                        help="the 1-minute load average before the run began (other work slows every stage)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.out_dir, args.records, args.dev_records, args.load_at_start)
    except DataError as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 1
    write_json_atomic(args.out_dir / "report.json", report)
    print(table(report))
    print(f"\nwrote {args.out_dir / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
