"""Online RL with verifiable rewards (GRPO): read `train_grpo` top to bottom and you know every step.

    for each step:
        take this rank's prompts (train.grad_accum micro-batches of train.batch_size prompts)
        sample grpo.group_size completions of each, with the KV cache, from the policy as it is now
        score every completion with the reward functions (weighted sum)
        advantages: each reward against its own group's mean (and std)
        log-probs of the sampling policy (several passes only) and of the reference (beta > 0 only)
        count the loss's units over the global batch (completion tokens, or completions)
        for each pass: for each micro-batch: forward -> summed loss -> / units -> backward;
                       clip gradients -> set the learning rate -> optimizer step
        now and then: log, evaluate on held-out prompts, save a checkpoint

The formulas (advantages, the clipped ratio, k3, the normalisations, and why the loss reads 0
while the gradient is not 0) are in grpo_loss.py.

Sampling is reproducible and independent of how prompts are spread over ranks: completion j of
prompt p at step s draws from its own generator, seeded by (seed, s, p, j), so the union of the
ranks' samples is the one-process run's, and resuming at step s samples what the uninterrupted
run sampled, with no generator state to save.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .config import RunConfig
from .data.prompts import PromptRecord, fields_of
from .data.sampler import GlobalBatchSampler
from .distributed import Run
from .generate import generate_batch
from .grpo_loss import group_advantages, grpo_loss_sum, loss_units
from .loss import IGNORE_INDEX, token_logprobs
from .optim import build_optimizer, schedule_from_config
from .preflight import check_enough_samples
from .rewards import Reward, score
from .run_lock import unlock_output_dir
from .run_log import DivergenceGuard, MetricsFile
from .train import clip_gradients, mixed_precision, save_final
from .train_state import TrainingState, begin_run, last_checkpoint, run_layout

log = logging.getLogger("nanotune")


@dataclass
class GRPOResult:
    steps: int
    last_record: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)


def train_grpo(
    config: RunConfig,
    run: Run,
    model: nn.Module,
    tokenizer,
    prompts: list[PromptRecord],
    valid_prompts: list[PromptRecord] | None,
    rewards: list[Reward],
    stop_ids: list[int],
    chat_template: str | None = None,
) -> GRPOResult:
    """Train `model` with GRPO on `prompts` (encoded PromptRecords) as `config.grpo` says."""
    grpo = config.grpo
    output_dir = begin_run(config, run)

    # The models: the policy (and a frozen reference copy, sharded alike) in one ordered recipe.
    trainable_only = any(not p.requires_grad for p in model.parameters())
    reference = make_reference(model, config)
    model = distributed.parallelize(model, run, activation_checkpointing=config.train.activation_checkpointing,
                                    compile_blocks=config.train.compile, fsdp=config.distributed)
    if isinstance(reference, nn.Module):
        reference = distributed.parallelize(reference, run, fsdp=config.distributed).eval()
    optimizer = build_optimizer(model, config.optim, run.device.type)
    trained_parameters = [p for p in model.parameters() if p.requires_grad]

    # The prompts each rank takes at each step (the same global batches on any number of ranks).
    check_enough_samples(len(prompts), config, run.world_size, config.data.train_files)
    sampler = GlobalBatchSampler(
        len(prompts), global_batch_size=config.train.batch_size * config.train.grad_accum * run.world_size,
        micro_batch_size=config.train.batch_size, world_size=run.world_size, rank=run.rank, seed=config.seed,
    )
    total_steps = config.train.max_steps or max(1, int(config.train.epochs * sampler.steps_per_epoch))
    lr_for_update = schedule_from_config(config.optim, total_steps * grpo.num_iterations)
    autocast, _ = mixed_precision(config.train.mixed_precision, run)  # fp16 is refused in config validation

    state = TrainingState(model, optimizer, sampler, None, trainable_only, run_layout(config, run.world_size))
    resume = config.checkpoint.resume
    start_step = state.resume(output_dir, run, named=resume if isinstance(resume, str) else None) if resume else 0
    metrics = MetricsFile(output_dir / "metrics.jsonl", run, keep_up_to_step=start_step)
    if run.is_main:
        log.info("GRPO for %d steps from step %d: %d prompts x %d completions per step", total_steps, start_step,
                 sampler.global_batch_size, grpo.group_size)
    progress = tqdm(total=total_steps, initial=start_step, disable=not (run.is_main and config.log.progress_bar),
                    desc="grpo", dynamic_ncols=True)
    window = GRPOWindow(rewards, run, has_kl=grpo.beta > 0)
    guard = DivergenceGuard(run.device, watch_grad_norm=True)
    prompt_batches = iter(sampler)
    last_record, last_eval = {}, {}
    model.train()
    for step in range(start_step, total_steps):
        # 1. This rank's prompts: grad_accum micro-batches of batch_size prompt indices.
        micro_batches = next(prompt_batches)

        # 2. Sample group_size completions of every prompt from the policy as it is now.
        started = time.perf_counter()
        with autocast:
            completions = [sample_completions(model, [prompts[i] for i in indices], indices, step, config, run,
                                              stop_ids, tokenizer.pad_id) for indices in micro_batches]
        window.sampling(completions, time.perf_counter() - started, grpo.max_new_tokens, stop_ids)

        # 3. Score every completion; 4. compare each reward with its own group's.
        started = time.perf_counter()
        batches = []
        for indices, sampled in zip(micro_batches, completions):
            records = [prompts[i] for i in indices]
            scores = score_completions(rewards, records, sampled, tokenizer, stop_ids)  # (functions, P * G)
            reward = rewards_total(scores, rewards).view(len(records), grpo.group_size)  # (P, G)
            advantages = group_advantages(reward, scale=grpo.scale_rewards, eps=grpo.std_eps)  # (P, G)
            window.scores(scores, reward)
            batches.append(completion_batch(records, sampled, advantages.flatten(), tokenizer.pad_id, run.device))

        # 5. Log-probs that stay fixed during the passes: the sampling policy's (only needed when a
        #    second pass has moved the policy away from it) and the reference's (beta > 0).
        with torch.no_grad(), autocast:
            for batch in batches:
                if grpo.num_iterations > 1:
                    batch["old_logprobs"] = completion_logprobs(model, batch).logprobs
                if grpo.beta > 0:
                    batch["ref_logprobs"] = reference_logprobs(reference, model, batch)

        # 6. The loss's denominator: completion tokens (dapo) or completions (sequence) of the whole
        #    global batch. FSDP averages gradients over ranks; x world_size turns that into a sum.
        n_units = distributed.all_reduce_sum(
            sum(loss_units(b["mask"], grpo.loss_normalization) for b in batches).float(), run)
        loss_scale = run.world_size / n_units.clamp(min=1)

        # 7. One optimizer step per pass over the samples.
        for iteration in range(grpo.num_iterations):
            for i, batch in enumerate(batches):
                distributed.set_gradient_sync(model, i == len(batches) - 1)
                with autocast:
                    loss_sum, sums = micro_batch_loss(model, batch, config)
                (loss_sum * loss_scale).backward()
                window.add_micro_batch(loss_sum.detach(), sums, batch["input_ids"].numel())
            grad_norm = clip_gradients(trained_parameters, config.optim.max_grad_norm)
            lr = lr_for_update(step * grpo.num_iterations + iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window.add_update(n_units, grad_norm)
        window.training(started, run.device)
        progress.update(1)

        done = step + 1
        guard.observe(done, window.loss_sum, grad_norm)
        if done % config.log.every_steps == 0 or done == total_steps:
            guard.check(run, last_checkpoint(output_dir))
            last_record = {"step": done, **window.summary(), "lr": lr, "epoch": sampler.epoch}
            metrics.write(last_record)
            progress.set_postfix(reward=f"{last_record['reward']:.3f}")
        if valid_prompts and config.eval.every_steps and done % config.eval.every_steps == 0 and done < total_steps:
            last_eval = evaluate_prompts(model, valid_prompts, rewards, config, run, tokenizer, stop_ids, autocast)
            metrics.write({"step": done, **last_eval})
        if config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0 and done < total_steps:
            guard.check(run, last_checkpoint(output_dir))  # never save a diverged model
            state.save(output_dir, done, run, config.checkpoint.keep_last)
    progress.close()

    if valid_prompts:
        last_eval = evaluate_prompts(model, valid_prompts, rewards, config, run, tokenizer, stop_ids, autocast)
        metrics.write({"step": total_steps, **last_eval})
    if config.checkpoint.save_final:
        save_final(model, tokenizer, output_dir, run, config, chat_template)
    distributed.barrier(run)
    if run.is_main:
        unlock_output_dir(output_dir)  # taken in build.start_run, before anything was written
    return GRPOResult(steps=total_steps, last_record=last_record, eval=last_eval)


# ----------------------------------------------------------------------------------------------
# One level down: the pieces the loop calls
# ----------------------------------------------------------------------------------------------


def make_reference(model: nn.Module, config: RunConfig):
    """What the KL is measured against: None (beta = 0: nothing is held), "lora" (the policy with
    its adapters switched off: no second copy), or a frozen copy of the starting model.

    A copy is made before the policy is sharded, so that it is sharded (and filled from rank 0)
    by the same recipe.
    """
    grpo = config.grpo
    if grpo.beta == 0:
        return None
    if grpo.reference == "lora" or (grpo.reference == "auto" and config.lora.enabled):
        return "lora"
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference


def completion_generator(seed: int, step: int, prompt_index: int, completion: int, device) -> torch.Generator:
    """The generator of completion `completion` of prompt `prompt_index` at `step`: a function of
    these four numbers alone (whatever rank or micro-batch the prompt lands in)."""
    words = np.random.SeedSequence([seed, step, prompt_index, completion]).generate_state(2)  # two uint32
    return torch.Generator(device).manual_seed(int(words[0]) << 32 | int(words[1]))


def sample_completions(model, records: list[PromptRecord], indices: list[int], step: int, config: RunConfig,
                       run: Run, stop_ids: list[int], pad_id: int) -> list[list[int]]:
    """group_size completions of each prompt, prompt by prompt: P * G token lists, each ending with
    its stop token, or cut at grpo.max_new_tokens."""
    grpo = config.grpo
    prompt_ids = [record.input_ids for record in records for _ in range(grpo.group_size)]
    generators = [completion_generator(config.seed, step, index, j, run.device)
                  for index in indices for j in range(grpo.group_size)]
    return generate_batch(
        model, prompt_ids, grpo.max_new_tokens, temperature=grpo.temperature, top_k=grpo.top_k or None,
        top_p=grpo.top_p, eos_id=stop_ids, generator=generators, pad_id=pad_id,
        all_ranks_finished=all_ranks_agree(run) if run.distributed else None,
    )


def all_ranks_agree(run: Run):
    """"Every row of every rank is done": with FSDP every forward is a collective, so no rank may
    stop decoding before the others (one tiny all-reduce per token)."""

    def finished(this_rank_finished: bool) -> bool:
        unfinished = torch.tensor(0.0 if this_rank_finished else 1.0, device=run.device)
        return distributed.all_reduce_sum(unfinished, run).item() == 0

    return finished


def completion_text(tokens: list[int], tokenizer, stop_ids: list[int]) -> str:
    """What the rewards read: the completion's text, without its stop token."""
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)


def score_completions(rewards: list[Reward], records: list[PromptRecord], completions: list[list[int]], tokenizer,
                      stop_ids: list[int]) -> torch.Tensor:
    """(functions, P * G) fp32: every reward function's score of every completion (groups in a row)."""
    group_size = len(completions) // len(records)
    prompts = [record.prompt for record in records for _ in range(group_size)]
    texts = [completion_text(tokens, tokenizer, stop_ids) for tokens in completions]
    return torch.tensor(score(rewards, prompts, texts, fields_of(records, group_size)), dtype=torch.float32)


def rewards_total(scores: torch.Tensor, rewards: list[Reward]) -> torch.Tensor:
    """(P * G,): each completion's reward, the weighted sum of its functions' scores."""
    weights = torch.tensor([reward.weight for reward in rewards], dtype=torch.float32)  # (functions,)
    return (weights[:, None] * scores).sum(dim=0)


def completion_batch(records: list[PromptRecord], completions: list[list[int]], advantages: torch.Tensor,
                     pad_id: int, device) -> dict:
    """Prompt + completion per row, right-padded, with labels on the completion tokens only.

    Right padding needs no attention mask: a causal model never looks ahead, so padding after a
    row's last token changes nothing before it. labels[t] = the token at t + 1 where that is a
    completion token, else -100 (already shifted, as everywhere in nanotune).
    """
    group_size = len(completions) // len(records)
    rows, targets = [], []
    for n, tokens in enumerate(completions):
        prompt = records[n // group_size].input_ids
        rows.append(prompt + tokens)
        targets.append([IGNORE_INDEX] * (len(prompt) - 1) + tokens + [IGNORE_INDEX])
    T = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [pad_id] * (T - len(row)) for row in rows], dtype=torch.long)  # (B, T)
    labels = torch.tensor([row + [IGNORE_INDEX] * (T - len(row)) for row in targets], dtype=torch.long)  # (B, T)
    batch = {"input_ids": input_ids, "labels": labels, "mask": labels != IGNORE_INDEX, "advantages": advantages}
    return {name: value.to(device) for name, value in batch.items()}


def completion_logprobs(model, batch: dict):
    """TokenLogprobs (B, T) of the completion tokens under `model`, through the chunked lm_head."""
    hidden = model.hidden_states(batch["input_ids"])  # (B, T, C)
    return token_logprobs(hidden, model.lm_head.weight, batch["labels"], model.loss_chunk_tokens)


def reference_logprobs(reference, model, batch: dict) -> torch.Tensor:
    """(B, T): the reference's log-probs of the completion tokens (the policy with LoRA off, or the copy)."""
    if reference == "lora":
        from .lora import adapters_disabled

        with adapters_disabled(model):
            return completion_logprobs(model, batch).logprobs
    return completion_logprobs(reference, batch).logprobs


def micro_batch_loss(model, batch: dict, config: RunConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(summed GRPO loss of this micro-batch, sums to log): forward, per-token log-probs, formulas."""
    grpo = config.grpo
    current = completion_logprobs(model, batch)
    loss_sum, sums = grpo_loss_sum(
        current.logprobs, batch.get("old_logprobs"), batch.get("ref_logprobs"), batch["advantages"], batch["mask"],
        epsilon_low=grpo.epsilon_low, epsilon_high=grpo.epsilon_high, beta=grpo.beta,
        normalization=grpo.loss_normalization,
    )
    sums["entropy"] = current.entropy.sum()  # 0 off the completion tokens
    return loss_sum, sums


# ----------------------------------------------------------------------------------------------
# Held-out prompts
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_prompts(model, records: list[PromptRecord], rewards: list[Reward], config: RunConfig, run: Run,
                     tokenizer, stop_ids: list[int], autocast=None) -> dict:
    """Greedy completions of the held-out prompts, scored: `eval_reward` and `eval_<function>` (the
    mean over prompts; for a 0/1 reward, the accuracy). Prompts are split over the ranks; a rank
    whose share is short pads it with its first prompt, whose scores are left out."""
    batch_size = config.eval.batch_size or config.train.batch_size * config.grpo.group_size
    mine = list(range(run.rank, len(records), run.world_size))
    per_rank = -(-len(records) // run.world_size)
    padded = mine + [None] * (per_rank - len(mine))
    filler = mine[0] if mine else 0
    sums = torch.zeros(len(rewards) + 2, dtype=torch.float64)  # each function, the total, the count
    for start in range(0, len(padded), batch_size):
        chunk = padded[start : start + batch_size]
        batch = [records[i if i is not None else filler] for i in chunk]
        with autocast or contextlib.nullcontext():
            completions = generate_batch(
                model, [r.input_ids for r in batch], config.grpo.max_new_tokens, temperature=0.0, eos_id=stop_ids,
                pad_id=tokenizer.pad_id, all_ranks_finished=all_ranks_agree(run) if run.distributed else None)
        scores = score_completions(rewards, batch, completions, tokenizer, stop_ids)  # (functions, n)
        real = torch.tensor([i is not None for i in chunk])
        sums[: len(rewards)] += (scores * real).sum(dim=1).double()
        sums[len(rewards)] += (rewards_total(scores, rewards) * real).sum().double()
        sums[-1] += real.sum()
    sums = distributed.all_reduce_sum(sums.to(run.device), run).cpu()
    count = max(float(sums[-1]), 1.0)
    result = {"eval_reward": float(sums[len(rewards)]) / count}
    result |= {f"eval_{reward.name}": float(sums[i]) / count for i, reward in enumerate(rewards)}
    return result | {"eval_prompts": int(sums[-1])}


# ----------------------------------------------------------------------------------------------
# What a log line says
# ----------------------------------------------------------------------------------------------


class GRPOWindow:
    """Sums since the last log line. The loss figures stay tensors on the device (no step waits
    for them); rewards and lengths are host numbers already (the rewards are Python). `summary`
    adds every rank's sums (one all-reduce) and turns them into the figures of metrics.jsonl."""

    def __init__(self, rewards: list[Reward], run: Run, has_kl: bool):
        self.rewards, self.run, self.has_kl = rewards, run, has_kl
        self.reset()

    def reset(self):
        device = self.run.device
        self.loss_sum = torch.zeros((), device=device)
        self.sums = {name: torch.zeros((), device=device) for name in ("clipped", "tokens", "kl", "entropy")}
        self.units = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.updates = 0
        n = len(self.rewards)
        # host sums: per function and for the total: sum, sum of squares, non-0/1 count; then counts
        self.score_sum, self.score_squares, self.not_binary = np.zeros(n + 1), np.zeros(n + 1), np.zeros(n + 1)
        self.host = dict(completions=0.0, completion_tokens=0.0, truncated=0.0, groups=0.0, flat_groups=0.0,
                         sampling_seconds=0.0, training_seconds=0.0, training_tokens=0.0)

    def sampling(self, completions: list[list[list[int]]], seconds: float, max_new_tokens: int, stop_ids) -> None:
        flat = [tokens for micro_batch in completions for tokens in micro_batch]
        self.host["completions"] += len(flat)
        self.host["completion_tokens"] += sum(len(tokens) for tokens in flat)
        self.host["truncated"] += sum(len(t) == max_new_tokens and t[-1] not in stop_ids for t in flat)
        self.host["sampling_seconds"] += seconds

    def scores(self, scores: torch.Tensor, reward: torch.Tensor) -> None:
        """scores (functions, P * G), reward (P, G)."""
        values = torch.cat([scores, reward.reshape(1, -1)]).double().numpy()  # (functions + 1, P * G)
        self.score_sum += values.sum(axis=1)
        self.score_squares += (values ** 2).sum(axis=1)
        self.not_binary += ((values != 0) & (values != 1)).sum(axis=1)
        self.host["groups"] += reward.shape[0]
        self.host["flat_groups"] += float((reward.std(dim=1) == 0).sum())

    def add_micro_batch(self, loss_sum: torch.Tensor, sums: dict[str, torch.Tensor], n_tokens: int) -> None:
        self.loss_sum += loss_sum.float()
        for name, value in sums.items():
            self.sums[name] += value.detach().float()
        self.host["training_tokens"] += n_tokens

    def add_update(self, n_units: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.units += n_units
        self.grad_norm_sum += grad_norm.to(self.units.device).float()
        self.updates += 1

    def training(self, started: float, device: torch.device) -> None:
        if device.type == "cuda":  # the step's kernels are queued, not done: wait, once per step, to time them
            torch.cuda.synchronize(device)
        self.host["training_seconds"] += time.perf_counter() - started

    def totals(self) -> dict:
        """Every sum of the window added over the ranks (one all-reduce of one float64 vector): a
        float each, an array for the per-function score sums."""
        parts = {"loss_sum": self.loss_sum, **self.sums, "score_sum": self.score_sum,
                 "score_squares": self.score_squares, "not_binary": self.not_binary, **self.host}
        flat = [torch.as_tensor(value, dtype=torch.float64).reshape(-1).to(self.run.device) for value in parts.values()]
        reduced = distributed.all_reduce_sum(torch.cat(flat), self.run).cpu().numpy()
        sizes = np.cumsum([0] + [len(part) for part in flat])
        return {name: reduced[start:end] if isinstance(parts[name], np.ndarray) else float(reduced[start])
                for name, start, end in zip(parts, sizes[:-1], sizes[1:])}

    def summary(self) -> dict:
        run, n = self.run, len(self.rewards)
        totals = self.totals()
        completions, tokens = max(totals["completions"], 1.0), max(totals["tokens"], 1.0)
        mean = totals["score_sum"] / completions  # (functions + 1,): the weighted total last
        std = np.sqrt(np.maximum(totals["score_squares"] / completions - mean ** 2, 0.0))
        record = {
            "loss": totals["loss_sum"] / max(self.units.item(), 1.0),  # units: summed over ranks and passes already
            "reward": float(mean[n]), "reward_std": float(std[n]),
        }
        for i, reward in enumerate(self.rewards):
            record[f"reward_{reward.name}"] = float(mean[i])
            record[f"reward_{reward.name}_std"] = float(std[i])
            if totals["not_binary"][i] == 0:
                record[f"accuracy_{reward.name}"] = float(mean[i])
        record |= {
            "frac_flat_groups": totals["flat_groups"] / max(totals["groups"], 1.0),  # groups that teach nothing
            "completion_length": totals["completion_tokens"] / completions,
            "truncated_fraction": totals["truncated"] / completions,
            "clip_fraction": totals["clipped"] / tokens,
            "entropy": totals["entropy"] / tokens,
        }
        if self.has_kl:
            record["kl"] = totals["kl"] / tokens
        record["grad_norm"] = (self.grad_norm_sum / max(self.updates, 1)).item()
        # tokens per second of wall time, all ranks together (the ranks' seconds run side by side)
        seconds_per_rank = {name: max(totals[f"{name}_seconds"] / run.world_size, 1e-9) for name in ("sampling", "training")}
        record["sampling_tokens_per_s"] = totals["completion_tokens"] / seconds_per_rank["sampling"]
        record["train_tokens_per_s"] = totals["training_tokens"] / seconds_per_rank["training"]
        self.reset()
        return record
