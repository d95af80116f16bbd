"""Preference objectives against their oracles: transformers' logits, the formulas written out, TRL's
loss functions, autograd through full logits, and the three ways of having a reference model."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import hf_llama_from, tiny_model

from nanotune import preference
from nanotune.data.preference import PreferenceCollator, pair_length
from nanotune.loss import IGNORE_INDEX
from nanotune.preference import (
    AdaptersOff, FrozenCopy, PairLogprobs, PreferenceObjective, Precomputed, RewardObjective, add_score_head,
    compute_reference_logprobs, pair_logprobs, preference_losses, sequence_scores,
)

LAYOUTS = ["padded", "packed", "shared"]


def random_pairs(n: int = 5, seed: int = 0, vocab_size: int = 256) -> list[dict]:
    """Pairs of random token ids, prompts of uneven length about half of each sequence."""
    generator = torch.Generator().manual_seed(seed)

    def ids(low, high):
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(3, vocab_size, (length,), generator=generator).tolist()

    return [{"prompt": ids(2, 12), "chosen": ids(1, 9), "rejected": ids(1, 9)} for _ in range(n)]


def collate(pairs, layout):
    row_length = max(pair_length(p, layout) for p in pairs) * 3
    if layout == "padded":
        return PreferenceCollator(0, "padded")(pairs)
    rows = [pairs[i : i + 2] for i in range(0, len(pairs), 2)]  # two pairs to a row, three rows
    return PreferenceCollator(0, layout, row_length=row_length)([{"pairs": row} for row in rows])


def hf_reply_logprobs(hf, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: each prompt + reply alone through transformers, log_softmax of its logits."""
    out = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for pair in pairs:
            for name in out:
                ids = torch.tensor(pair["prompt"] + pair[name])[None]
                logprobs = F.log_softmax(hf(ids).logits[0].double(), dim=-1)  # (T, V)
                P = len(pair["prompt"])
                targets = ids[0, P:]
                out[name].append(logprobs[P - 1 : -1].gather(1, targets[:, None]).sum())
    return torch.stack(out["chosen"]), torch.stack(out["rejected"])


@pytest.mark.parametrize("packed_attention", ["spans", "mask"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sequence_logprobs_equal_transformers_padded_packed_and_shared(layout, packed_attention):
    model = tiny_model(packed_attention=packed_attention, loss_chunk_tokens=7)
    pairs = random_pairs()
    chosen, rejected = hf_reply_logprobs(hf_llama_from(model), pairs)
    with torch.no_grad():
        ours = pair_logprobs(model, collate(pairs, layout))
    torch.testing.assert_close(ours.chosen.double(), chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.rejected.double(), rejected, atol=1e-5, rtol=0)
    assert ours.chosen_tokens.tolist() == [len(p["chosen"]) for p in pairs]


def test_shared_layout_keeps_the_prompt_once_and_replies_apart():
    pairs = random_pairs(2)
    batch = collate(pairs, "shared")
    P0, C0, R0 = (len(pairs[0][k]) for k in ("prompt", "chosen", "rejected"))
    assert int((batch["document_ids"][0] == 0).sum()) == P0 + C0 + R0 + 1  # prompt once, its last token twice
    positions = batch["position_ids"][0, : P0 + C0 + R0 + 1].tolist()
    assert positions == list(range(P0 + C0)) + list(range(P0 - 1, P0 + R0))  # each reply continues the prompt
    mask = preference.shared_prefix_mask(batch["document_ids"], batch["branch_ids"])[0, 0]
    chosen_start, rejected_start = P0 - 1, P0 + C0
    assert not mask[rejected_start:, chosen_start:rejected_start].any()  # rejected never sees chosen
    assert mask[rejected_start, : P0 - 1].all()  # and sees the whole prompt


# ----------------------------------------------------------------------------------------------
# The losses, written out, and TRL's where it installs
# ----------------------------------------------------------------------------------------------


def some_logprobs(seed: int = 0, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 20, (2, n), generator=g).float()
    logps = -tokens * torch.rand(2, n, generator=g) * 3
    ref = logps + torch.randn(2, n, generator=g)
    return PairLogprobs(logps[0], logps[1], tokens[0], tokens[1]), PairLogprobs(ref[0], ref[1], None, None)


def written_out(loss_type, pc, pr, rc, rr, nc, nr, beta, eps, gamma):
    """Each paper's formula, one pair at a time, in plain Python."""
    import math

    logsig = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
    margin = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * logsig(beta * margin) - eps * logsig(-beta * margin)
    if loss_type == "ipo":
        return ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * margin)
    if loss_type == "simpo":
        z = beta * (pc / nc - pr / nr) - gamma
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    if loss_type == "orpo":
        mc, mr = pc / nc, pr / nr
        log_odds = (mc - mr) - (math.log(1 - math.exp(mc)) - math.log(1 - math.exp(mr)))
        return -mc - beta * logsig(log_odds)
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0),
                                           ("simpo", 0.0), ("simpo", 0.1), ("orpo", 0.0)])
def test_each_loss_equals_the_formula_written_out(loss_type, eps):
    policy, reference = some_logprobs()
    losses, chosen_rewards, rejected_rewards = preference_losses(loss_type, policy, reference, beta=0.3,
                                                                 label_smoothing=eps, simpo_gamma=0.7)
    for k in range(len(losses)):
        args = [float(x[k]) for x in (policy.chosen, policy.rejected, reference.chosen, reference.rejected,
                                      policy.chosen_tokens, policy.rejected_tokens)]
        assert float(losses[k]) == pytest.approx(written_out(loss_type, *args, 0.3, eps, 0.7), rel=1e-5, abs=1e-6)
    if loss_type in ("sigmoid", "ipo", "hinge"):
        torch.testing.assert_close(chosen_rewards, 0.3 * (policy.chosen - reference.chosen))


def test_sft_weight_adds_chosen_per_token_nll():
    policy, reference = some_logprobs(1)
    plain, _, _ = preference_losses("sigmoid", policy, reference, beta=0.1)
    with_sft, _, _ = preference_losses("sigmoid", policy, reference, beta=0.1, sft_weight=0.5)
    torch.testing.assert_close(with_sft - plain, 0.5 * -policy.chosen / policy.chosen_tokens)


def trl_trainer(cls, **attributes):
    """A TRL trainer's loss method bound to a namespace with just the attributes it reads."""
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device="cpu"), **attributes)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "simpo"])
def test_reference_free_and_margin_losses_equal_trl_cpo(loss_type):
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    policy, _ = some_logprobs(2)
    self = trl_trainer(CPOTrainer, alpha=0.0, loss_type=loss_type, beta=0.3, label_smoothing=0.1 if loss_type != "hinge" else 0.0,
                       simpo_gamma=0.7)
    if loss_type == "simpo":  # CPO's SimPO takes the length-normalised log-probs
        expected, _, _ = CPOTrainer.cpo_loss(self, policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens)
        ours, _, _ = preference_losses("simpo", policy, None, beta=0.3, label_smoothing=0.1, simpo_gamma=0.7)
    else:  # CPO is DPO with a zero reference
        expected, _, _ = CPOTrainer.cpo_loss(self, policy.chosen, policy.rejected)
        zero = PairLogprobs(torch.zeros(6), torch.zeros(6), None, None)
        ours, _, _ = preference_losses(loss_type, policy, zero, beta=0.3, label_smoothing=self.label_smoothing)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_orpo_odds_ratio_term_equals_trl():
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    policy, _ = some_logprobs(3)
    chosen_mean, rejected_mean = policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens
    ratio_losses, *_ = ORPOTrainer.odds_ratio_loss(trl_trainer(ORPOTrainer, beta=0.3), chosen_mean, rejected_mean)
    ours, _, _ = preference_losses("orpo", policy, None, beta=0.3)
    torch.testing.assert_close(ours, -chosen_mean - ratio_losses, rtol=1e-6, atol=1e-6)  # ORPO = NLL - beta * log sigmoid


# ----------------------------------------------------------------------------------------------
# Gradients: the fused path against autograd through full logits
# ----------------------------------------------------------------------------------------------


def full_logits_pair_logprobs(model, pairs) -> PairLogprobs:
    """The readable way: (B, T, V) logits of each sequence alone, log_softmax, gather, sum."""
    sums, counts = {"chosen": [], "rejected": []}, {"chosen": [], "rejected": []}
    for pair in pairs:
        for name in sums:
            ids = torch.tensor(pair["prompt"] + pair[name])[None]
            logprobs = F.log_softmax(model(ids)[0].float(), dim=-1)  # (T, V)
            P = len(pair["prompt"])
            sums[name].append(logprobs[P - 1 : -1].gather(1, ids[0, P:, None]).sum())
            counts[name].append(float(len(pair[name])))
    return PairLogprobs(torch.stack(sums["chosen"]), torch.stack(sums["rejected"]), torch.tensor(counts["chosen"]),
                        torch.tensor(counts["rejected"]))


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo", "orpo"])
@pytest.mark.parametrize("layout", ["padded", "shared"])
def test_loss_gradient_equals_autograd_through_full_logits(loss_type, layout):
    pairs = random_pairs(4, seed=5)
    reference_model = tiny_model(seed=1)
    reference_values = compute_reference_logprobs(reference_model, pairs, PreferenceCollator(0), 4, "cpu")
    for pair, (c, r) in zip(pairs, reference_values):
        pair["reference_chosen"], pair["reference_rejected"] = c, r
    objective = PreferenceObjective(loss_type, beta=0.5, sft_weight=0.3, reference=Precomputed())

    ours_model = tiny_model(seed=2, loss_chunk_tokens=5)
    loss_sum, _ = objective.loss(ours_model, collate(pairs, layout))
    loss_sum.backward()

    oracle_model = tiny_model(seed=2)
    policy = full_logits_pair_logprobs(oracle_model, pairs)
    reference = PairLogprobs(torch.tensor([c for c, _ in reference_values]), torch.tensor([r for _, r in reference_values]),
                             None, None)
    losses, _, _ = preference_losses(loss_type, policy, reference, beta=0.5, sft_weight=0.3)
    losses.sum().backward()

    assert float(loss_sum) == pytest.approx(float(losses.sum()), rel=1e-5)
    ours, expected = gradients(ours_model), gradients(oracle_model)
    assert ours.keys() == expected.keys()
    for name in ours:
        scale = expected[name].abs().max().clamp(min=1e-12)
        assert float((ours[name] - expected[name]).abs().max() / scale) < 1e-5, name


def test_reward_gradient_equals_autograd_through_full_hidden_states():
    pairs = [{**p, "margin": 0.25} for p in random_pairs(4, seed=6)]
    ours_model = add_score_head(tiny_model(seed=3), seed=0)
    oracle_model = copy.deepcopy(ours_model)
    loss_sum, _ = RewardObjective(margin=0.5).loss(ours_model, collate(pairs, "shared"))
    loss_sum.backward()
    total = 0.0
    for pair in pairs:
        c, r = (oracle_model.score(oracle_model.hidden_states(torch.tensor(pair["prompt"] + pair[k])[None])[0, -1])
                for k in ("chosen", "rejected"))
        total = total - F.logsigmoid(c - r - 0.75).sum()
    total.backward()
    assert float(loss_sum) == pytest.approx(float(total), rel=1e-5)
    ours = gradients(ours_model)
    for name, grad in gradients(oracle_model).items():
        assert float((ours[name] - grad).abs().max() / grad.abs().max()) < 1e-5, name


# ----------------------------------------------------------------------------------------------
# The reference model three ways
# ----------------------------------------------------------------------------------------------


def test_lora_off_and_precomputed_references_give_the_frozen_copys_losses():
    from nanotune.lora import apply_lora

    base = tiny_model(seed=4)
    frozen = FrozenCopy(FrozenCopy.of(base))
    policy = apply_lora(copy.deepcopy(base), r=4, alpha=8, targets="all-linear")
    with torch.no_grad():  # a trained adapter: the policy is no longer the reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pairs = random_pairs(6, seed=7)
    for pair, (c, r) in zip(pairs, compute_reference_logprobs(base, pairs, PreferenceCollator(0), 2, "cpu")):
        pair["reference_chosen"], pair["reference_rejected"] = c, r
    results = {}
    for name, reference in (("copy", frozen), ("lora", AdaptersOff()), ("precomputed", Precomputed())):
        objective = PreferenceObjective("sigmoid", beta=0.1, reference=reference)
        loss_sum, sums = objective.loss(policy, collate(pairs, "packed"))
        results[name] = [float(loss_sum)] + [float(v) for v in sums.values()]
    assert results["lora"] == pytest.approx(results["copy"], abs=1e-6)
    assert results["precomputed"] == pytest.approx(results["copy"], abs=1e-6)
    assert results["copy"][1] != pytest.approx(0.0, abs=1e-3)  # the rewards are not zero: the test can fail


def test_reward_scores_are_read_at_each_sequences_last_token():
    pairs = random_pairs(3, seed=8)
    model = add_score_head(tiny_model(seed=5), seed=0)
    with torch.no_grad():
        expected = torch.stack([model.score(model.hidden_states(torch.tensor(p["prompt"] + p[k])[None])[0, -1])[0]
                                for p in pairs for k in ("chosen", "rejected")])
        for layout in LAYOUTS:
            torch.testing.assert_close(sequence_scores(model, collate(pairs, layout)), expected, atol=1e-5, rtol=0)
    assert [n for n, _ in model.named_parameters()][-1] == "score.weight"
    assert not hasattr(model, "lm_head")


def test_evaluation_padding_adds_nothing():
    pairs = random_pairs(3, seed=9)
    objective = PreferenceObjective("simpo", beta=2.0)
    model = tiny_model(seed=6)
    with torch.no_grad():
        plain, _ = objective.loss(model, collate(pairs, "padded"))
        padded_batch = collate(pairs + [objective.without_units(pairs[0])], "padded")
        padded, _ = objective.loss(model, padded_batch)
    assert float(objective.count(padded_batch)) == 3
    assert float(padded) == pytest.approx(float(plain), abs=1e-6)
    assert IGNORE_INDEX == -100
