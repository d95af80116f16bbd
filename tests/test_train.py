"""The training loop, proven against its oracles: one big batch, an uninterrupted run, a frozen model."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import corpus_lines, train_sentencepiece
from safetensors.torch import load_file

import train_pt
import train_sft

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tokenizer, a plain-text corpus and a conversation file, shared by the tests of this module."""
    folder = tmp_path_factory.mktemp("train")
    tokenizer = train_sentencepiece(folder, vocab_size=512, lines=corpus_lines(300, seed=1))
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(120, seed=2)) + "\n", encoding="utf-8")
    rng = random.Random(0)
    lines = corpus_lines(80, seed=3)
    with open(folder / "chat.jsonl", "w", encoding="utf-8") as f:
        for i in range(40):
            # uneven lengths, and some two-turn conversations
            turns = [{"role": "user", "content": lines[i][: rng.randint(5, 60)]},
                     {"role": "assistant", "content": lines[i + 40][: rng.randint(3, 40)]}]
            if i % 3 == 0:
                turns += [{"role": "user", "content": "再说一遍"}, {"role": "assistant", "content": lines[i][:10]}]
            f.write(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")
    return {"tokenizer": tokenizer, "corpus": corpus, "chat": folder / "chat.jsonl", "root": folder}


def pt_args(ws, output_dir, *extra):
    return [
        f"--output_dir={output_dir}", f"--tokenizer.path={ws['tokenizer']}", f"--data.train_files={ws['corpus']}",
        "--data.seq_len=32", f"--data.cache_dir={ws['root'] / 'cache'}", "--data.num_workers=1",
        "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
        "--model.num_attention_heads=4", "--model.num_key_value_heads=2",
        "--optim.lr=3e-3", "--optim.warmup_steps=2", "--log.every_steps=1", "--log.progress_bar=false", *extra,
    ]


def sft_args(ws, output_dir, *extra):
    return [
        f"--output_dir={output_dir}", f"--tokenizer.path={ws['tokenizer']}", f"--data.train_files={ws['chat']}",
        "--data.max_length=64", "--data.template=chatml",
        "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
        "--model.num_attention_heads=4", "--model.num_key_value_heads=2",
        "--optim.lr=3e-3", "--log.every_steps=1", "--log.progress_bar=false", *extra,
    ]


def losses(output_dir) -> list[float]:
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "final" / "model.safetensors")


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("entry", ["pt", "sft"])
def test_gradient_accumulation_equals_one_big_batch(workspace, tmp_path, entry):
    main, args = (train_pt.main, pt_args) if entry == "pt" else (train_sft.main, sft_args)
    main(args(workspace, tmp_path / "big", "--train.batch_size=8", "--train.grad_accum=1", "--train.max_steps=4"))
    main(args(workspace, tmp_path / "accum", "--train.batch_size=2", "--train.grad_accum=4", "--train.max_steps=4"))
    big, accumulated = losses(tmp_path / "big"), losses(tmp_path / "accum")
    assert len(big) == 4
    assert big == pytest.approx(accumulated, abs=1e-5)
    assert_same_weights(final_weights(tmp_path / "big"), final_weights(tmp_path / "accum"), atol=1e-5)


def test_resume_from_step_4_ends_where_the_uninterrupted_run_ends(workspace, tmp_path):
    common = ("--train.batch_size=4", "--train.max_steps=12", "--checkpoint.every_steps=4", "--checkpoint.keep_last=5")
    train_pt.main(pt_args(workspace, tmp_path / "straight", *common))
    interrupted = tmp_path / "interrupted"
    train_pt.main(pt_args(workspace, interrupted, *common))
    # Throw away everything after step 4, as if the run had died right after that checkpoint.
    for name in ("step_8",):
        import shutil

        shutil.rmtree(interrupted / "checkpoints" / name)
    (interrupted / "final" / "model.safetensors").unlink()
    train_pt.main(pt_args(workspace, interrupted, *common, "--checkpoint.resume=true"))
    assert losses(interrupted) == losses(tmp_path / "straight")  # bit for bit, and no duplicated lines
    assert_same_weights(final_weights(interrupted), final_weights(tmp_path / "straight"), atol=0)


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import nanotune.train_state as train_state
original = train_state.save_training_state
calls = [0]
def dies_while_writing(folder, *args, **kwargs):
    calls[0] += 1
    if calls[0] == {die_at}:
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "half-written"), "w").write("x")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(folder, *args, **kwargs)
train_state.save_training_state = dies_while_writing
import train_pt
train_pt.main(sys.argv[1:])
"""


def test_sigkill_at_random_moments_and_during_a_checkpoint_write_resumes_to_the_same_end(workspace, tmp_path):
    common = ("--train.batch_size=4", "--train.max_steps=10", "--checkpoint.every_steps=2", "--checkpoint.keep_last=2",
              "--checkpoint.resume=true")
    train_pt.main(pt_args(workspace, tmp_path / "straight", *common))
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # 1) killed by SIGKILL inside the third checkpoint write (step 6): step_6.tmp is left half-written.
    script = KILLER.format(root=str(ROOT), die_at=3)
    result = subprocess.run([sys.executable, "-c", script, *pt_args(workspace, run_dir, *common)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (run_dir / "checkpoints" / "step_6.tmp" / "state" / "half-written").exists()
    # 2) killed at a random moment of a resumed run.
    process = subprocess.Popen([sys.executable, str(ROOT / "train_pt.py"), *pt_args(workspace, run_dir, *common)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and max([json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()
                                          if x.endswith("}")] + [0]) <= 4:
        time.sleep(0.01)
    time.sleep(random.Random(7).uniform(0.0, 0.1))
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    # 3) resumed to the end.
    train_pt.main(pt_args(workspace, run_dir, *common))
    assert_same_weights(final_weights(run_dir), final_weights(tmp_path / "straight"), atol=0)
    assert losses(run_dir) == losses(tmp_path / "straight")
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_tiny_model_overfits_tiny_data_from_both_entry_points(workspace, tmp_path):
    # One document: with several, the first token after BOS would be a guess among them, a loss floor.
    one_line = tmp_path / "one.txt"
    one_line.write_text(corpus_lines(2, seed=9)[1] + "\n", encoding="utf-8")
    pt = ("--train.batch_size=1", "--train.max_steps=200", "--optim.lr=1e-2", "--optim.weight_decay=0",
          "--optim.schedule=constant", f"--data.train_files={one_line}", "--data.seq_len=128", "--log.every_steps=10")
    result = train_pt.main(pt_args(workspace, tmp_path / "pt", *pt))
    assert result.final_loss < 0.05, result.final_loss
    few_chats = tmp_path / "few.jsonl"
    few_chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"问题 {i}"},
                                                          {"role": "assistant", "content": corpus_lines(4, seed=i)[0][:30]}]},
                                            ensure_ascii=False) + "\n" for i in range(4)), encoding="utf-8")
    sft = ("--train.batch_size=4", "--train.max_steps=200", "--optim.lr=1e-2", "--optim.schedule=constant",
           f"--data.train_files={few_chats}", "--log.every_steps=10")
    result = train_sft.main(sft_args(workspace, tmp_path / "sft", *sft))
    assert result.final_loss < 0.05, result.final_loss


def test_embeddings_only_training_changes_only_embeddings_and_head(workspace, tmp_path):
    from nanotune.checkpoint import load_pretrained

    train_pt.main(pt_args(workspace, tmp_path / "base", "--train.batch_size=4", "--train.max_steps=2"))
    base = tmp_path / "base" / "final"
    output = tmp_path / "emb"
    captured = {}
    original_train = train_pt.train

    def capture(config, run, model, *args, **kwargs):
        result = original_train(config, run, model, *args, **kwargs)
        captured["optimizer_params"] = {id(p) for p in model.parameters() if p.requires_grad}
        captured["frozen"] = [n for n, p in model.named_parameters() if not p.requires_grad]
        return result

    train_pt.train = capture
    try:
        train_pt.main(pt_args(workspace, output, f"--model.path={base}", "--train.trainable=embeddings",
                              "--train.batch_size=4", "--train.max_steps=3", "--checkpoint.every_steps=2"))
    finally:
        train_pt.train = original_train
    before, after = load_pretrained(base).state_dict(), load_pretrained(output / "final").state_dict()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in ("model.embed_tokens.weight", "lm_head.weight")), name
    # Frozen parameters have no optimizer state: the checkpoint's optimizer holds only the two trained tensors.
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(output / "checkpoints" / "step_2" / "state")).read_metadata()
    optimizer_keys = {k for k in metadata.state_dict_metadata if k.startswith("optimizer.state.")}
    assert optimizer_keys and all(("embed_tokens" in k or "lm_head" in k) for k in optimizer_keys), optimizer_keys
    assert len(captured["frozen"]) > 0


def run_cli(script, args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_bad_config_and_bad_data_fail_with_one_clear_line_and_write_nothing(workspace, tmp_path):
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[optim]\nlearning_rate = 1e-4\n")
    result = run_cli("train_pt.py", ["--config", str(bad_config), f"--output_dir={tmp_path / 'out1'}"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {bad_config}: unknown key 'optim.learning_rate'; did you mean 'optim.lr'?")
    assert not (tmp_path / "out1").exists()

    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                        '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}\n')
    result = run_cli("train_sft.py", sft_args(workspace, tmp_path / "out2", f"--data.train_files={bad_data}",
                                              "--train.max_steps=1"))
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {bad_data}:2:"), last_line
    assert not (tmp_path / "out2" / "final").exists()


def test_lora_training_changes_only_adapters_loss_falls_and_resume_is_exact(workspace, tmp_path):
    from nanotune.checkpoint import load_pretrained
    from nanotune.lora import load_adapter, read_adapter_tensors

    train_pt.main(pt_args(workspace, tmp_path / "base", "--train.batch_size=4", "--train.max_steps=2"))
    base = tmp_path / "base" / "final"
    lora = (f"--model.path={base}", "--lora.r=8", "--lora.alpha=16", "--lora.dropout=0.1",
            '--lora.targets=all-linear', "--train.batch_size=4", "--train.max_steps=12",
            "--optim.lr=3e-2", "--checkpoint.every_steps=6", "--checkpoint.resume=true", "--log.every_steps=1")
    trained = {}
    original_train = train_sft.train

    def capture(config, run, model, *args, **kwargs):
        result = original_train(config, run, model, *args, **kwargs)
        trained.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return result

    train_sft.train = capture
    try:
        train_sft.main(sft_args(workspace, tmp_path / "straight", *lora))
    finally:
        train_sft.train = original_train
    base_state = load_pretrained(base).state_dict()
    for name, value in trained.items():
        if ".lora_" in name:
            continue
        assert torch.equal(value, base_state[name]), f"{name} changed"
    curve = losses(tmp_path / "straight")
    straight = tmp_path / "straight" / "final"
    assert (straight / "adapter_config.json").exists() and not (straight / "model.safetensors").exists()
    # The adapter checkpoint holds only what trains.
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(tmp_path / "straight" / "checkpoints" / "step_6" / "state")).read_metadata()
    model_keys = [k for k in metadata.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys

    # Resume: a second run to step 12, then as if it had died after its step-6 checkpoint, resumed.
    resumed = tmp_path / "resumed"
    train_sft.main(sft_args(workspace, resumed, *lora))
    import shutil

    shutil.rmtree(resumed / "final")
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step_6"]
    train_sft.main(sft_args(workspace, resumed, *lora))
    a, b = read_adapter_tensors(straight), read_adapter_tensors(resumed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(resumed) == curve
    # The loss on the training conversations falls: the base alone versus the base with the adapter.
    from nanotune.data.formats import read_conversations
    from nanotune.evaluate import conversation_loss
    from nanotune.tokenizer import Tokenizer

    tokenizer, conversations = Tokenizer.from_file(workspace["tokenizer"]), read_conversations(workspace["chat"])
    before = conversation_loss(load_pretrained(base), tokenizer, conversations, "chatml", progress=False)["loss"]
    adapted = load_adapter(load_pretrained(base), straight)
    after = conversation_loss(adapted, tokenizer, conversations, "chatml", progress=False)["loss"]
    assert after < before - 0.05, (before, after)
    assert torch.equal(adapted.model.layers[0].self_attn.q_proj.lora_B.weight,
                       trained["model.layers.0.self_attn.q_proj.lora_B.weight"])


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_sft_sequences_are_limited_to_the_model_positions_with_one_warning(workspace, tmp_path, caplog, truncation):
    captured = {}
    original_train = train_sft.train

    def capture(config, run, model, tokenizer, train_data, *args, **kwargs):
        captured["data"] = train_data
        return original_train(config, run, model, tokenizer, train_data, *args, **kwargs)

    train_sft.train = capture
    try:
        with caplog.at_level("INFO", logger="nanotune"):
            train_sft.main(sft_args(workspace, tmp_path / truncation, "--model.max_position_embeddings=40",
                                    "--data.template=llama2",
                                    "--data.max_length=64", f"--data.truncation={truncation}",
                                    "--train.batch_size=2", "--train.max_steps=1"))
    finally:
        train_sft.train = original_train
    data = captured["data"]
    assert max(data.lengths) <= 40
    warnings = [r.getMessage() for r in caplog.records if "max_position_embeddings" in r.getMessage()]
    assert len(warnings) == 1
    assert "data.max_length 64 is more than the model's max_position_embeddings 40" in warnings[0]
    assert "rope scaling is the way to go longer" in warnings[0]
    counted = "truncated" if truncation == "truncate" else "dropped"
    assert data.stats[counted] > 0
    assert any("dropped as longer than 40 tokens" in r.getMessage() for r in caplog.records)  # the data log line


def test_pretraining_blocks_longer_than_the_model_positions_are_refused_before_tokenising(workspace, tmp_path):
    from nanotune.config import ConfigError

    args = pt_args(workspace, tmp_path / "out", "--model.max_position_embeddings=16", "--train.max_steps=1",
                   f"--data.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError) as error:
        train_pt.main(args)
    message = str(error.value)
    assert "\n" not in message and "data.seq_len 32 is more than the model's max_position_embeddings 16" in message
    assert "rope scaling is the way to go longer" in message
    assert not (tmp_path / "cache").exists()  # nothing was tokenised


def test_sft_with_two_weighted_files_draws_each_by_its_weight_end_to_end(workspace, tmp_path):
    from nanotune.config import load_config
    from nanotune.data.sampler import MixedDataset

    conversations = workspace["chat"].read_text(encoding="utf-8").splitlines()
    (tmp_path / "big.jsonl").write_text("\n".join(conversations[:30]) + "\n", encoding="utf-8")
    (tmp_path / "small.jsonl").write_text("\n".join(conversations[30:]) + "\n", encoding="utf-8")
    fetched = []

    class Recording(MixedDataset):  # the indices the loop reads, in order
        def __getitem__(self, index):
            fetched.append(index)
            return super().__getitem__(index)

    original_train = train_sft.train

    def capture(config, run, model, tokenizer, train_data, *args, **kwargs):
        assert isinstance(train_data, MixedDataset) and len(train_data) == 40
        recording = Recording(train_data.parts, train_data.weights, train_data.names)
        return original_train(config, run, model, tokenizer, recording, *args, **kwargs)

    files = f'[{{path = "{tmp_path / "big.jsonl"}", weight = 1}}, {{path = "{tmp_path / "small.jsonl"}", weight = 3}}]'
    train_sft.train = capture
    try:
        result = train_sft.main(sft_args(workspace, tmp_path / "out", f"--data.train_files={files}",
                                         "--data.template=llama2", "--data.max_length=256", "--train.batch_size=4",
                                         "--train.max_steps=20"))
    finally:
        train_sft.train = original_train
    assert result.steps == 20 and len(fetched) == 80  # two epochs of 40 samples
    from_small = [i for i in fetched if i >= 30]
    assert len(from_small) == 60  # 3/4 of each epoch from the 10 small-file conversations
    assert sorted(np.bincount(from_small, minlength=40)[30:].tolist()) == [6] * 10  # each 3 times an epoch
    assert len(set(i for i in fetched if i < 30)) == 20  # 10 an epoch from the big file, no repeat yet
    saved = load_config(["--config", str(tmp_path / "out" / "final" / "training_config.toml")],
                        data_class=train_sft.SFTDataConfig)
    assert [f.weight for f in saved.data.train_files] == [1.0, 3.0]
