"""Losses computed from the final hidden states, without ever building the (B, T, V) logits.

The lm_head of a LLaMA maps each token's hidden state (C,) to V logits; for a batch that is a
(B, T, V) tensor, in fp32 the largest tensor of a training step by far (8 x 1024 tokens at
V = 32000 is 1 GB, and its gradient another). Everything here instead takes the hidden states and
the lm_head weight and works through the tokens a chunk at a time, so at most one chunk of logits
exists at once:

* `linear_cross_entropy_sum`: the summed token cross-entropy, for pretraining and SFT. The
  gradients are made in the forward, chunk by chunk, so nothing is recomputed.
* `sequence_logprobs`: the sum of log p(label) over each sequence's target tokens, one sum per
  sequence (a row of a padded batch, or a document of a packed one), and its token count. The
  preference losses (DPO, ORPO, SimPO) and GRPO are functions of these sums. Here the upstream
  gradient of each sequence is known only in the backward, so the backward recomputes each
  chunk's logits.
* `token_logprobs`: log p(label) of every target token, one value per token (GRPO's ratio to
  the sampling policy and its KL to the reference are per token), with the entropy of each
  predicted distribution on the side; its backward recomputes each chunk's logits too.

Each has a readable reference beside it (`..._reference`) that the tests compare it with.

Shapes: N tokens (B * T flattened), C hidden size, V vocabulary, S sequences.
Labels are already shifted: `labels[t]` is the target of position t, or IGNORE_INDEX.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of a position that carries no loss (PyTorch's and HF's convention)


# ----------------------------------------------------------------------------------------------
# Summed token cross-entropy
# ----------------------------------------------------------------------------------------------


class LogitsWorkspace:
    """A (rows, V) fp32 buffer for the loss's chunk of logits, kept from one step to the next.

    A fresh (512, 32000) fp32 tensor on the CPU is a fresh 66 MB mapping whose every page is
    faulted in and zeroed on first touch; one buffer reused across steps pays that once (see
    README's performance section). CPU only: CUDA's caching allocator already reuses freed memory.
    The model owns one (`Llama.logits_workspace`); it is not a registered buffer, so it is never
    saved and never moved by `.to()`.
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def get(self, rows: int, vocab_size: int, device: torch.device) -> torch.Tensor | None:
        """At least (rows, vocab_size) fp32 on the CPU; None on other devices."""
        if device.type != "cpu":
            return None
        old = self.buffer
        if old is None or old.shape[0] < rows or old.shape[1] != vocab_size:
            self.buffer = old = None  # free the old buffer before allocating the new one
            self.buffer = torch.empty(rows, vocab_size, dtype=torch.float32)
        return self.buffer


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_t CE(hidden_t @ weight.T, label_t) over chunks of tokens, gradients made in the forward.

    For each chunk: logits (n, V) in fp32 and each token's -log p(target); if gradients are
    wanted, the softmax minus the one-hot target is turned at once into the gradients of hidden
    and weight (the two matmuls the backward would have done), and the chunk's logits are
    dropped. Peak extra memory is one chunk of logits, and nothing is recomputed (but, on the CPU,
    the rare rows whose p(target) underflows). backward only scales the stored gradients by the
    incoming scalar.

    Besides the three matmuls, passes over the (n, V) chunk are what cost, so there are as few
    as the device allows: the softmax in place, a row-wise kernel that keeps each row in cache
    while it finds the max, sums the exponentials and scales (`torch.logsumexp` followed by a
    softmax takes eight passes and two (n, V) allocations), and on devices other than the CPU the
    row max (`_softmax_and_token_loss` says why). Without gradients the loss needs no softmax:
    max, exp, sum in place. No host sync on CUDA. How the chunk size trades against speed is in
    README's performance section (`benchmarks/train_step.py --loss-chunk-tokens N`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, grad_enabled, workspace, host_checks_are_free):
        # hidden (N, C), weight (V, C), labels (N,); workspace None or (>= min(N, chunk_size), V) fp32
        # host_checks_are_free: asking a tensor's value costs no device sync (the CPU)
        need_hidden_grad = grad_enabled and hidden.requires_grad
        need_weight_grad = grad_enabled and weight.requires_grad
        N = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = None  # (V, C) fp32; the first chunk's matmul creates it (no zero fill)
        for start in range(0, N, chunk_size):
            h = hidden[start : start + chunk_size]  # (n, C)
            y = labels[start : start + chunk_size]  # (n,)
            is_target = y != IGNORE_INDEX  # (n,)
            safe_y = y.clamp(min=0)
            if workspace is None:
                logits = (h @ weight.t()).float()  # (n, V)
            elif h.dtype == torch.float32:
                logits = torch.mm(h, weight.t(), out=workspace[: len(h)])  # (n, V)
            else:
                logits = workspace[: len(h)].copy_(h @ weight.t())  # (n, V)
            if not (need_hidden_grad or need_weight_grad):
                target_logit = logits.gather(1, safe_y[:, None]).squeeze(1)  # (n,), before logits are overwritten
                row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                row_sum = logits.sub_(row_max).exp_().sum(dim=-1)  # (n,), in place: the softmax numerators
                log_normaliser = row_max.squeeze(1) + row_sum.log()  # (n,) = logsumexp of the logits
                total += ((log_normaliser - target_logit) * is_target).sum()
                continue
            probabilities, token_loss = _softmax_and_token_loss(logits, h, weight, safe_y, is_target,
                                                                host_checks_are_free)  # (n, V), (n,)
            total += torch.where(is_target, token_loss, 0.0).sum()  # an ignored row's loss may be inf
            # d loss / d logits = softmax - one_hot(target); rows without a target get zero. On the
            # CPU such rows were dropped before (target_rows_only) and asking is free; elsewhere
            # asking would be a host sync per chunk, so the mask is applied unasked.
            d_logits = probabilities  # (n, V)
            if not host_checks_are_free or not bool(is_target.all()):
                d_logits.mul_(is_target[:, None])
            d_logits[torch.arange(len(y), device=y.device), safe_y] -= is_target.to(d_logits.dtype)
            d_logits = d_logits.to(h.dtype)
            if need_hidden_grad:
                torch.mm(d_logits, weight, out=grad_hidden[start : start + chunk_size])  # (n, C)
            if need_weight_grad:
                grad_weight = _accumulate_weight_grad(grad_weight, d_logits, h)  # (V, C)
        if need_weight_grad and grad_weight is None:  # no token at all
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        # Kept on ctx (not save_for_backward) so that backward may scale them in place.
        ctx.grads = (grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy_sum: backward may run only once (retain_graph is not supported)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # scaled in place below: a second backward would scale them twice
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _softmax_and_token_loss(logits, h, weight, safe_y, is_target, host_checks_are_free):
    """logits (n, V) fp32 -> (their softmax, written over them; each row's -log p(target) (n,)).

    The loss comes from one probability of the softmax and one logit: -log p(target) =
    lse - logit_target, and lse = logit_j - log p_j for any j. On the CPU, j is the target itself:
    no extra pass. A p(target) below fp32's smallest normal number (a loss above 87) has lost its
    precision, and those rare rows are recomputed exactly; asking whether there are any is free on
    the CPU. Elsewhere that question is a host sync per chunk, so j is the row's largest logit,
    whose probability 1 / sum lies in [1/V, 1] and never underflows, at the cost of one more pass
    over the chunk (the row max and its index).
    """
    target_logit = logits.gather(1, safe_y[:, None]).squeeze(1)  # (n,), before logits are overwritten
    if host_checks_are_free:
        probabilities = torch.ops.aten._softmax.out(logits, -1, False, out=logits)  # (n, V)
        target_probability = probabilities.gather(1, safe_y[:, None]).squeeze(1)  # (n,)
        token_loss = -target_probability.log()  # (n,)
        underflowed = (target_probability < torch.finfo(torch.float32).tiny) & is_target  # (n,)
        if bool(underflowed.any()):
            rows = underflowed.nonzero().squeeze(1)  # (r,)
            exact_logits = (h[rows] @ weight.t()).float()  # (r, V)
            token_loss[rows] = torch.logsumexp(exact_logits, -1) - target_logit[rows]
        return probabilities, token_loss
    row_max, row_argmax = logits.max(dim=-1, keepdim=True)  # (n, 1) each
    probabilities = torch.ops.aten._softmax.out(logits, -1, False, out=logits)  # (n, V)
    log_normaliser = (row_max - probabilities.gather(1, row_argmax).log()).squeeze(1)  # (n,)
    return probabilities, log_normaliser - target_logit


def _accumulate_weight_grad(grad_weight, d_logits, h):
    """grad_weight (V, C) fp32 += d_logits.T @ h; in fp32 the sum happens inside the matmul (addmm_),
    which saves writing and re-reading a (V, C) temporary per chunk."""
    if grad_weight is None:
        return (d_logits.t() @ h).float()
    if d_logits.dtype == grad_weight.dtype:
        return grad_weight.addmm_(d_logits.t(), h)
    return grad_weight.add_((d_logits.t() @ h).float())


def target_rows_only(hidden: torch.Tensor, labels: torch.Tensor, *aligned: torch.Tensor):
    """hidden (N, C), labels (N,) and any further (N,) tensors -> only the rows that have a target.

    An SFT batch trains only the replies: the prompt and the padding (often half the tokens or
    more) carry label -100 and need no lm_head row, which is the largest matmul of a small model.
    Dropping them first makes the loss cost scale with target tokens, not tokens. Selecting rows
    needs their count on the host: free on the CPU, a device sync on CUDA, so the callers here use
    this on the CPU only. The gradient of the dropped rows is zero (autograd's index_select backward).
    """
    is_target = labels != IGNORE_INDEX  # (N,)
    keep = is_target.nonzero().squeeze(1)  # (n,)
    if len(keep) == len(labels):
        return (hidden, labels, *aligned)
    return tuple(tensor.index_select(0, keep) for tensor in (hidden, labels, *aligned))


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    workspace: LogitsWorkspace | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `labels` (-100 = ignored), chunked.

    hidden (..., C), weight (V, C), labels (...) -> () fp32. The caller divides by the number of
    target tokens (of the whole global batch, so that every token weighs the same).
    `workspace`: where each chunk's logits go on the CPU; nothing in it outlives the call.
    """
    C = hidden.shape[-1]
    hidden, labels = hidden.reshape(-1, C), labels.reshape(-1)  # (N, C), (N,)
    buffer = None
    if workspace is not None:
        buffer = workspace.get(min(chunk_size, len(labels)), weight.shape[0], hidden.device)
    if hidden.device.type == "cpu":
        hidden, labels = target_rows_only(hidden, labels)
    # Inside an autograd.Function's forward grad mode is always off: decide here whether to make grads.
    grad_enabled = torch.is_grad_enabled()
    host_checks_are_free = hidden.device.type == "cpu"
    return _LinearCrossEntropySum.apply(hidden, weight, labels, chunk_size, grad_enabled, buffer,
                                        host_checks_are_free)


def linear_cross_entropy_sum_reference(hidden, weight, labels, chunk_size: int = 1024) -> torch.Tensor:
    """The readable version of `linear_cross_entropy_sum`: what the tests hold the fast one to.

    Same result, but autograd keeps every chunk's logits for the backward, so it saves no memory.
    """
    C = hidden.shape[-1]
    hidden, labels = hidden.reshape(-1, C), labels.reshape(-1)  # (N, C), (N,)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for h, y in zip(hidden.split(chunk_size), labels.split(chunk_size)):
        logits = (h @ weight.t()).float()  # (n, V)
        total = total + F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
    return total


# ----------------------------------------------------------------------------------------------
# Per-sequence sums of token log-probabilities
# ----------------------------------------------------------------------------------------------


class SequenceLogprobs(NamedTuple):
    """One entry per sequence: what preference losses are made of.

    logprobs   (S,) fp32: sum over the sequence's target tokens of log p(label); differentiable.
    n_tokens   (S,) long: how many target tokens that sum has (SimPO divides by it).
    """

    logprobs: torch.Tensor
    n_tokens: torch.Tensor


def batch_sequence_ids(labels: torch.Tensor, document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The sequence index of every token of a batch (B, T), and the number of sequences S.

    Without `document_ids` (a padded batch) each row is one sequence: row b is sequence b. With
    them (packed rows) each run of one document id within a row is one sequence, numbered in
    row-major order: a document that a block boundary cut in two is two sequences, one per row.
    Negative document ids (the padding of a packed block) get sequence id -1: counted nowhere.
    `labels` (B, T) only gives the shape and device. Counting the runs is one host sync.
    """
    B, T = labels.shape
    if document_ids is None:
        return torch.arange(B, device=labels.device)[:, None].expand(B, T), B
    is_real = document_ids >= 0  # (B, T)
    starts_a_run = torch.ones_like(is_real)
    starts_a_run[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    starts_a_run &= is_real
    run_index = starts_a_run.flatten().cumsum(0).view(B, T) - 1  # (B, T): row-major run counter
    sequence_ids = torch.where(is_real, run_index, torch.full_like(run_index, -1))
    return sequence_ids, int(starts_a_run.sum())


def _counted(labels: torch.Tensor, sequence_ids: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the tokens that enter a sequence's sum (a target, and a sequence to belong to)."""
    return (labels != IGNORE_INDEX) & (sequence_ids >= 0)


class _SequenceLogprobs(torch.autograd.Function):
    """Per-sequence sums of log p(label) over chunks of tokens; the backward recomputes the logits.

    The forward keeps, per token, only the log-normaliser (logsumexp of its logits). The backward
    knows the upstream gradient g[s] of each sequence, so each token gets g of its sequence, and
    d logprob / d logits = one_hot(label) - softmax(logits): per chunk, one matmul to recompute
    the logits, one exp pass, and the two matmuls of the gradients. One chunk of logits exists at
    a time in both directions.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, sequence_ids, n_sequences, chunk_size):
        # hidden (N, C), weight (V, C), labels (N,), sequence_ids (N,)
        counted = _counted(labels, sequence_ids)  # (N,)
        safe_labels, safe_ids = labels.clamp(min=0), sequence_ids.clamp(min=0)
        sums = torch.zeros(n_sequences, dtype=torch.float32, device=hidden.device)  # (S,)
        log_normalisers = []
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], safe_labels[start : start + chunk_size]  # (n, C), (n,)
            logits = (h @ weight.t()).float()  # (n, V)
            log_normaliser = torch.logsumexp(logits, dim=-1)  # (n,)
            token_logprob = logits.gather(1, y[:, None]).squeeze(1) - log_normaliser  # (n,)
            part = slice(start, start + chunk_size)
            sums.index_add_(0, safe_ids[part], token_logprob * counted[part])
            log_normalisers.append(log_normaliser)
        log_normaliser = torch.cat(log_normalisers) if log_normalisers else hidden.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(hidden, weight, safe_labels, safe_ids, counted, log_normaliser)
        ctx.chunk_size = chunk_size
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        hidden, weight, safe_labels, safe_ids, counted, log_normaliser = ctx.saved_tensors
        token_grad = grad_sums.float()[safe_ids] * counted  # (N,): g of each token's sequence, 0 if not counted
        grad_hidden, grad_weight = _backward_through_chunks(
            hidden, weight, safe_labels, log_normaliser, token_grad, ctx.chunk_size, *ctx.needs_input_grad[:2])
        return grad_hidden, grad_weight, None, None, None, None


def _backward_through_chunks(hidden, weight, safe_labels, log_normaliser, token_grad, chunk_size,
                             need_hidden_grad, need_weight_grad):
    """The gradients of hidden (N, C) and weight (V, C) when token t's log p(label) has upstream
    gradient token_grad[t]: d logprob / d logits = one_hot(label) - softmax(logits), one chunk of
    recomputed logits at a time."""
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_weight = None  # (V, C) fp32
    for start in range(0, hidden.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        h, y, g = hidden[part], safe_labels[part], token_grad[part]  # (n, C), (n,), (n,)
        logits = (h @ weight.t()).float()  # (n, V), recomputed
        softmax = logits.sub_(log_normaliser[part, None]).exp_()  # (n, V)
        d_logits = softmax.mul_(-g[:, None])  # (n, V): g * (one_hot - softmax), the one-hot next
        d_logits[torch.arange(len(y), device=y.device), y] += g
        d_logits = d_logits.to(h.dtype)
        if need_hidden_grad:
            torch.mm(d_logits, weight, out=grad_hidden[part])  # (n, C)
        if need_weight_grad:
            grad_weight = _accumulate_weight_grad(grad_weight, d_logits, h)  # (V, C)
    if need_weight_grad:
        if grad_weight is None:  # no token at all
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    sequence_ids: torch.Tensor,
    n_sequences: int,
    chunk_size: int = 1024,
) -> SequenceLogprobs:
    """Sum of log p(label) over each sequence's target tokens, without (B, T, V) logits.

    hidden (B, T, C): the model's final normed hidden states (`Llama.hidden_states`).
    weight (V, C): the lm_head weight. labels (B, T): shifted targets, -100 where none.
    sequence_ids (B, T) long: the sequence each token belongs to, in [0, n_sequences), or -1 for
    none (`batch_sequence_ids` makes them from a batch).
    Returns `SequenceLogprobs(logprobs (S,), n_tokens (S,))`. A sequence with no target token
    has logprob 0 and n_tokens 0. Gradients flow to hidden and weight from any function of the
    sums (a DPO loss is one), and backward may run more than once.
    """
    C = hidden.shape[-1]
    hidden, labels, sequence_ids = hidden.reshape(-1, C), labels.reshape(-1), sequence_ids.reshape(-1)
    counted = _counted(labels, sequence_ids)  # (N,)
    n_tokens = torch.zeros(n_sequences, dtype=torch.long, device=labels.device)
    n_tokens.index_add_(0, sequence_ids.clamp(min=0), counted.long())  # (S,)
    if hidden.device.type == "cpu":  # see target_rows_only
        labels = torch.where(counted, labels, torch.full_like(labels, IGNORE_INDEX))
        hidden, labels, sequence_ids = target_rows_only(hidden, labels, sequence_ids)
    logprobs = _SequenceLogprobs.apply(hidden, weight, labels, sequence_ids, n_sequences, chunk_size)
    return SequenceLogprobs(logprobs, n_tokens)


def sequence_logprobs_reference(hidden, weight, labels, sequence_ids, n_sequences: int, chunk_size: int = 1024):
    """The readable version of `sequence_logprobs` (log_softmax over each chunk's full logits)."""
    C = hidden.shape[-1]
    hidden, labels, sequence_ids = hidden.reshape(-1, C), labels.reshape(-1), sequence_ids.reshape(-1)
    counted = _counted(labels, sequence_ids)  # (N,)
    logprobs = torch.zeros(n_sequences, dtype=torch.float32, device=hidden.device)
    n_tokens = torch.zeros(n_sequences, dtype=torch.long, device=labels.device)
    for start in range(0, len(labels), chunk_size):
        part = slice(start, start + chunk_size)
        y, ids, keep = labels[part].clamp(min=0), sequence_ids[part].clamp(min=0), counted[part]  # (n,) each
        token_logprobs = F.log_softmax((hidden[part] @ weight.t()).float(), dim=-1)  # (n, V)
        target_logprobs = token_logprobs.gather(1, y[:, None]).squeeze(1)  # (n,)
        logprobs = logprobs.index_add(0, ids, target_logprobs * keep)
        n_tokens = n_tokens.index_add(0, ids, keep.long())
    return SequenceLogprobs(logprobs, n_tokens)


# ----------------------------------------------------------------------------------------------
# Per-token log-probabilities (and entropies)
# ----------------------------------------------------------------------------------------------


class TokenLogprobs(NamedTuple):
    """One entry per token, shaped like the labels; 0 where the label is -100.

    logprobs  fp32: log p(label); differentiable.
    entropy   fp32: the entropy of the predicted distribution, -sum_v p_v log p_v; no gradient
              (a figure to log: it is nearly free once a chunk's logits exist).
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor


class _TokenLogprobs(torch.autograd.Function):
    """log p(label) of every token over chunks of tokens, and each distribution's entropy.

    The forward keeps, per token, only the log-normaliser; the backward gets one upstream gradient
    per token and recomputes each chunk's logits (`_backward_through_chunks`), as for the
    per-sequence sums.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        # hidden (N, C), weight (V, C), labels (N,)
        is_target = labels != IGNORE_INDEX  # (N,)
        safe_labels = labels.clamp(min=0)
        logprobs, entropies, log_normalisers = [], [], []
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], safe_labels[start : start + chunk_size]  # (n, C), (n,)
            logits = (h @ weight.t()).float()  # (n, V)
            log_normaliser = torch.logsumexp(logits, dim=-1)  # (n,)
            logprobs.append(logits.gather(1, y[:, None]).squeeze(1) - log_normaliser)  # (n,)
            # H = -sum p log p = logsumexp - sum p * logits
            softmax = (logits - log_normaliser[:, None]).exp()  # (n, V)
            entropies.append(log_normaliser - (softmax * logits).sum(dim=-1))  # (n,)
            log_normalisers.append(log_normaliser)
        empty = hidden.new_zeros(0, dtype=torch.float32)
        logprob, entropy, log_normaliser = (torch.cat(parts) if parts else empty
                                            for parts in (logprobs, entropies, log_normalisers))
        ctx.save_for_backward(hidden, weight, safe_labels, is_target, log_normaliser)
        ctx.chunk_size = chunk_size
        entropy = entropy * is_target
        ctx.mark_non_differentiable(entropy)
        return logprob * is_target, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, safe_labels, is_target, log_normaliser = ctx.saved_tensors
        token_grad = grad_logprobs.float() * is_target  # (N,)
        grad_hidden, grad_weight = _backward_through_chunks(
            hidden, weight, safe_labels, log_normaliser, token_grad, ctx.chunk_size, *ctx.needs_input_grad[:2])
        return grad_hidden, grad_weight, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int = 1024) -> TokenLogprobs:
    """log p(label) of every target token, and the entropy there, without (B, T, V) logits.

    hidden (B, T, C): the final normed hidden states (`Llama.hidden_states`); weight (V, C): the
    lm_head weight; labels (B, T): shifted targets, -100 where none. Returns `TokenLogprobs`
    of two (B, T) fp32 tensors, 0 where the label is -100. Gradients flow to hidden and weight
    from any function of the log-probs; backward may run more than once.
    """
    shape, C = labels.shape, hidden.shape[-1]
    hidden, labels = hidden.reshape(-1, C), labels.reshape(-1)  # (N, C), (N,)
    if hidden.device.type != "cpu":
        logprobs, entropy = _TokenLogprobs.apply(hidden, weight, labels, chunk_size)
        return TokenLogprobs(logprobs.view(shape), entropy.view(shape))
    # On the CPU only the target rows go through the lm_head (see target_rows_only); their values
    # are then put back in place, zeros elsewhere (index_copy passes gradients back to them).
    keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (n,)
    logprobs, entropy = _TokenLogprobs.apply(hidden.index_select(0, keep), weight, labels[keep], chunk_size)
    zeros = torch.zeros(len(labels), dtype=torch.float32, device=labels.device)
    return TokenLogprobs(zeros.index_copy(0, keep, logprobs).view(shape), zeros.index_copy(0, keep, entropy).view(shape))


def token_logprobs_reference(hidden, weight, labels) -> TokenLogprobs:
    """The readable version of `token_logprobs`: log_softmax over the full (B, T, V) logits."""
    is_target = labels != IGNORE_INDEX  # (B, T)
    log_softmax = F.log_softmax((hidden @ weight.t()).float(), dim=-1)  # (B, T, V)
    logprobs = log_softmax.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (B, T)
    entropy = -(log_softmax.exp() * log_softmax).sum(dim=-1)  # (B, T)
    return TokenLogprobs(logprobs * is_target, (entropy * is_target).detach())
