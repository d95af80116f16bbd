"""FSDP2 for real: `torchrun --nproc_per_node 2` with gloo on the CPU, against one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import corpus_lines, train_sentencepiece
from test_train import assert_same_weights, final_weights, losses, pt_args, sft_args

import train_pt
import train_sft

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(script: str, args: list[str], *launcher: str, wait: bool = True):
    command = [sys.executable, "-m", "torch.distributed.run", *(launcher or ("--standalone", "--nproc_per_node=2")),
               str(ROOT / script), *args]
    if not wait:
        return subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    result = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    tokenizer = train_sentencepiece(folder, vocab_size=512, lines=corpus_lines(300, seed=1))
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(120, seed=2)) + "\n", encoding="utf-8")
    with open(folder / "chat.jsonl", "w", encoding="utf-8") as f:
        lines = corpus_lines(80, seed=3)
        for i in range(40):
            f.write(json.dumps({"messages": [{"role": "user", "content": lines[i][: 5 + i % 50]},
                                             {"role": "assistant", "content": lines[i + 40][: 3 + (7 * i) % 40]}]},
                               ensure_ascii=False) + "\n")
    return {"tokenizer": tokenizer, "corpus": corpus, "chat": folder / "chat.jsonl", "root": folder}


@pytest.fixture(scope="module")
def pretrain_runs(workspace, tmp_path_factory):
    """The same 4 steps: 2 ranks x batch 2 x accumulation 2, and 1 process x batch 8."""
    out = tmp_path_factory.mktemp("pt_runs")
    steps = ("--train.max_steps=4",)
    torchrun("train_pt.py", pt_args(workspace, out / "fsdp", "--train.batch_size=2", "--train.grad_accum=2", *steps))
    train_pt.main(pt_args(workspace, out / "single", "--train.batch_size=8", *steps))
    return out


def test_fsdp_pretraining_equals_one_process_with_the_whole_batch(pretrain_runs):
    assert len(losses(pretrain_runs / "single")) == 4
    assert losses(pretrain_runs / "fsdp") == pytest.approx(losses(pretrain_runs / "single"), abs=1e-5)
    assert_same_weights(final_weights(pretrain_runs / "fsdp"), final_weights(pretrain_runs / "single"), atol=1e-5)


def test_fsdp_sft_with_activation_checkpointing_equals_one_process(workspace, tmp_path):
    steps = ("--train.max_steps=3",)
    torchrun("train_sft.py", sft_args(workspace, tmp_path / "fsdp", "--train.batch_size=2", "--train.grad_accum=2",
                                      "--train.activation_checkpointing=true", "--distributed.reshard_after_forward=false",
                                      *steps))
    train_sft.main(sft_args(workspace, tmp_path / "single", "--train.batch_size=8", *steps))
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    assert_same_weights(final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "single"), atol=1e-5)


def test_cpu_offload_without_a_gpu_is_a_one_line_config_error(workspace, tmp_path):
    """FSDP2's CPUOffloadPolicy moves shards between GPU and CPU memory; on a CPU-only run there is
    nothing to offload, and torch would fail deep inside fully_shard. nanotune says so at start-up."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train_pt.py"), *pt_args(workspace, tmp_path / "offload", "--distributed.cpu_offload=true")]
    result = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "distributed.cpu_offload = true needs GPUs" in result.stderr
    for ours in (ROOT / "nanotune", ROOT / "train_pt.py"):  # the ranks print one line; only torchrun's traceback follows
        assert f'File "{ours}' not in result.stderr
    assert not (tmp_path / "offload" / "final").exists()


def test_fsdp_export_loads_in_transformers_with_the_unsharded_logits(pretrain_runs):
    import transformers

    from nanotune.checkpoint import load_pretrained

    exported = transformers.AutoModelForCausalLM.from_pretrained(pretrain_runs / "fsdp" / "final").eval()
    unsharded = load_pretrained(pretrain_runs / "single" / "final")
    input_ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exported(input_ids).logits, unsharded(input_ids), atol=1e-4, rtol=0)


def test_two_nodes_on_one_machine_train_like_one_node_with_two_processes(workspace, pretrain_runs, tmp_path):
    port = free_port()
    args = pt_args(workspace, tmp_path / "two_nodes", "--train.batch_size=2", "--train.grad_accum=2",
                   "--train.max_steps=4")
    launchers = [
        torchrun("train_pt.py", args, "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                 "--master_addr=127.0.0.1", f"--master_port={port}", wait=False)
        for rank in (0, 1)
    ]
    for launcher in launchers:
        _, stderr = launcher.communicate(timeout=600)
        assert launcher.returncode == 0, stderr.decode()[-4000:]
    assert losses(tmp_path / "two_nodes") == pytest.approx(losses(pretrain_runs / "fsdp"), abs=1e-6)


def test_killed_on_two_ranks_and_resumed_from_sharded_checkpoint_ends_like_an_uninterrupted_run(workspace, tmp_path):
    common = ("--train.batch_size=2", "--train.grad_accum=2", "--train.max_steps=8", "--checkpoint.every_steps=2",
              "--checkpoint.resume=true")
    torchrun("train_pt.py", pt_args(workspace, tmp_path / "straight", *common))
    run_dir = tmp_path / "killed"
    process = torchrun("train_pt.py", pt_args(workspace, run_dir, *common), wait=False)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [json.loads(x)["step"] for x in (metrics.read_text().splitlines() if metrics.exists() else [])
                 if x.endswith("}")]
        if steps and max(steps) >= 3:
            break
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, at once
    process.wait(timeout=60)
    assert not (run_dir / "final").exists(), "the run finished before it could be killed"
    shards = list((run_dir / "checkpoints").glob("step_*/state/*.distcp"))
    assert len(shards) >= 2, "expected one shard file per rank"
    torchrun("train_pt.py", pt_args(workspace, run_dir, *common))
    assert losses(run_dir) == losses(tmp_path / "straight")
    assert_same_weights(final_weights(run_dir), final_weights(tmp_path / "straight"), atol=1e-6)


def test_fsdp_lora_trains_only_the_adapter_like_one_process(workspace, pretrain_runs, tmp_path):
    from nanotune.lora import read_adapter_tensors

    lora = (f"--model.path={pretrain_runs / 'single' / 'final'}", "--lora.r=4", "--lora.alpha=8",
            "--lora.targets=all-linear", "--lora.dropout=0", "--train.max_steps=3", "--optim.lr=1e-2")
    torchrun("train_sft.py", sft_args(workspace, tmp_path / "fsdp", "--train.batch_size=2", "--train.grad_accum=2",
                                      *lora))
    train_sft.main(sft_args(workspace, tmp_path / "single", "--train.batch_size=8", *lora))
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    sharded, single = read_adapter_tensors(tmp_path / "fsdp" / "final"), read_adapter_tensors(tmp_path / "single" / "final")
    assert sharded.keys() == single.keys() and any("lora_B" in k for k in single)
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], atol=1e-5, rtol=0, msg=name)
