"""Preference objectives: DPO and its family, and reward models, over per-sequence log-prob sums.

Every loss here is a function of four numbers per pair, computed by `loss.sequence_logprobs`
from the final hidden states, never from (B, T, V) logits:

    log pi(chosen | prompt), log pi(rejected | prompt)   summed over the reply's tokens (policy)
    the same two under the reference model (DPO, IPO, hinge), and the reply lengths (IPO, SimPO, ORPO)

and each is a few lines below, written as its paper writes it (`dpo_sigmoid_loss`, ...). Their sum
over the pairs of a micro-batch is what `PreferenceObjective.loss` hands the loop, which divides by
the pairs of the whole global batch (objective.py): a step's loss is the mean over all its pairs
however they are split into micro-batches and ranks, so the accumulation bug of HF/TRL
(transformers #35856, TRL #2617) cannot happen here.

The reference model, three ways (`dpo.reference`):
  copy         a frozen copy of the starting model (full fine-tuning): a second model in memory
  lora         the policy itself with its LoRA adapters switched off (`lora.adapters_disabled`)
  precomputed  the reference log-probs computed in one pass before training and stored beside
               the data cache (`precompute_reference`): no reference model while training

The reward model is the same Llama with its lm_head replaced by a scalar head `score` (C -> 1,
no bias, HF's `*ForSequenceClassification` layout with `num_labels = 1`), read at each
sequence's last token (its end of turn), trained with `-logsigmoid(r_chosen - r_rejected - margin)`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .data.preference import shared_prefix_mask
from .loss import sequence_logprobs

log = logging.getLogger("nanotune")

LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")  # losses that never look at a reference model
REFERENCES = ("auto", "copy", "lora", "precomputed")


# ----------------------------------------------------------------------------------------------
# The losses, per pair
# ----------------------------------------------------------------------------------------------


def dpo_sigmoid_loss(chosen_logratio, rejected_logratio, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * margin of the log-ratios to the reference).
    With label_smoothing eps > 0 it is cDPO: the labels of a pair are taken as flipped with
    probability eps, so the loss no longer pushes the margin to infinity."""
    logits = beta * (chosen_logratio - rejected_logratio)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(chosen_logratio, rejected_logratio, chosen_tokens, rejected_tokens, beta: float):
    """IPO (Azar et al. 2023): the squared distance of the margin from 1 / (2 beta), a target it can
    reach (DPO's has none). Each log-ratio is divided by its reply's length, as TRL does and the
    IPO authors confirmed the paper's figures were made."""
    margin = chosen_logratio / chosen_tokens - rejected_logratio / rejected_tokens
    return (margin - 1 / (2 * beta)) ** 2


def hinge_loss(chosen_logratio, rejected_logratio, beta: float):
    """RSO's hinge loss (Liu et al. 2023): zero once beta * margin exceeds 1."""
    return torch.relu(1 - beta * (chosen_logratio - rejected_logratio))


def simpo_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, beta: float, gamma: float,
               label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024): no reference; the reward is the length-normalised log-prob times
    beta, and chosen must beat rejected by the margin gamma."""
    logits = beta * (chosen_logps / chosen_tokens - rejected_logps / rejected_tokens) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def orpo_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, beta: float):
    """ORPO (Hong et al. 2024): no reference; the NLL of chosen (per token) plus beta times the
    log odds ratio loss, odds(y) = p / (1 - p) with p the per-token mean probability of the reply."""
    chosen_mean, rejected_mean = chosen_logps / chosen_tokens, rejected_logps / rejected_tokens
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return -chosen_mean - beta * F.logsigmoid(log_odds)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without the cancellation of the naive formula near 0."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def reward_pair_loss(chosen_scores, rejected_scores, margin):
    """The reward model's pairwise loss (InstructGPT; Llama 2 adds the margin)."""
    return -F.logsigmoid(chosen_scores - rejected_scores - margin)


class PairLogprobs(NamedTuple):
    """Per pair (P,): summed reply log-probs of chosen and rejected, and the reply lengths (float)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def preference_losses(loss_type: str, policy: PairLogprobs, reference: PairLogprobs | None, *, beta: float,
                      label_smoothing: float = 0.0, simpo_gamma: float = 0.5, sft_weight: float = 0.0):
    """(losses (P,), chosen rewards (P,), rejected rewards (P,)) of `loss_type` for each pair.

    The rewards are what the loss compares: beta * log-ratio to the reference for DPO, IPO and
    hinge; beta * the per-token mean log-prob for SimPO and ORPO (TRL's `rewards/*`).
    `sft_weight` adds that multiple of chosen's per-token NLL to each pair (RPO, pref_ftx).
    """
    if loss_type in REFERENCE_FREE:
        chosen_rewards = beta * policy.chosen / policy.chosen_tokens
        rejected_rewards = beta * policy.rejected / policy.rejected_tokens
        if loss_type == "simpo":
            losses = simpo_loss(policy.chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens,
                                beta, simpo_gamma, label_smoothing)
        else:
            losses = orpo_loss(policy.chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens, beta)
    else:
        chosen_logratio, rejected_logratio = policy.chosen - reference.chosen, policy.rejected - reference.rejected
        chosen_rewards, rejected_rewards = beta * chosen_logratio, beta * rejected_logratio
        if loss_type == "sigmoid":
            losses = dpo_sigmoid_loss(chosen_logratio, rejected_logratio, beta, label_smoothing)
        elif loss_type == "ipo":
            losses = ipo_loss(chosen_logratio, rejected_logratio, policy.chosen_tokens, policy.rejected_tokens, beta)
        elif loss_type == "hinge":
            losses = hinge_loss(chosen_logratio, rejected_logratio, beta)
        else:
            raise ValueError(f"unknown preference loss {loss_type!r}; expected one of {', '.join(LOSSES)}")
    if sft_weight:
        losses = losses + sft_weight * (-policy.chosen / policy.chosen_tokens)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# ----------------------------------------------------------------------------------------------
# From a batch to per-pair figures
# ----------------------------------------------------------------------------------------------


def model_inputs(batch: dict) -> dict:
    """The arguments of `Llama.hidden_states` for a batch of any layout (data/preference.py)."""
    inputs = {"input_ids": batch["input_ids"]}
    if "branch_ids" in batch:  # shared prompt: an explicit mask and positions
        inputs["position_ids"] = batch["position_ids"]
        inputs["attention_mask"] = shared_prefix_mask(batch["document_ids"], batch["branch_ids"])
    elif "document_ids" in batch:  # packed: block-diagonal attention, positions restart per sequence
        inputs["document_ids"] = batch["document_ids"]
    return inputs


def pair_logprobs(model: nn.Module, batch: dict) -> PairLogprobs:
    """Summed reply log-probs of every pair's chosen and rejected sequence, without (B, T, V) logits."""
    hidden = model.hidden_states(**model_inputs(batch))  # (B, T, C)
    n_sequences = 2 * batch["pair_weight"].shape[0]
    sums = sequence_logprobs(hidden, model.lm_head.weight, batch["labels"], batch["sequence_ids"], n_sequences,
                             model.loss_chunk_tokens)
    tokens = sums.n_tokens.float().clamp(min=1)  # (2P,)
    return PairLogprobs(sums.logprobs[0::2], sums.logprobs[1::2], tokens[0::2], tokens[1::2])


def sequence_scores(model: nn.Module, batch: dict) -> torch.Tensor:
    """The reward model's score of every sequence (2P,), read at its last token."""
    hidden = model.hidden_states(**model_inputs(batch))  # (B, T, C)
    last = hidden.reshape(-1, hidden.shape[-1])[batch["last_token"]]  # (2P, C)
    return F.linear(last, model.score.weight).squeeze(-1).float()  # (2P,)


# ----------------------------------------------------------------------------------------------
# The reference model
# ----------------------------------------------------------------------------------------------


class FrozenCopy:
    """A frozen copy of the starting model: exact for full fine-tuning, at the cost of a second model."""

    def __init__(self, model: nn.Module):
        self.model = model.requires_grad_(False).eval()

    @torch.no_grad()
    def logprobs(self, policy: nn.Module, batch: dict) -> PairLogprobs:
        return pair_logprobs(self.model, batch)

    @staticmethod
    def of(model: nn.Module) -> nn.Module:
        """The copy to make before training (before sharding: it is sharded like the policy)."""
        return copy.deepcopy(model).requires_grad_(False).eval()


class AdaptersOff:
    """The policy with its LoRA adapters switched off: the base model, with no second copy."""

    @torch.no_grad()
    def logprobs(self, policy: nn.Module, batch: dict) -> PairLogprobs:
        from .lora import adapters_disabled

        with adapters_disabled(policy):
            return pair_logprobs(policy, batch)


class Precomputed:
    """Reference log-probs carried by the batch, computed once before training (`precompute_reference`)."""

    def logprobs(self, policy: nn.Module, batch: dict) -> PairLogprobs:
        return PairLogprobs(batch["reference_chosen"], batch["reference_rejected"], None, None)


@torch.no_grad()
def compute_reference_logprobs(model: nn.Module, pairs, collate, batch_size: int, device) -> list[tuple[float, float]]:
    """(chosen, rejected) summed reply log-probs of every pair under `model`, in the pairs' order.

    Chunks of `batch_size` pairs are laid out as `collate` lays out training batches (packed rows
    for the packed and shared layouts, where a shared prompt makes the pass up to twice cheaper).
    """
    from .data.preference import PackedPairs

    was_training = model.training
    model.eval()
    values: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
    for start in range(0, len(pairs), batch_size):
        indices = list(range(start, min(start + batch_size, len(pairs))))
        chunk = [pairs[i] for i in indices]
        if collate.layout == "padded":
            items, order = chunk, indices
        else:  # the pairs come out row by row: keep track of which is which
            rows = PackedPairs(chunk, collate.row_length, collate.layout)
            items = [rows[r] for r in range(len(rows))]
            order = [indices[i] for row in rows.rows for i in sorted(row)]
        batch = {k: v.to(device) for k, v in collate(items).items()}
        result = pair_logprobs(model, batch)
        for i, chosen, rejected in zip(order, result.chosen.tolist(), result.rejected.tolist()):
            values[i] = (chosen, rejected)
    model.train(was_training)
    return values


def reference_cache_key(model: nn.Module, datasets) -> str:
    """A digest of the model's weights and the encoded pairs: a stored reference is reused only for both."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().double()
        digest.update(f"{name}{tuple(tensor.shape)}{float(value.sum())!r}{float(value.pow(2).sum())!r}".encode())
    for dataset in datasets:
        for sample in dataset:
            digest.update(json.dumps([sample["prompt"], sample["chosen"], sample["rejected"]]).encode())
    return digest.hexdigest()[:16]


def precompute_reference(model, datasets, collate, batch_size: int, cache_dir: Path, run) -> Path:
    """Fill every pair of `datasets` with "reference_chosen"/"reference_rejected", computed once.

    The values are stored in `cache_dir/reference_logps-KEY.json` (KEY covers the weights and the
    pairs): rank 0 computes them with its whole model before sharding, the other ranks read them.
    A later run on the same model and data reads them too.
    """
    from . import distributed
    from .files import write_text_atomically

    key = distributed.broadcast_string(reference_cache_key(model, datasets) if run.is_main else None, run)
    path = Path(cache_dir) / f"reference_logps-{key}.json"
    if run.is_main and not path.exists():
        log.info("precomputing reference log-probs of %d pairs -> %s", sum(len(d) for d in datasets), path)
        values = [compute_reference_logprobs(model, dataset, collate, batch_size, run.device) for dataset in datasets]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, json.dumps(values))
    distributed.barrier(run)
    for dataset, values in zip(datasets, json.loads(path.read_text())):
        for sample, (chosen, rejected) in zip(dataset, values):
            sample["reference_chosen"], sample["reference_rejected"] = chosen, rejected
    return path


# ----------------------------------------------------------------------------------------------
# The objectives the loop trains
# ----------------------------------------------------------------------------------------------


def _pair_summary(loss_sum: float, count: float, sums: dict[str, float]) -> dict:
    """Mean loss and mean of every logged figure per pair, with TRL's names."""
    count = max(count, 1.0)
    return {"loss": loss_sum / count, **{name: value / count for name, value in sums.items()}}


class PreferenceObjective:
    """DPO and its family: units are pairs; `loss` returns the per-pair losses summed (see objective.py)."""

    unit = "pairs"

    def __init__(self, loss: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, sft_weight: float = 0.0, reference=None):
        if loss not in LOSSES:
            raise ValueError(f"unknown preference loss {loss!r}; expected one of {', '.join(LOSSES)}")
        if loss not in REFERENCE_FREE and reference is None:
            raise ValueError(f"the {loss} loss needs a reference model")
        self.loss_type, self.beta, self.label_smoothing = loss, beta, label_smoothing
        self.simpo_gamma, self.sft_weight, self.reference = simpo_gamma, sft_weight, reference

    def count(self, batch: dict) -> torch.Tensor:
        return batch["pair_weight"].sum()

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The reference first, without gradients: its activations are gone before the policy's exist.
        reference = self.reference.logprobs(model, batch) if self.loss_type not in REFERENCE_FREE else None
        policy = pair_logprobs(model, batch)
        losses, chosen_rewards, rejected_rewards = preference_losses(
            self.loss_type, policy, reference, beta=self.beta, label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma, sft_weight=self.sft_weight)
        weight = batch["pair_weight"]  # (P,): 0 for evaluation's padding
        sums = {
            "rewards/chosen": (chosen_rewards * weight).sum(),
            "rewards/rejected": (rejected_rewards * weight).sum(),
            "rewards/accuracies": ((chosen_rewards > rejected_rewards).float() * weight).sum(),
            "rewards/margins": ((chosen_rewards - rejected_rewards) * weight).sum(),
            "logps/chosen": (policy.chosen.detach() * weight).sum(),
            "logps/rejected": (policy.rejected.detach() * weight).sum(),
        }
        return (losses * weight).sum(), sums

    def summary(self, loss_sum: float, count: float, sums: dict[str, float]) -> dict:
        return _pair_summary(loss_sum, count, sums)

    def without_units(self, item: dict) -> dict:
        from .data.preference import without_pairs

        return without_pairs(item)


class RewardObjective:
    """A reward model: `-logsigmoid(r_chosen - r_rejected - margin)` summed over pairs."""

    unit = "pairs"

    def __init__(self, margin: float = 0.0):
        self.margin = margin

    def count(self, batch: dict) -> torch.Tensor:
        return batch["pair_weight"].sum()

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = sequence_scores(model, batch)  # (2P,)
        chosen, rejected = scores[0::2], scores[1::2]  # (P,) each
        losses = reward_pair_loss(chosen, rejected, batch["margin"] + self.margin)
        weight = batch["pair_weight"]
        sums = {
            "rewards/chosen": (chosen.detach() * weight).sum(),
            "rewards/rejected": (rejected.detach() * weight).sum(),
            "rewards/accuracies": ((chosen > rejected).float() * weight).sum(),
            "rewards/margins": ((chosen - rejected).detach() * weight).sum(),
        }
        return (losses * weight).sum(), sums

    def summary(self, loss_sum: float, count: float, sums: dict[str, float]) -> dict:
        return _pair_summary(loss_sum, count, sums)

    def without_units(self, item: dict) -> dict:
        from .data.preference import without_pairs

        return without_pairs(item)


# ----------------------------------------------------------------------------------------------
# The reward model: a score head in HF's *ForSequenceClassification layout
# ----------------------------------------------------------------------------------------------


def add_score_head(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Make a causal LM a reward model, in place: `lm_head` goes, `score` (C -> 1, no bias) comes.

    The parameter names are then those of HF's `LlamaForSequenceClassification` (`model.*` and
    `score.weight` (1, C)), and `checkpoint.save_pretrained` writes the folder as one. The head
    starts as HF initialises it, Normal(0, initializer_range).
    """
    embed = model.model.embed_tokens.weight
    del model.lm_head
    model.score = nn.Linear(model.config.hidden_size, 1, bias=False, device=embed.device, dtype=embed.dtype)
    if embed.device.type != "meta":
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        weight = torch.empty(model.score.weight.shape).normal_(0.0, model.config.initializer_range, generator=generator)
        with torch.no_grad():
            model.score.weight.copy_(weight)
    return model


def reward_pad_id(tokenizer, end_ids: list[int]) -> int:
    """The `pad_token_id` to save with a reward model. transformers scores the rightmost token
    that is not the pad id, so the pad id must never be a token a sequence ends with (its end of
    turn, often EOS, which is also the pad id of a tokenizer without one): the first of pad, unk,
    BOS, 0 that is not."""
    unk = tokenizer.piece_to_id("<unk>")
    for candidate in (tokenizer.pad_id, unk, tokenizer.bos_id, 0):
        if candidate is not None and candidate not in end_ids:
            return candidate
    raise ValueError("no token id is free to serve as the reward model's pad_token_id")


def load_reward_model(path, dtype: torch.dtype | None = None, device=None, **options) -> nn.Module:
    """A reward model folder (`*ForSequenceClassification`, from train_rm.py or HF) as a Llama with `score`."""
    from .checkpoint import IGNORED_TENSORS, iter_file_tensors, raise_on_mismatch, read_config, weight_files
    from .model import Llama

    config = read_config(path)
    with torch.device("meta"):
        model = add_score_head(Llama(config, **options))
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    loaded, unexpected, wrong_shape = set(), [], []
    for file in weight_files(path):
        shard = {}
        for name, tensor in iter_file_tensors(file, device or "cpu"):
            if IGNORED_TENSORS.search(name):
                continue
            if name not in expected:
                unexpected.append(f"{name} (in {file.name})")
            elif tensor.shape != expected[name]:
                wrong_shape.append(f"{name}: {tuple(tensor.shape)} in {file.name}, model needs {tuple(expected[name])}")
            else:
                shard[name] = tensor.to(dtype) if dtype is not None else tensor
                loaded.add(name)
        model.load_state_dict(shard, strict=False, assign=True)
    raise_on_mismatch(path, sorted(set(expected) - loaded), unexpected, wrong_shape)
    return model.eval()


def is_reward_model_folder(path) -> bool:
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return any(arch.endswith("ForSequenceClassification") for arch in config.get("architectures") or [])


@torch.no_grad()
def score_pairs(model: nn.Module, pairs, collate, batch_size: int = 8) -> dict:
    """How often the model prefers chosen: by reward for a reward model, else by summed reply log-prob.

    {"accuracy", "margin" (mean chosen - rejected score), "n_pairs"}; ties count as wrong.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, margin = 0.0, 0.0
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]).items()}
        if hasattr(model, "score"):
            scores = sequence_scores(model, batch)
            chosen, rejected = scores[0::2], scores[1::2]
        else:
            result = pair_logprobs(model, batch)
            chosen, rejected = result.chosen, result.rejected
        correct += float((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
    model.train(was_training)
    n = max(len(pairs), 1)
    return {"accuracy": correct / n, "margin": margin / n, "n_pairs": len(pairs)}


# ----------------------------------------------------------------------------------------------
# What train_dpo.py and train_rm.py share: the pairs, their layout, the reference
# ----------------------------------------------------------------------------------------------


def encode_pair_files(config, tokenizer, template):
    """(train pairs, valid pairs or None) as `config.data` says: valid_files, else a seeded
    `valid_fraction` of the train pairs held out."""
    import numpy as np

    from .data.preference import build_preference_dataset

    data = config.data

    def encode(files):
        return build_preference_dataset(files, tokenizer, template, max_length=data.max_length,
                                        truncation=data.truncation, format=data.format, skip_invalid=data.skip_invalid)

    train_pairs = encode(data.train_files)
    valid_pairs = encode(data.valid_files) if data.valid_files else None
    if valid_pairs is None and data.valid_fraction > 0:
        order = np.random.default_rng(config.seed).permutation(len(train_pairs))
        n_valid = max(1, int(round(data.valid_fraction * len(train_pairs))))
        train_pairs, valid_pairs = train_pairs.subset(order[n_valid:]), train_pairs.subset(order[:n_valid])
    return train_pairs, valid_pairs


def batching(pairs, layout: str, pad_id: int, max_length: int):
    """(the dataset the loop samples from, its collate) for a layout: pairs, or rows of pairs."""
    from .data.preference import PackedPairs, PreferenceCollator

    collate = PreferenceCollator(pad_id, layout, row_length=2 * max_length)
    if pairs is None or layout == "padded":
        return pairs, collate
    return PackedPairs(pairs, 2 * max_length, layout), collate


def make_reference(config, run, model: nn.Module, datasets, collate):
    """The reference model `dpo.reference` asks for (None for SimPO and ORPO), made before training.
    `collate`: the training batches' (precomputed log-probs are computed in the same layout)."""
    from . import distributed

    dpo = config.dpo
    if dpo.loss in REFERENCE_FREE:
        return None
    kind = dpo.reference if dpo.reference != "auto" else ("lora" if config.lora.enabled else "copy")
    log.info("reference model: %s", kind)
    if kind == "copy":
        return FrozenCopy(distributed.parallelize(FrozenCopy.of(model), run, fsdp=config.distributed))
    if kind == "lora":
        return AdaptersOff()
    if run.is_main:
        model.to(run.device)  # rank 0 holds the whole model until it is sharded
    cache_dir = Path(config.data.cache_dir or Path(config.output_dir) / "cache")
    batch_size = config.eval.batch_size or config.train.batch_size
    precompute_reference(model, [d for d in datasets if d is not None], collate, batch_size, cache_dir, run)
    return Precomputed()
