"""GRPO against its oracles: formulas worked by hand, autograd through full logits, an
uninterrupted run, one process, and one-line errors before the model loads."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import corpus_lines, tiny_model, train_sentencepiece
from test_distributed import torchrun
from test_train import assert_same_weights, final_weights

import train_grpo
from nanotune.config import GRPOConfig, RunConfig
from nanotune.data.prompts import PromptRecord
from nanotune.distributed import Run
from nanotune.grpo import completion_batch, micro_batch_loss, reference_logprobs, sample_completions
from nanotune.grpo_loss import clipped_policy_term, group_advantages, grpo_loss_sum, loss_units
from nanotune.loss import IGNORE_INDEX
from nanotune.rewards import char_overlap, exact_number, format_reward, last_number

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# 1. The formulas, on a group worked by hand
# ----------------------------------------------------------------------------------------------

# Two prompts, G = 3 completions each, of 3, 1, 2 and 2, 3, 1 tokens (T = 3, the rest padding).
REWARDS = [[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]]
LENGTHS = [3, 1, 2, 2, 3, 1]
LOGPROBS = [[-0.5, -1.0, -0.2], [-2.0, 0, 0], [-0.1, -0.3, 0], [-1.5, -0.7, 0], [-0.4, -0.9, -1.1], [-0.05, 0, 0]]
OLD = [[-0.6, -0.7, -0.2], [-1.5, 0, 0], [-0.4, -0.3, 0], [-1.5, -1.2, 0], [-0.4, -0.5, -1.3], [-0.3, 0, 0]]
REF = [[-0.4, -1.2, -0.3], [-2.2, 0, 0], [-0.2, -0.2, 0], [-1.0, -0.8, 0], [-0.6, -0.9, -1.0], [-0.1, 0, 0]]
EPS_LOW, EPS_HIGH, BETA, STD_EPS = 0.2, 0.28, 0.1, 1e-4


def by_hand(scale: bool, normalization: str, beta: float = BETA):
    """The advantages and the loss written out with Python floats, term by term."""
    advantages = []
    for group in REWARDS:
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))  # Bessel's, as TRL
        advantages += [(r - mean) / (std + STD_EPS) if scale else r - mean for r in group]
    total, units = 0.0, 0
    for i, n in enumerate(LENGTHS):
        a, sequence_sum = advantages[i], 0.0
        for t in range(n):
            ratio = math.exp(LOGPROBS[i][t] - OLD[i][t])
            clipped = min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH)
            policy = -min(ratio * a, clipped * a)
            x = math.exp(REF[i][t] - LOGPROBS[i][t])
            kl = x - math.log(x) - 1
            sequence_sum += policy + beta * kl
        total += sequence_sum if normalization == "dapo" else sequence_sum / n
        units += n if normalization == "dapo" else 1
    return advantages, total / units


def hand_worked_tensors():
    """In float64, so that the comparison with the Python floats is about the formulas, not rounding."""
    mask = torch.tensor([[t < n for t in range(3)] for n in LENGTHS])
    f64 = dict(dtype=torch.float64)
    return torch.tensor(LOGPROBS, requires_grad=True, **f64), torch.tensor(OLD, **f64), torch.tensor(REF, **f64), mask


@pytest.mark.parametrize("normalization", ["dapo", "sequence"])
@pytest.mark.parametrize("scale", [True, False], ids=["std", "no_std"])
def test_advantages_and_loss_of_a_hand_worked_group_equal_the_written_formulas(scale, normalization):
    expected_advantages, expected_loss = by_hand(scale, normalization)
    advantages = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), scale=scale, eps=STD_EPS).flatten()
    torch.testing.assert_close(advantages, torch.tensor(expected_advantages, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    logprobs, old, ref, mask = hand_worked_tensors()
    loss_sum, sums = grpo_loss_sum(logprobs, old, ref, advantages, mask, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                                   beta=BETA, normalization=normalization)
    loss = loss_sum / loss_units(mask, normalization)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert sums["tokens"] == sum(LENGTHS)
    assert 0 < sums["clipped"] < sum(LENGTHS)  # the numbers were chosen so that some tokens clip
    assert sums["kl"] > 0


def test_a_group_of_equal_rewards_has_zero_advantage_with_or_without_the_std():
    rewards = torch.tensor([[0.7, 0.7, 0.7, 0.7]])
    assert torch.equal(group_advantages(rewards, scale=True), torch.zeros(1, 4))
    assert torch.equal(group_advantages(rewards, scale=False), torch.zeros(1, 4))


# ----------------------------------------------------------------------------------------------
# 2. One pass, beta 0: the loss reads (nearly) 0, the gradient does not
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["dapo", "sequence"])
def test_one_pass_with_beta_0_has_ratio_exactly_1_the_mean_advantage_as_loss_and_a_nonzero_gradient(normalization):
    logprobs, _, _, mask = hand_worked_tensors()
    advantages = group_advantages(torch.tensor(REWARDS, dtype=torch.float64)).flatten()
    _, ratio = clipped_policy_term(logprobs, logprobs.detach(), advantages, EPS_LOW, EPS_HIGH)
    assert torch.equal(ratio, torch.ones_like(ratio))
    loss_sum, sums = grpo_loss_sum(logprobs, None, None, advantages, mask, normalization=normalization)
    loss = loss_sum / loss_units(mask, normalization)
    lengths = torch.tensor(LENGTHS, dtype=torch.float64)
    if normalization == "dapo":  # -sum_i A_i |o_i| / sum_i |o_i|: not 0, as the lengths differ
        expected = -(advantages * lengths).sum() / lengths.sum()
    else:  # -mean_i A_i: 0 up to rounding, the advantages of a group add up to 0
        expected = -advantages.mean()
        assert abs(loss.item()) < 1e-12
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert sums["clipped"] == 0
    (gradient,) = torch.autograd.grad(loss, logprobs)
    # the REINFORCE gradient: -A_i * weight of each token
    weights = mask.float() if normalization == "dapo" else mask.float() / lengths[:, None]
    torch.testing.assert_close(gradient, -advantages[:, None] * weights / loss_units(mask, normalization))
    assert gradient.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# The gradient through the model: chunked per-token log-probs against full logits
# ----------------------------------------------------------------------------------------------


def records_and_completions(seed: int = 0):
    rng = random.Random(seed)
    records = [PromptRecord(prompt=f"p{i}", messages=[], input_ids=[1] + [rng.randrange(3, 256) for _ in range(n)])
               for i, n in enumerate((4, 7))]
    completions = [[rng.randrange(3, 256) for _ in range(n)] for n in (5, 2, 6, 1, 3, 4)]
    return records, completions


@pytest.mark.parametrize("normalization", ["dapo", "sequence"])
def test_loss_gradient_equals_autograd_through_full_logits(normalization):
    torch.manual_seed(0)
    model = tiny_model(seed=3, loss_chunk_tokens=5)
    records, completions = records_and_completions()
    advantages = torch.tensor([1.2, -0.3, -0.9, 0.4, 0.1, -0.5])
    batch = completion_batch(records, completions, advantages, pad_id=0, device="cpu")
    with torch.no_grad():  # a sampling policy and a reference that differ from the model being trained
        logits = model(batch["input_ids"]).float()
        noise = 0.3 * torch.randn(logits.shape[:2])
        current = F.log_softmax(logits, -1).gather(-1, batch["labels"].clamp(min=0)[..., None]).squeeze(-1)
        batch["old_logprobs"] = (current + noise) * batch["mask"]
        batch["ref_logprobs"] = (current - noise.flip(0)) * batch["mask"]
    config = RunConfig(grpo=GRPOConfig(beta=0.05, epsilon_low=0.1, epsilon_high=0.15, loss_normalization=normalization))

    loss_sum, sums = micro_batch_loss(model, batch, config)
    ours = torch.autograd.grad(loss_sum, list(model.parameters()))

    full = F.log_softmax(model(batch["input_ids"]).float(), dim=-1)  # (B, T, V): the oracle
    logprobs = full.gather(-1, batch["labels"].clamp(min=0)[..., None]).squeeze(-1) * batch["mask"]
    expected_sum, _ = grpo_loss_sum(logprobs, batch["old_logprobs"], batch["ref_logprobs"], advantages, batch["mask"],
                                    epsilon_low=0.1, epsilon_high=0.15, beta=0.05, normalization=normalization)
    theirs = torch.autograd.grad(expected_sum, list(model.parameters()))
    assert loss_sum.item() == pytest.approx(expected_sum.item(), rel=1e-5)
    assert 0 < sums["clipped"] < sums["tokens"]
    for (name, _), a, b in zip(model.named_parameters(), ours, theirs):
        assert float((a - b).norm() / b.norm()) < 1e-5, name


def test_completion_batch_labels_exactly_the_completion_tokens():
    records, completions = records_and_completions()
    batch = completion_batch(records, completions, torch.zeros(6), pad_id=0, device="cpu")
    for row, tokens in enumerate(completions):
        prompt = records[row // 3].input_ids
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert labelled == tokens
        # the label at t is the token at t + 1: the first completion token is predicted by the prompt's last
        assert batch["labels"][row, len(prompt) - 1] == tokens[0]
        assert batch["input_ids"][row, : len(prompt) + len(tokens)].tolist() == prompt + tokens


def test_lora_reference_is_the_model_with_its_adapters_off():
    from nanotune.lora import apply_lora

    base = tiny_model(seed=4)
    model = tiny_model(seed=4)
    apply_lora(model, r=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    records, completions = records_and_completions()
    batch = completion_batch(records, completions, torch.zeros(6), pad_id=0, device="cpu")
    with torch.no_grad():
        from nanotune.grpo import completion_logprobs

        with_lora = completion_logprobs(model, batch).logprobs
        reference = reference_logprobs("lora", model, batch)
        expected = completion_logprobs(base, batch).logprobs
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    assert (with_lora - expected).abs().max() > 1e-3  # the adapters do change the policy
    torch.testing.assert_close(completion_logprobs(model, batch).logprobs, with_lora)  # switched back on


# ----------------------------------------------------------------------------------------------
# 3. Sampling: a fixed seed, any split
# ----------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_and_a_prompt_samples_alike_in_any_micro_batch():
    model = tiny_model(seed=5)
    records, _ = records_and_completions()
    records.append(PromptRecord(prompt="p2", messages=[], input_ids=[1, 9, 9, 9]))
    config = RunConfig(seed=11, grpo=GRPOConfig(group_size=3, max_new_tokens=10, temperature=1.0))
    run = Run()

    def sample(chosen, indices, step=4, seed=11):
        config.seed = seed
        return sample_completions(model, chosen, indices, step, config, run, stop_ids=[2], pad_id=0)

    together = sample(records, [0, 1, 2])
    assert together == sample(records, [0, 1, 2])  # the same seed and step: the same completions
    assert sample(records[2:], [2]) + sample(records[:2], [0, 1]) == together[6:] + together[:6]  # any split
    assert sample(records, [0, 1, 2], step=5) != together
    assert sample(records, [0, 1, 2], seed=12) != together
    assert len({tuple(c) for c in together[:3]}) > 1  # a group's completions differ from one another


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------


def test_builtin_rewards_score_as_documented():
    assert last_number("so 12,345.5 apples, not 3") == 3 and last_number("1,234") == 1234 and last_number("none") is None
    assert exact_number(None, ["7 + 5 = 12", "= 12.0", "13", "no number"], answer=["12", "12", "12", 12]) == [1, 1, 0, 0]
    matches = format_reward(r"<answer>\d+</answer>")
    assert matches(None, ["<answer>42</answer>", " <answer>42</answer>\n", "<answer>4 2</answer>"]) == [1, 1, 0]
    scores = char_overlap(None, ["气血不足", "气血", "完全无关", "气 血 不 足"], answer=["气血不足"] * 4)
    assert scores[0] == 1.0 and scores[1] == pytest.approx(2 * 1 * 0.5 / 1.5) and scores[2] == 0.0 and scores[3] == 1.0


# ----------------------------------------------------------------------------------------------
# End to end: resume after SIGKILL, FSDP, errors
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo")
    sums = [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)]
    tokenizer = train_sentencepiece(folder, vocab_size=400, lines=corpus_lines(150, seed=1) + sums)
    rng = random.Random(0)
    with open(folder / "prompts.jsonl", "w", encoding="utf-8") as f:
        for _ in range(16):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"{a} + {b} =", "answer": str(a + b)}) + "\n")
    (folder / "my_rewards.py").write_text(
        "def short(prompts, completions, **fields):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    return {"tokenizer": tokenizer, "prompts": folder / "prompts.jsonl", "rewards": folder / "my_rewards.py",
            "root": folder}


def grpo_args(ws, output_dir, *extra):
    return [
        f"--output_dir={output_dir}", f"--tokenizer.path={ws['tokenizer']}", f"--data.train_files={ws['prompts']}",
        "--data.template=base", "--model.hidden_size=32", "--model.intermediate_size=64",
        "--model.num_hidden_layers=2", "--model.num_attention_heads=4", "--model.num_key_value_heads=2",
        "--grpo.group_size=4", "--grpo.max_new_tokens=6", "--optim.lr=3e-3", "--log.every_steps=1",
        "--log.progress_bar=false", f"--grpo.rewards=[\"char_overlap\", \"{ws['rewards']}:short\"]",
        "--grpo.reward_weights=[1.0, 0.5]", *extra,
    ]


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_every_figure_and_resumes_after_sigkill_to_the_uninterrupted_weights(workspace, tmp_path):
    common = ("--train.batch_size=2", "--train.max_steps=6", "--checkpoint.every_steps=2", "--checkpoint.keep_last=3",
              "--checkpoint.resume=true", "--grpo.num_iterations=2", "--grpo.beta=0.1")
    train_grpo.main(grpo_args(workspace, tmp_path / "straight", *common))
    lines = records(tmp_path / "straight")
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "reward", "reward_std", "reward_char_overlap", "reward_char_overlap_std", "reward_short",
                "completion_length", "clip_fraction", "kl", "entropy", "sampling_tokens_per_s", "train_tokens_per_s",
                "grad_norm", "lr", "frac_flat_groups", "truncated_fraction"):
        assert all(math.isfinite(r[key]) for r in lines), key
    assert any(r["clip_fraction"] > 0 for r in lines)  # the second pass moved the policy past the clip

    run_dir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(ROOT / "train_grpo.py"), *grpo_args(workspace, run_dir, *common)],
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "final").exists()
    train_grpo.main(grpo_args(workspace, run_dir, *common))
    assert_same_weights(final_weights(run_dir), final_weights(tmp_path / "straight"), atol=1e-6)
    resumed = records(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["reward"] for r in resumed] == pytest.approx([r["reward"] for r in lines], abs=1e-6)


def test_fsdp_on_two_ranks_equals_one_process_with_the_same_prompts(workspace, tmp_path):
    """2 ranks x 2 prompts against 1 process x 4 prompts in one micro-batch: each prompt samples the
    same completions wherever it lands, and the loss is normalised over the global batch."""
    common = ("--train.max_steps=3", "--grpo.beta=0.1", "--grpo.reference=copy", "--grpo.loss_normalization=sequence")
    torchrun("train_grpo.py", grpo_args(workspace, tmp_path / "fsdp", "--train.batch_size=2", *common))
    train_grpo.main(grpo_args(workspace, tmp_path / "single", "--train.batch_size=4", *common))
    fsdp, single = records(tmp_path / "fsdp"), records(tmp_path / "single")
    for key in ("reward", "reward_std", "completion_length", "loss", "kl"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in single], abs=1e-5), key
    assert_same_weights(final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "single"), atol=1e-5)


def test_lora_grpo_trains_only_the_adapter(workspace, tmp_path):
    train_grpo.main(grpo_args(workspace, tmp_path / "lora", "--train.batch_size=4", "--train.max_steps=2",
                              "--lora.r=4", "--lora.dropout=0.0", "--grpo.beta=0.1"))
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").exists()
    assert "kl" in records(tmp_path / "lora")[-1]


def run_cli(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train_grpo.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


@pytest.mark.parametrize("spec, message", [
    ("exact_numbr", "grpo.rewards: 'exact_numbr' is not a built-in (exact_number, format, char_overlap) nor "
                    "module:function or path/to/file.py:function"),
    ("no_such_module:score", "grpo.rewards: 'no_such_module:score': no module 'no_such_module' (is it on the Python path?)"),
    ("missing.py:score", "grpo.rewards: 'missing.py:score': no file missing.py"),
    ("{rewards}:nothing", "grpo.rewards: '{rewards}:nothing': {rewards} has no 'nothing'"),
    ("exact_number", "{prompts}:1: no field 'answer', which the exact_number reward reads"),
])
def test_a_bad_reward_spec_or_missing_field_is_one_line_before_the_model_loads(workspace, tmp_path, spec, message):
    prompts = workspace["prompts"]
    if spec == "exact_number":  # data without the field the built-in reads
        prompts = tmp_path / "no_answer.jsonl"
        prompts.write_text('{"prompt": "1 + 1 ="}\n')
    spec, message = (text.format(rewards=workspace["rewards"], prompts=prompts) for text in (spec, message))
    result = run_cli(grpo_args(workspace, tmp_path / "out", f"--grpo.rewards=[\"{spec}\"]", "--grpo.reward_weights=[]",
                               f"--data.train_files={prompts}"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "trainable parameters" not in result.stderr  # refused before the model was built
    assert not (tmp_path / "out").exists()


def test_bad_prompt_records_and_bad_grpo_values_are_one_line(workspace, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n'
                   '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    result = run_cli(grpo_args(workspace, tmp_path / "out", f"--data.train_files={bad}"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {bad}:2: field 'messages': a prompt ends with a user turn (the reply is what is sampled)")
    result = run_cli(grpo_args(workspace, tmp_path / "out", "--grpo.group_size=1"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: grpo.group_size must be >= 2 (advantages compare completions of one prompt), not 1")
    assert not (tmp_path / "out").exists()


def test_the_example_configs_load():
    from nanotune.config import PromptDataConfig, SFTDataConfig, load_config

    grpo = load_config(["--config", str(ROOT / "examples" / "arith_grpo" / "grpo.toml")], PromptDataConfig)
    assert grpo.grpo.rewards == ["exact_number"] and grpo.grpo.group_size == 8
    sft = load_config(["--config", str(ROOT / "examples" / "arith_grpo" / "sft.toml")], SFTDataConfig)
    assert sft.data.template == grpo.data.template == "base"  # GRPO prompts are laid out as SFT's were
