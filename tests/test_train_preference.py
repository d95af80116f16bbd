"""train_dpo.py and train_rm.py on the loop: accumulation, layouts, references, resume, FSDP, the HF reward model."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import corpus_lines, train_sentencepiece
from test_distributed import torchrun
from test_train import assert_same_weights, final_weights, losses

import train_dpo
import train_rm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tokenizer and 24 pairs of uneven lengths, some with a two-turn prompt."""
    folder = tmp_path_factory.mktemp("pref")
    tokenizer = train_sentencepiece(folder, vocab_size=512, lines=corpus_lines(300, seed=1))
    rng, lines = random.Random(0), corpus_lines(90, seed=3)
    with open(folder / "pairs.jsonl", "w", encoding="utf-8") as f:
        for i in range(24):
            prompt = [{"role": "user", "content": lines[i][: rng.randint(5, 30)]}]
            if i % 4 == 0:
                prompt = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": lines[i + 60][:8]}] + prompt
            f.write(json.dumps({"prompt": prompt, "chosen": lines[i + 30][: rng.randint(3, 20)],
                                "rejected": lines[i + 60][: rng.randint(3, 20)]}, ensure_ascii=False) + "\n")
    return {"tokenizer": tokenizer, "pairs": folder / "pairs.jsonl", "root": folder}


def args(ws, output_dir, *extra):
    return [
        f"--output_dir={output_dir}", f"--tokenizer.path={ws['tokenizer']}", f"--data.train_files={ws['pairs']}",
        "--data.max_length=160", "--data.template=chatml", f"--data.cache_dir={ws['root'] / 'cache'}",
        "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
        "--model.num_attention_heads=4", "--model.num_key_value_heads=2",
        "--optim.lr=3e-3", "--log.every_steps=1", "--log.progress_bar=false", *extra,
    ]


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", [(), ("--data.packing=true",), ("--dpo.share_prompt=true",)])
def test_dpo_gradient_accumulation_equals_one_big_batch(workspace, tmp_path, layout):
    # lr 1e-3: Adam divides by the root of the gradient's square, so float noise of one batch shape
    # against another (1e-7 relative) is magnified most where gradients are near zero.
    steps = ("--train.max_steps=3", "--dpo.sft_weight=0.2", "--optim.lr=1e-3", *layout)
    batch = 8 if not layout else 4  # packed: items are rows of several pairs
    train_dpo.main(args(workspace, tmp_path / "big", f"--train.batch_size={batch}", *steps))
    train_dpo.main(args(workspace, tmp_path / "accum", f"--train.batch_size={batch // 4}", "--train.grad_accum=4", *steps))
    assert len(losses(tmp_path / "big")) == 3
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "big"), abs=1e-5)
    assert_same_weights(final_weights(tmp_path / "accum"), final_weights(tmp_path / "big"), atol=1e-5)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "pairs_per_s"} <= records(tmp_path / "big")[0].keys()


def rows_of(ws, layout_flag, template="chatml") -> int:
    from nanotune.build import load_tokenizer
    from nanotune.config import PreferenceDataConfig, load_config
    from nanotune.preference import batching, encode_pair_files

    config = load_config(args(ws, "unused", layout_flag), PreferenceDataConfig)
    tokenizer = load_tokenizer(config)
    pairs, _ = encode_pair_files(config, tokenizer, template)
    return len(batching(pairs, "shared" if "share" in layout_flag else "packed", tokenizer.pad_id, 160)[0])


@pytest.mark.parametrize("layout_flag", ["--data.packing=true", "--dpo.share_prompt=true"])
def test_packed_and_shared_prompt_equal_padded_on_the_whole_set(workspace, tmp_path, layout_flag):
    steps = ("--train.max_steps=3", "--dpo.loss=ipo")
    train_dpo.main(args(workspace, tmp_path / "padded", "--train.batch_size=24", *steps))
    rows = rows_of(workspace, layout_flag)
    assert rows < 24
    train_dpo.main(args(workspace, tmp_path / "packed", f"--train.batch_size={rows}", layout_flag, *steps))
    padded, packed = records(tmp_path / "padded"), records(tmp_path / "packed")
    for a, b in zip(padded, packed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        for key in ("rewards/margins", "logps/chosen", "logps/rejected"):  # sums of ~100 fp32 token log-probs
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-5), key
    assert_same_weights(final_weights(tmp_path / "packed"), final_weights(tmp_path / "padded"), atol=1e-5)
    assert packed[0]["tokens_per_s"] > 0


def test_lora_off_and_precomputed_references_train_like_the_frozen_copy(workspace, tmp_path):
    lora = ("--lora.r=4", "--lora.alpha=8", "--lora.targets=all-linear", "--lora.dropout=0", "--optim.lr=3e-2",
            "--train.batch_size=4", "--train.max_steps=4", "--data.packing=true")
    runs = {}
    for kind in ("copy", "lora", "precomputed"):
        train_dpo.main(args(workspace, tmp_path / kind, *lora, f"--dpo.reference={kind}"))
        runs[kind] = records(tmp_path / kind)
    assert list((workspace["root"] / "cache").glob("reference_logps-*.json"))
    assert abs(runs["copy"][-1]["rewards/margins"]) > 1e-4  # the policy moved: a wrong reference would show
    for kind in ("lora", "precomputed"):
        for ours, frozen in zip(runs[kind], runs["copy"]):
            for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
                assert ours[key] == pytest.approx(frozen[key], abs=1e-6), (kind, key)


def test_dpo_resumes_after_sigkill_to_the_same_end(workspace, tmp_path):
    common = ("--train.batch_size=4", "--train.max_steps=8", "--checkpoint.every_steps=2", "--checkpoint.resume=true",
              "--dpo.reference=precomputed")
    train_dpo.main(args(workspace, tmp_path / "straight", *common))
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "train_dpo.py"), *args(workspace, run_dir, *common)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and max([json.loads(x).get("step", 0) for x in
                                          (metrics.read_text().splitlines() if metrics.exists() else [])
                                          if x.endswith("}")] + [0]) <= 4:
        time.sleep(0.01)
    time.sleep(random.Random(3).uniform(0.0, 0.05))
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    train_dpo.main(args(workspace, run_dir, *common))
    assert losses(run_dir) == losses(tmp_path / "straight")
    assert_same_weights(final_weights(run_dir), final_weights(tmp_path / "straight"), atol=0)


# ----------------------------------------------------------------------------------------------
# Reward models
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_run(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "rm"
    train_rm.main(args(workspace, out, "--train.batch_size=4", "--train.max_steps=4", "--data.template=llama2",
                       "--reward.margin=0.1", "--data.valid_fraction=0.25"))
    return out


def test_reward_model_loads_in_transformers_with_equal_scores(workspace, reward_run):
    import transformers

    from nanotune.data.preference import PreferenceCollator, build_preference_dataset
    from nanotune.preference import load_reward_model, sequence_scores
    from nanotune.tokenizer import Tokenizer

    config = json.loads((reward_run / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(reward_run / "final").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    ours = load_reward_model(reward_run / "final")
    tokenizer = Tokenizer.from_file(reward_run / "final")
    pairs = build_preference_dataset([workspace["pairs"]], tokenizer, "llama2", max_length=160).samples[:6]
    assert pairs[0]["chosen"][-1] == tokenizer.eos_id == tokenizer.pad_id  # the case HF's pad search gets wrong
    assert config["pad_token_id"] != tokenizer.eos_id
    with torch.no_grad():
        scores = sequence_scores(ours, PreferenceCollator(tokenizer.pad_id)(pairs))
        sequences = [p["prompt"] + p[k] for p in pairs for k in ("chosen", "rejected")]
        T = max(map(len, sequences))
        padded = torch.tensor([s + [config["pad_token_id"]] * (T - len(s)) for s in sequences])  # right-padded, HF's way
        hf_scores = hf(padded, attention_mask=(torch.arange(T) < torch.tensor([len(s) for s in sequences])[:, None]).long()).logits
    torch.testing.assert_close(scores, hf_scores[:, 0], atol=1e-5, rtol=0)
    assert scores.std() > 0


def test_reward_training_logs_accuracy_and_evaluate_scores_pairs(workspace, reward_run, tmp_path):
    last = records(reward_run)[-1]
    assert 0.0 <= last["eval_rewards/accuracies"] <= 1.0 and last["eval_pairs"] == 6
    result = subprocess.run([sys.executable, "-m", "nanotune.evaluate", "--model", str(reward_run / "final"),
                             "--pairs", str(workspace["pairs"]), "--template", "llama2", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(result.stdout)
    assert scored["n_pairs"] == 24 and 0.0 <= scored["accuracy"] <= 1.0 and scored["scorer"] == "reward"


def test_reward_gradient_accumulation_and_shared_prompt_equal_one_padded_batch(workspace, tmp_path):
    steps = ("--train.max_steps=3", "--data.template=llama2", "--optim.lr=1e-3")  # lr: see the DPO test
    train_rm.main(args(workspace, tmp_path / "big", "--train.batch_size=24", *steps))
    rows = rows_of(workspace, "--dpo.share_prompt=true", "llama2")
    accumulate = ("--train.grad_accum=2", f"--train.batch_size={rows // 2}") if rows % 2 == 0 else (f"--train.batch_size={rows}",)
    train_rm.main(args(workspace, tmp_path / "accum", "--reward.share_prompt=true", *accumulate, *steps))
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "big"), abs=1e-5)
    assert_same_weights(final_weights(tmp_path / "accum"), final_weights(tmp_path / "big"), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Two ranks
# ----------------------------------------------------------------------------------------------


def test_fsdp_dpo_and_reward_model_equal_one_process(workspace, tmp_path):
    dpo = ("--train.max_steps=3", "--data.packing=true", "--dpo.reference=copy")
    torchrun("train_dpo.py", args(workspace, tmp_path / "dpo_fsdp", "--train.batch_size=1", "--train.grad_accum=2", *dpo))
    train_dpo.main(args(workspace, tmp_path / "dpo_single", "--train.batch_size=4", *dpo))
    assert losses(tmp_path / "dpo_fsdp") == pytest.approx(losses(tmp_path / "dpo_single"), abs=1e-5)
    assert_same_weights(final_weights(tmp_path / "dpo_fsdp"), final_weights(tmp_path / "dpo_single"), atol=1e-5)
    rm = ("--train.max_steps=3", "--dpo.share_prompt=false", "--reward.share_prompt=true")
    torchrun("train_rm.py", args(workspace, tmp_path / "rm_fsdp", "--train.batch_size=1", "--train.grad_accum=2", *rm))
    train_rm.main(args(workspace, tmp_path / "rm_single", "--train.batch_size=4", *rm))
    assert losses(tmp_path / "rm_fsdp") == pytest.approx(losses(tmp_path / "rm_single"), abs=1e-5)
    assert_same_weights(final_weights(tmp_path / "rm_fsdp"), final_weights(tmp_path / "rm_single"), atol=1e-5)
