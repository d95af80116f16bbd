"""A run's promises at the edges: one run per folder, nothing lost or mixed, a hostile or damaged
checkpoint refused or passed over, NaN and Ctrl-C stop cleanly, and every bad input is one line."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import assert_same_weights, final_weights, losses, pt_args, sft_args, workspace  # noqa: F401

import train_pt

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


class Hostile:
    """A pickle that would create `marker` when a full unpickler loads it (standing for any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def run(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith("error: "), line
    for name in names:
        assert str(name) in line, (name, line)


def leftovers(folder: Path) -> list[Path]:
    """Half-written things: temporary folders and files of any kind."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def checkpointed(workspace, tmp_path_factory):  # noqa: F811
    """An uninterrupted 6-step run, and one with checkpoints at steps 2 and 4 to resume from."""
    root = tmp_path_factory.mktemp("trust")
    common = ("--train.batch_size=4", "--train.max_steps=6", "--checkpoint.every_steps=2", "--checkpoint.keep_last=3")
    train_pt.main(pt_args(workspace, root / "straight", *common))
    train_pt.main(pt_args(workspace, root / "saved", *common))
    return root, common


def resumable_copy(checkpointed, name: str) -> Path:
    root, _ = checkpointed
    copy = root / name
    shutil.copytree(root / "saved", copy)
    shutil.rmtree(copy / "final")
    return copy


# ----------------------------------------------------------------------------------------------
# A checkpoint runs no code
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["metadata", "rng"])
def test_a_hostile_file_in_every_checkpoint_is_refused_on_resume_and_runs_nothing(workspace, checkpointed,  # noqa: F811
                                                                                     kind, tmp_path):
    output = resumable_copy(checkpointed, f"hostile_{kind}")
    marker = tmp_path / "MARKER"
    for step in ("step_2", "step_4"):
        target = output / "checkpoints" / step / ("state/.metadata" if kind == "metadata" else "rng_rank0.pt")
        if kind == "metadata":
            target.write_bytes(pickle.dumps(Hostile(marker)))
        else:
            torch.save({"python": Hostile(marker), "numpy": [], "torch": torch.zeros(1)}, target)
    result = run("train_pt.py", pt_args(workspace, output, *checkpointed[1], "--checkpoint.resume=true"))
    assert_one_line_error(result, "step_4", target.name)
    assert not marker.exists()  # no code ran
    assert not (output / "final").exists()


def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_intact_one(workspace, checkpointed):  # noqa: F811
    output = resumable_copy(checkpointed, "truncated")
    shard = next((output / "checkpoints" / "step_4" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = run("train_pt.py", pt_args(workspace, output, *checkpointed[1], "--checkpoint.resume=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step_4 is damaged or refused, passed over" in result.stderr and shard.name in result.stderr
    assert "resuming from step_2" in result.stderr
    root, _ = checkpointed
    assert_same_weights(final_weights(output), final_weights(root / "straight"), atol=0)
    assert losses(output) == losses(root / "straight")


@pytest.mark.parametrize("damage", ["metadata", "trainer_state"])
def test_when_no_checkpoint_is_intact_resume_is_one_line(workspace, checkpointed, damage):  # noqa: F811
    output = resumable_copy(checkpointed, f"none_intact_{damage}")
    for step in ("step_2", "step_4"):
        folder = output / "checkpoints" / step
        (folder / ("state/.metadata" if damage == "metadata" else "trainer_state.json")).unlink()
    result = run("train_pt.py", pt_args(workspace, output, *checkpointed[1], "--checkpoint.resume=true"))
    assert_one_line_error(result, "no intact checkpoint", "missing")


def test_a_resume_with_another_global_batch_is_refused_before_the_model_loads(workspace, checkpointed):  # noqa: F811
    output = resumable_copy(checkpointed, "other_batch")
    result = run("train_pt.py", pt_args(workspace, output, "--train.batch_size=2", "--train.max_steps=6",
                                        "--checkpoint.every_steps=2", "--checkpoint.resume=true"))
    assert_one_line_error(result, "global_batch_size 4", "this run has 2")
    assert "trainable parameters" not in result.stderr  # refused before the model was built
    result = run("train_pt.py", pt_args(workspace, output, *checkpointed[1], "--data.seq_len=16",
                                        "--checkpoint.resume=true"))
    assert_one_line_error(result, "seq_len 32", "this run has 16")


# ----------------------------------------------------------------------------------------------
# Nothing deleted, nothing mixed, nothing lost
# ----------------------------------------------------------------------------------------------


def test_a_second_run_into_a_busy_output_dir_is_refused_and_the_first_ends_with_its_own_model(workspace, tmp_path):  # noqa: F811
    output = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, str(ROOT / "train_pt.py"),
                              *pt_args(workspace, output, "--train.batch_size=4", "--train.max_steps=20", "--seed=1")],
                             env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = output / ".nanotune.lock"
    deadline = time.time() + 300
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # hold the first run inside its work, however fast the machine
    try:
        second = run("train_pt.py", pt_args(workspace, output, "--train.batch_size=4", "--train.max_steps=3", "--seed=2"))
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_line_error(second, f"PID {first.pid}")
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    assert 'seed = 1' in (output / "final" / "training_config.toml").read_text()
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 20  # the first run's lines only


def test_a_lock_left_by_a_killed_run_is_taken_over(workspace, tmp_path):  # noqa: F811
    output = tmp_path / "stale"
    output.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (output / ".nanotune.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    train_pt.main(pt_args(workspace, output, "--train.batch_size=4", "--train.max_steps=2"))
    assert (output / "final" / "model.safetensors").exists()


def test_a_finished_run_is_not_replaced_without_overwrite_and_lora_leaves_no_full_model_files(workspace, tmp_path):  # noqa: F811
    output = tmp_path / "finished"
    train_pt.main(pt_args(workspace, output, "--train.batch_size=4", "--train.max_steps=2"))
    before = (output / "final" / "model.safetensors").read_bytes()
    result = run("train_pt.py", pt_args(workspace, output, "--train.batch_size=4", "--train.max_steps=2"))
    assert_one_line_error(result, "final/", "--checkpoint.overwrite=true")
    assert (output / "final" / "model.safetensors").read_bytes() == before
    train_pt.main(pt_args(workspace, output, "--train.batch_size=4", "--train.max_steps=2", "--checkpoint.overwrite=true",
                          "--lora.r=4", "--lora.targets=all-linear"))
    names = sorted(p.name for p in (output / "final").iterdir())
    assert "adapter_model.safetensors" in names and "training_config.toml" in names
    assert "model.safetensors" not in names and "config.json" not in names, names


def test_a_nan_loss_stops_the_run_with_one_line_and_saves_nothing_after_it(workspace, tmp_path):  # noqa: F811
    output = tmp_path / "nan"
    result = run("train_pt.py", pt_args(workspace, output, "--train.batch_size=4", "--train.max_steps=12",
                                        "--optim.lr=1e30", "--optim.max_grad_norm=0", "--optim.warmup_steps=0",
                                        "--log.every_steps=4", "--checkpoint.every_steps=4"))
    assert_one_line_error(result, "diverged", "NaN or infinite at step")
    assert not (output / "final").exists()
    saved = sorted(p.name for p in (output / "checkpoints").glob("step_*")) if (output / "checkpoints").exists() else []
    for name in saved:  # a checkpoint saved before the divergence holds finite weights only
        state = json.loads((output / "checkpoints" / name / "trainer_state.json").read_text())
        assert state["step"] < int(last_line(result).split("at step ")[1].split(";")[0])
    assert not leftovers(output)


def test_a_ctrl_c_inside_a_checkpoint_write_is_told_from_a_failure_however_dcp_wraps_it():
    """A Ctrl-C that lands inside torch.save's zip writer surfaces as the RuntimeError the writer's
    clean-up raises (the KeyboardInterrupt is its context), wrapped per rank by DCP: still a
    Ctrl-C, so the run stops with its one line. A real failure stays a failure."""
    from torch.distributed.checkpoint.api import CheckpointException

    from nanotune.train_state import _is_interrupt

    def raised_during(first, second):
        try:
            try:
                raise first
            except BaseException:
                raise second
        except BaseException as error:
            return error

    cleanup_error = raised_during(KeyboardInterrupt(), RuntimeError("unexpected pos 320 vs 236"))
    assert _is_interrupt(CheckpointException("write", {0: (cleanup_error, None)}))
    assert _is_interrupt(CheckpointException("write", {0: (KeyboardInterrupt(), None)}))
    assert _is_interrupt(KeyboardInterrupt())
    assert not _is_interrupt(CheckpointException("write", {0: (OSError("disk full"), None)}))
    assert not _is_interrupt(raised_during(ValueError("a"), RuntimeError("b")))


def test_ctrl_c_stops_with_one_line_and_leaves_no_temporary_folder(workspace, tmp_path):  # noqa: F811
    output = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(ROOT / "train_pt.py"),
                                *pt_args(workspace, output, "--train.batch_size=4", "--train.max_steps=400",
                                         "--checkpoint.every_steps=1", "--checkpoint.keep_last=1")],
                               env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = output / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted:")
    assert not leftovers(output), leftovers(output)
    assert not (output / "final").exists()


def test_a_token_cache_build_killed_midway_leaves_nothing_for_ever(workspace, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache / f"0123abcd.tmp-{int(dead.stdout)}-x1y2"
    stale.mkdir()
    (stale / "tokens.bin").write_bytes(b"half")
    args = [a if not a.startswith("--data.cache_dir=") else f"--data.cache_dir={cache}"
            for a in pt_args(workspace, tmp_path / "out", "--train.batch_size=4", "--train.max_steps=1")]
    train_pt.main(args)
    assert not stale.exists()
    assert not leftovers(cache)


# ----------------------------------------------------------------------------------------------
# merge.py and model folders
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merge_inputs(workspace, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("merge_trust")
    train_pt.main(pt_args(workspace, root / "base", "--train.batch_size=4", "--train.max_steps=1"))
    train_pt.main(pt_args(workspace, root / "tuned", "--model.path=" + str(root / "base" / "final"),
                          "--train.batch_size=4", "--train.max_steps=1", "--seed=3"))
    return root / "base" / "final", root / "tuned" / "final"


def test_merge_refuses_a_non_empty_out_folder_and_touches_no_sibling(merge_inputs, tmp_path):
    base, tuned = merge_inputs
    out = tmp_path / "models"
    out.mkdir()
    (out / "other_model.safetensors").write_text("someone else's")
    for sibling in ("models.old", "models.tmp"):
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "keep").write_text("mine")
    result = run("merge.py", ["make-delta", "--base", str(base), "--target", str(tuned), "--out", str(out)])
    assert_one_line_error(result, str(out), "--overwrite")
    assert (out / "other_model.safetensors").read_text() == "someone else's"
    result = run("merge.py", ["make-delta", "--base", str(base), "--target", str(tuned), "--out", str(out), "--overwrite"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "model.safetensors").exists() and not (out / "other_model.safetensors").exists()
    for sibling in ("models.old", "models.tmp"):
        assert (tmp_path / sibling / "keep").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "models.old", "models.tmp"]


def test_sums_files_that_prove_nothing_or_point_outside_are_refused(merge_inputs, tmp_path):
    base, tuned = merge_inputs
    delta = tmp_path / "delta"
    assert run("merge.py", ["make-delta", "--base", str(base), "--target", str(tuned), "--out", str(delta)]).returncode == 0
    cases = {
        "empty": ("", "lists no file"),
        "outside": (f"{'0' * 64}  ../outside.safetensors\n", "outside the folder"),
        "incomplete": (next(line for line in (delta / "SHA256SUMS").read_text().splitlines()
                            if "config.json" in line) + "\n", "does not list model.safetensors"),
    }
    for name, (text, expected) in cases.items():
        sums = delta / "SHA256SUMS"
        sums.write_text(text)
        result = run("merge.py", ["delta", "--base", str(base), "--delta", str(delta), "--out", str(tmp_path / name),
                                  "--check", str(sums)])
        assert_one_line_error(result, expected)
        assert not (tmp_path / name).exists()


def test_a_model_folder_cannot_point_outside_itself_or_hold_integer_weights(merge_inputs, tmp_path):
    from nanotune.checkpoint import CheckpointError, load_pretrained

    base, _ = merge_inputs
    outside = tmp_path / "outside.safetensors"
    shutil.copy(base / "model.safetensors", outside)
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(base / "config.json", folder / "config.json")
    names = list(load_file(base / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {name: "../outside.safetensors" for name in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"outside.safetensors.*inside the model folder"):
        load_pretrained(folder)

    integer = tmp_path / "integer"
    shutil.copytree(base, integer)
    tensors = load_file(integer / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int64)
    save_file(tensors, integer / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is int64"):
        load_pretrained(integer)


# ----------------------------------------------------------------------------------------------
# Every entry point: one line, exit 2, nothing left behind
# ----------------------------------------------------------------------------------------------


def test_every_training_entry_point_turns_bad_input_into_one_line_before_any_work(workspace, tmp_path):  # noqa: F811
    corpus = workspace["corpus"]
    cases = [
        ("train_pt.py", pt_args(workspace, tmp_path / "a", "--checkpoint.final_dtype=int4"), "checkpoint.final_dtype"),
        ("train_pt.py", pt_args(workspace, tmp_path / "b", "--checkpoint.max_shard_size=5XB"), "checkpoint.max_shard_size"),
        ("train_pt.py", pt_args(workspace, tmp_path / "c", "--optim.lr=-1"), "optim.lr"),
        ("train_pt.py", pt_args(workspace, tmp_path / "d", f"--data.train_files={corpus.parent}"), "is a directory"),
        ("train_pt.py", pt_args(workspace, tmp_path / "e", "--train.batch_size=512"), "train.batch_size"),
        ("train_sft.py", sft_args(workspace, tmp_path / "f", "--trainer.lr=1"), "train"),
        ("train_sft.py", sft_args(workspace, tmp_path / "g", "--data.template=nope"), "data.template"),
        ("merge.py", ["lora", "--base", str(tmp_path / "missing"), "--adapter", str(tmp_path), "--out",
                      str(tmp_path / "h")], "adapter_config.json"),
    ]
    for script, args, expected in cases:
        result = run(script, args)
        assert_one_line_error(result, expected)
        out = Path(next((a.split("=", 1)[1] for a in args if a.startswith("--output_dir=")), tmp_path / "h"))
        assert not (out / "final").exists() and not (out / "checkpoints").exists(), script
        assert not leftovers(tmp_path), leftovers(tmp_path)
