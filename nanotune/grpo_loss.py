"""GRPO's formulas, a few lines each: group advantages, the clipped policy-gradient term, the k3
KL estimate, and what the loss is a mean over.

For one prompt, G completions o_1..o_G are sampled from the policy as it was when sampling
(pi_old), and each gets a reward r_i. Then, per completion token t of completion i:

    A_i       = (r_i - mean(r)) / (std(r) + eps)         the group is its own baseline; std: Bessel's
                                                         (n - 1), as TRL; `scale = False` keeps
                                                         r_i - mean(r) alone (Dr. GRPO)
    ratio_it  = pi(o_it) / pi_old(o_it) = exp(logp_it - old_logp_it)
    pg_it     = -min(ratio_it * A_i, clip(ratio_it, 1 - eps_low, 1 + eps_high) * A_i)
    kl_it     = exp(ref_it - logp_it) - (ref_it - logp_it) - 1          (k3, weighted by beta)
    loss_it   = pg_it + beta * kl_it

and the loss of a step is a weighted mean of loss_it over every completion token of the global
batch (all micro-batches, all ranks):

    dapo      sum_it loss_it / (completion tokens of the global batch): every token weighs the
              same, so a long completion counts for more tokens (TRL's default, "dapo")
    sequence  sum_i (sum_t loss_it / |o_i|) / (completions of the global batch): each completion
              weighs the same, its tokens share its weight (the GRPO paper; TRL's "grpo")

Why the loss reads ~0 and still trains. With one optimisation pass per batch, pi_old *is* the
policy being trained, so old_logp is logp itself, detached: the ratio is exactly 1 in value, and
the clip never acts. The loss is then -mean(A_i) over tokens, and advantages have mean 0 within
every group: exactly 0 with `sequence`, and with `dapo` only as far as long and short completions
have different advantages. But its gradient is not 0: d ratio / d theta = ratio * d logp / d theta,
so the gradient is -mean(A_i * d logp_it / d theta), the REINFORCE gradient with the group mean as
baseline. A flat loss curve in GRPO says nothing; the reward curve is the one to watch.

k3 (Schulman, "Approximating KL divergence", 2020): with x = ref/pi for a token sampled from pi,
E[x] = 1, so E[x - 1 - log x] = E[-log x] = KL(pi || ref). Each term is >= 0 (x - 1 >= log x), which
gives it far less variance than the plain -log x, and it needs only the sampled token's log-probs.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G): G completions of each of P prompts -> advantages (P, G).

    Each completion is compared with its own group only: the baseline is the group's mean reward
    (no value model). A group whose rewards are all equal gets advantage 0 everywhere: it teaches
    nothing, however high its rewards.
    """
    advantages = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    if scale:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)  # (P, G)
    return advantages


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(pi || ref) per sampled token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_policy_term(logprobs, old_logprobs, advantages, epsilon_low: float, epsilon_high: float):
    """(pg (B, T), ratio (B, T)): the clipped surrogate -min(ratio A, clip(ratio) A) per token.

    logprobs, old_logprobs (B, T); advantages (B,), one per completion. The min takes the clipped
    branch only where it is the smaller (more pessimistic) objective: a token whose probability
    already rose past 1 + epsilon_high (A > 0) or fell below 1 - epsilon_low (A < 0) gets no
    gradient, which keeps several passes over one batch from running away.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    A = advantages[:, None]  # (B, 1)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * A, clipped * A), ratio


def token_weights(mask: torch.Tensor, normalization: str, dtype=torch.float32) -> torch.Tensor:
    """(B, T): the weight of each completion token in the loss sum, before the global division.

    dapo: 1 per completion token. sequence: 1 / (the completion's token count), so each
    completion's weights add up to 1. Prompt and padding positions (mask False) weigh 0.
    """
    mask = mask.to(dtype)
    if normalization == "dapo":
        return mask
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)


def loss_units(mask: torch.Tensor, normalization: str) -> torch.Tensor:
    """What the loss is a mean over, in this micro-batch (a 0-dim tensor): completion tokens for
    dapo, completions for sequence. The loop sums it over the global batch and divides once."""
    if normalization == "dapo":
        return mask.sum()
    return (mask.sum(dim=1) > 0).sum()


def grpo_loss_sum(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    normalization: str = "dapo",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the weighted loss sum of this micro-batch, sums to log), see the module docstring.

    logprobs (B, T): log pi of each completion token, differentiable; old_logprobs (B, T): the
    sampling policy's, or None for one pass per batch (then logprobs.detach() is used: ratio 1);
    ref_logprobs (B, T): the reference's, or None when beta = 0; advantages (B,); mask (B, T):
    True on completion tokens. The caller divides the sum by the global `loss_units`.
    The sums (over this micro-batch's completion tokens): `clipped` tokens whose clip acts,
    `kl`, and `tokens`.
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    pg, ratio = clipped_policy_term(logprobs, old_logprobs, advantages, epsilon_low, epsilon_high)  # (B, T)
    per_token = pg
    if beta > 0:
        kl = k3_kl(logprobs, ref_logprobs)  # (B, T)
        per_token = per_token + beta * kl
    weights = token_weights(mask, normalization, per_token.dtype)  # (B, T)
    loss_sum = (per_token * weights).sum()

    A = advantages[:, None]
    clipped = ((ratio < 1 - epsilon_low) & (A < 0)) | ((ratio > 1 + epsilon_high) & (A > 0))  # (B, T)
    sums = {"clipped": (clipped & mask).sum().float(), "tokens": mask.sum().float()}
    if beta > 0:
        sums["kl"] = (kl.detach() * mask).sum()
    return loss_sum, sums
