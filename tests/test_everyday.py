"""Everyday use: --help, metrics records, curves, TensorBoard and W&B, exporting a checkpoint,
resuming from a chosen one, keeping the best model, stopping early."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from test_train import pt_args, sft_args, workspace  # noqa: F401

import train_pt
import train_sft
from nanotune.config import PretrainDataConfig, RunConfig, SFTDataConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("script, data_class", [("train_pt.py", PretrainDataConfig), ("train_sft.py", SFTDataConfig)])
def test_help_lists_every_key_of_every_section_with_its_type_and_default(script, data_class):
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, env=ENV,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(f"usage: python {script} [--config FILE.toml]")
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        section = data_class if field.name == "data" else hints[field.name]
        if not dataclasses.is_dataclass(section):
            assert f"  --{field.name}  (" in text, field.name
            continue
        assert f"[{field.name}]" in text
        for key in dataclasses.fields(section):
            line = next((x for x in text.splitlines() if x.startswith(f"  --{field.name}.{key.name}  (")), None)
            assert line is not None, f"{field.name}.{key.name} missing from --help"
            assert "default" in line and len(line.split(")  ", 1)[-1]) > 3, line  # a description after the default


@pytest.fixture(scope="module")
def sft_run(workspace, tmp_path_factory):  # noqa: F811
    """A short SFT run with evaluations, checkpoints, TensorBoard and W&B (offline)."""
    output = tmp_path_factory.mktemp("everyday") / "sft"
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    try:
        train_sft.main(sft_args(workspace, output, "--train.batch_size=4", "--train.max_steps=8", "--data.valid_fraction=0.2",
                                "--eval.every_steps=2", "--checkpoint.every_steps=2", "--checkpoint.keep_last=5",
                                "--log.tensorboard=true", "--log.wandb=true", "--optim.schedule=constant",
                                "--optim.warmup_steps=0"))
    finally:
        os.environ.pop("WANDB_MODE", None)
    return output


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_records_carry_time_split_and_distinct_eval_keys(sft_run):
    rows = records(sft_run)
    assert {r["split"] for r in rows} == {"train", "eval"}
    assert all(isinstance(r["time"], float) for r in rows)
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    for r in rows:
        assert ("eval_loss" in r and "eval_ppl" in r and "loss" not in r) if r["split"] == "eval" else ("loss" in r and "ppl" in r)


def test_tensorboard_events_read_back_with_the_logged_values(sft_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(sft_run / "tensorboard"))
    events.Reload()
    train_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    eval_loss = {e.step: e.value for e in events.Scalars("eval/loss")}
    for r in records(sft_run):
        table = eval_loss if r["split"] == "eval" else train_loss
        value = r["eval_loss"] if r["split"] == "eval" else r["loss"]
        assert table[r["step"]] == pytest.approx(value, rel=1e-6)


def wandb_history(run_file: Path) -> list[dict]:
    """The `history` records of an offline W&B run file: a 7-byte file header, then LevelDB-log
    records (4-byte checksum, 2-byte length, 1-byte type: full / first / middle / last) in blocks of
    32 KiB, each holding a serialised `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data, position, rows, pending = run_file.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:
            position += room
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full or last: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_logged_values(sft_run):
    (run_file,) = (sft_run / "wandb").glob("offline-run-*/run-*.wandb")
    logged = {(row["_step"], key): value for row in wandb_history(run_file) for key, value in row.items()}
    for r in records(sft_run):
        key, value = ("eval/loss", r["eval_loss"]) if r["split"] == "eval" else ("train/loss", r["loss"])
        assert logged[(r["step"], key)] == pytest.approx(value, rel=1e-6)


def test_plot_writes_a_png_for_one_run_and_for_two(sft_run, workspace, tmp_path):  # noqa: F811
    from nanotune.plot import main as plot

    one = plot([str(sft_run)])
    assert one == sft_run / "curves.png" and one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = tmp_path / "pt"
    train_pt.main(pt_args(workspace, other, "--train.batch_size=4", "--train.max_steps=3"))
    both = plot([str(sft_run), str(other), "--out", str(tmp_path / "both.png")])
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and both.stat().st_size > one.stat().st_size // 2


def test_plot_says_in_one_line_when_matplotlib_is_missing(sft_run, tmp_path):
    script = ("import sys; sys.modules['matplotlib'] = None; sys.argv = ['plot', sys.argv[1]]; "
              "from nanotune.cli import run_main; from nanotune.plot import main; run_main(main)")
    result = subprocess.run([sys.executable, "-c", script, str(sft_run)], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the plot needs matplotlib: pip install matplotlib (or pip install nanotune[plot])")


def logits_of(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.arange(3, 40)[None]).logits


def test_export_of_a_mid_run_checkpoint_is_the_model_at_that_step_and_loads_in_transformers(sft_run, workspace, tmp_path):  # noqa: F811
    from nanotune.export import main as export

    out = export([str(sft_run / "checkpoints" / "step_4"), "--out", str(tmp_path / "step_4")])
    # The same run stopped at step 4 (constant learning rate: the first 4 steps are the same steps).
    stopped = tmp_path / "stopped"
    train_sft.main(sft_args(workspace, stopped, "--train.batch_size=4", "--train.max_steps=4", "--data.valid_fraction=0.2",
                            "--eval.every_steps=2", "--optim.schedule=constant", "--optim.warmup_steps=0"))
    torch.testing.assert_close(logits_of(out), logits_of(stopped / "final"), atol=1e-6, rtol=0)
    assert (out / "tokenizer_config.json").exists() and (out / "training_config.toml").exists()


def test_resume_from_a_named_checkpoint_continues_from_that_step(sft_run, workspace, tmp_path):  # noqa: F811
    output = tmp_path / "named"
    shutil.copytree(sft_run, output, ignore=shutil.ignore_patterns("final", "best", "wandb", "tensorboard"))
    train_sft.main(sft_args(workspace, output, "--train.batch_size=4", "--train.max_steps=8", "--data.valid_fraction=0.2",
                            "--eval.every_steps=2", "--checkpoint.every_steps=2", "--checkpoint.keep_last=5",
                            "--optim.schedule=constant", "--optim.warmup_steps=0",
                            f"--checkpoint.resume={output / 'checkpoints' / 'step_4'}"))
    steps = [r["step"] for r in records(output) if r["split"] == "train"]
    assert steps == list(range(1, 9))  # the lines after step 4 of the first run were replaced, none doubled
    assert [r["loss"] for r in records(output) if r["split"] == "train"] == \
        [r["loss"] for r in records(sft_run) if r["split"] == "train"]
    torch.testing.assert_close(logits_of(output / "final"), logits_of(sft_run / "final"), atol=0, rtol=0)


def test_save_best_keeps_the_lowest_eval_loss_weights_and_early_stopping_stops(workspace, tmp_path):  # noqa: F811
    from nanotune.evaluate import evaluate_model

    output = tmp_path / "overfit"
    valid = tmp_path / "valid.jsonl"
    lines = workspace["chat"].read_text(encoding="utf-8").splitlines()
    valid.write_text("\n".join(lines[:8]) + "\n", encoding="utf-8")
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines[8:]) + "\n", encoding="utf-8")
    result = train_sft.main(sft_args(workspace, output, f"--data.train_files={train}", f"--data.valid_files={valid}",
                                     "--train.batch_size=4", "--train.max_steps=200", "--optim.lr=3e-2",
                                     "--optim.schedule=constant", "--eval.every_steps=4", "--checkpoint.save_best=true",
                                     "--eval.early_stopping_patience=2"))
    evals = [r for r in records(output) if r["split"] == "eval"]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert result.steps < 200 and result.steps == evals[-1]["step"]  # stopped early
    assert evals[-1]["eval_loss"] > best["eval_loss"] and evals[-2]["eval_loss"] > best["eval_loss"]
    from nanotune.checkpoint import load_pretrained
    from nanotune.data.formats import read_conversations
    from nanotune.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(output / "best")
    conversations = list(read_conversations([valid]))
    scores = evaluate_model(load_pretrained(output / "best"), tokenizer, conversations, "chatml", max_length=64,
                            progress=False)
    assert scores["loss"] == pytest.approx(best["eval_loss"], rel=1e-4)
