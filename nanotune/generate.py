"""Text generation with a pre-allocated KV cache: greedy, or sampled with temperature, top-k, top-p
and a repetition penalty; one prompt at a time or a left-padded batch.

How a token is made (the gpt-fast recipe, in plain PyTorch):

1. Allocate one `KVCache` for prompt + `max_new_tokens` tokens, before the first forward, so
   nothing is concatenated or re-allocated while decoding.
2. Prefill: one forward over the whole prompt fills the cache and gives the logits of the first
   new token (the lm_head on the last position only).
3. Decode: one forward per new token, of that token alone (T = 1), attending to everything cached.
   Without the cache every step would run the whole sequence again (`decode_without_cache`, the
   slow reference the tests hold the fast path to).

The logits of each step become a token in the order `transformers` uses, so the same settings
mean the same thing here and there:

    repetition penalty -> greedy: argmax
                       -> sampling: / temperature -> top-k -> top-p -> softmax -> multinomial

`temperature == 0` means greedy; top-k and top-p are then ignored (as with HF's do_sample=False).

Batches are LEFT padded: every prompt then ends in the last column, so the next token of every row
is read from the same place and every row appends its new token to the same cache slot. The
padding is hidden from attention (`KVCache.set_padding`) and positions count real tokens only, so
a row's tokens come out the same as when it is generated alone.

Sampling draws from one `torch.Generator` shared by the rows, or from one generator per row (a
list): then a row's tokens depend on its own generator only, not on which other rows share its
batch, which is what lets GRPO sample a prompt's completions alike on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .distributed import is_sharded
from .kv_cache import KVCache
from .model import Llama


def generate(
    model: Llama,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The new tokens that follow `prompt_ids` (the prompt itself is not returned).

    Stops after `max_new_tokens`, or at the first token in `eos_id` (one id or a list, e.g.
    LLaMA-3's end-of-turn and end-of-text); that token is kept as the last one returned, as
    `transformers` does, so a caller can tell a finished answer from one cut off by the limit
    (`Tokenizer.decode` leaves it out of the text anyway).

    Sampling draws from `generator` (a `torch.Generator` on the model's device), so the same
    seed gives the same tokens; None uses the global RNG.
    """
    return generate_batch(
        model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, eos_id=eos_id, generator=generator,
    )[0]


def generate_batch(
    model: Llama,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | list[int] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    pad_id: int = 0,
    all_ranks_finished: Callable[[bool], bool] | None = None,
) -> list[list[int]]:
    """`generate` for several prompts at once, left-padded with `pad_id`; one list of new tokens each.

    Each row stops at its own EOS (finished rows keep riding along, fed `pad_id`, until every row
    is done or the limit is reached). Greedy output equals generating each prompt alone; sampled
    output does too when `generator` is a list of one generator per row, not when the rows
    share one random stream.

    `all_ranks_finished`: for a model sharded with FSDP, where every forward is a collective and
    every rank must run as many as the others: it turns "all of this rank's rows are done" into
    "all rows of every rank are done", and decoding stops only then.

    Runs under `torch.inference_mode` (`no_grad` for an FSDP-sharded model) with the model in eval
    mode (its previous mode is restored), on the model's device and dtype.
    """
    check_sampling_options(temperature, top_k, top_p, repetition_penalty)
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token (usually BOS)")
    if not prompts:
        return []
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    was_training = model.training
    model.eval()
    # FSDP2 all-gathers parameters into buffers it reuses when training; buffers written under
    # inference_mode could never be written again outside it, so a sharded model samples under no_grad.
    no_grad = torch.no_grad() if is_sharded(model) else torch.inference_mode()
    try:
        with no_grad:
            return _generate_batch(
                model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                _stop_ids(eos_id), generator, pad_id, all_ranks_finished,
            )
    finally:
        model.train(was_training)


def _generate_batch(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                    stop_ids, generator, pad_id, all_ranks_finished) -> list[list[int]]:
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    B = len(prompts)
    if isinstance(generator, (list, tuple)) and len(generator) != B:
        raise ValueError(f"{len(generator)} generators for {B} prompts: give one per prompt, or one for all")
    # A prompt asked for G times (GRPO's group) is prefilled once; its cache row is then copied.
    distinct, row_of = distinct_prompts(prompts)
    input_ids, attention_mask = left_pad(distinct, pad_id, device)  # (U, T) each
    T = input_ids.shape[1]
    # A row's positions count its real tokens only: padding to the left does not move them.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (U, T)
    cache = KVCache(model.config, len(distinct), T, device=device, dtype=dtype)
    cache.set_padding(attention_mask)
    logits = prefill(model, input_ids, position_ids, cache)  # (U, V)
    row_of = torch.tensor(row_of, device=device)  # (B,) the distinct prompt of each row
    cache = cache.select_rows(row_of, max_len=T + max_new_tokens)  # (B, ...) with room for the answers
    logits, input_ids, attention_mask = logits[row_of], input_ids[row_of], attention_mask[row_of]  # (B, ...)
    next_position = position_ids[row_of, -1:] + 1  # (B, 1)

    seen = None  # (B, V) bool: tokens of prompt + output, for the repetition penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
        rows, columns = attention_mask.nonzero(as_tuple=True)
        seen[rows, input_ids[rows, columns]] = True  # real prompt tokens only, never the padding

    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    new_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, n)
    going = torch.arange(B, device=device)  # (b,) the row of each row still in the batch
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # (b,)
    for step in range(max_new_tokens):
        token = choose_next_token(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)  # (b,)
        token = token.masked_fill(finished, pad_id)
        new_tokens[going, step] = token
        if seen is not None:
            seen[torch.arange(len(going), device=device), token] = True
        finished |= torch.isin(token, stop)
        # One host sync per token, to stop as soon as every row is done.
        if step == max_new_tokens - 1:
            break
        n_finished = int(finished.sum())
        done = n_finished == len(going)
        if all_ranks_finished(done) if all_ranks_finished else done:
            break
        if not done and n_finished * 4 >= len(going):
            # A quarter of the batch has finished: drop those rows, so that the steps to come
            # compute only rows still going (GRPO's answers end at very different lengths).
            keep = (~finished).nonzero().squeeze(1)  # (b_new,)
            cache, going, token, finished = cache.select_rows(keep), going[keep], token[keep], finished[keep]
            next_position = next_position[keep]
            seen = seen[keep] if seen is not None else None
            if isinstance(generator, (list, tuple)):
                generator = [generator[i] for i in keep.tolist()]
        hidden = model.hidden_states(token[:, None], position_ids=next_position, kv_cache=cache)  # (b, 1, C)
        logits = next_token_logits(model, hidden[:, -1])  # (b, V)
        next_position = next_position + 1

    return [_cut_after_stop(row, set(stop_ids)) for row in new_tokens.tolist()]


def distinct_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prompts in order of first appearance, and for each prompt its index among them."""
    index: dict[tuple[int, ...], int] = {}
    row_of = [index.setdefault(tuple(prompt), len(index)) for prompt in prompts]
    return [list(prompt) for prompt in index], row_of


def prefill(model: Llama, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One forward over the prompts (B, T) that fills the cache; the logits (B, V) of the next token.

    Only the last position's logits are wanted, so the lm_head runs on that position alone: on the
    whole prompt it would be the largest matmul of generation (T x V per row) for nothing
    (transformers' `logits_to_keep=1`; see benchmarks/grpo_sampling.py).
    """
    hidden = model.hidden_states(input_ids, position_ids=position_ids, kv_cache=cache)  # (B, T, C)
    return next_token_logits(model, hidden[:, -1])  # (B, V)


def next_token_logits(model: Llama, hidden: torch.Tensor) -> torch.Tensor:
    """The lm_head on the last hidden state of each row: hidden (B, C) -> logits (B, V).

    A decode step multiplies a few rows by the largest matrix of the model, (V, C). On the CPU,
    MKL computes that product faster as weight @ hidden.T, (V, C) @ (C, B), than as
    hidden @ weight.T, (B, C) @ (C, V), the layout nn.Linear asks for (benchmarks/grpo_sampling.py
    measures the whole); the result is the same product, laid out (V, B), copied back to (B, V).
    A LoRA or quantized head, a biased one and an FSDP-sharded model take the plain call.
    """
    head = model.lm_head
    if hidden.device.type == "cpu" and type(head) is nn.Linear and head.bias is None and not is_sharded(model):
        return torch.mm(head.weight, hidden.t()).t().contiguous()  # (B, V)
    return head(hidden)


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, T) with each prompt right-aligned, and attention_mask (B, T): 1 real, 0 pad."""
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, T - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, T - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def choose_next_token(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """logits (B, V) of the next position -> the chosen token ids (B,), in transformers' order.

    `generator`: None draws from the global RNG with torch.multinomial, as transformers does (the
    same `torch.manual_seed` gives the same tokens); a generator, or a list of one per row (row b
    then draws from generator[b] alone), draws one uniform number per row for `sample_inverse_cdf`."""
    logits = logits.float()  # (B, V); bf16 logits would make near-ties and probabilities coarse
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    probabilities = logits.softmax(dim=-1)  # (B, V)
    if generator is None:  # the global RNG, drawn from exactly as transformers draws
        return torch.multinomial(probabilities, num_samples=1).squeeze(1)
    if isinstance(generator, (list, tuple)):
        uniforms = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generator])  # (B,)
    else:
        uniforms = torch.rand(len(logits), generator=generator, device=logits.device)  # (B,)
    return sample_inverse_cdf(probabilities, uniforms)


def sample_inverse_cdf(probabilities: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probabilities (B, V), one uniform number in [0, 1) per row (B,) -> one token per row (B,).

    The token whose CDF step holds the number: one batched cumsum and searchsorted, cheaper on
    the CPU than torch.multinomial over a large vocabulary. Row b
    depends on uniforms[b] alone, so a generator per row makes a row's tokens independent of the
    rest of the batch. A token of probability 0 (cut by top-k or top-p) is never chosen: its CDF
    step is empty.
    """
    cdf = probabilities.cumsum(dim=-1)  # (B, V)
    targets = (uniforms * cdf[:, -1])[:, None]  # (B, 1), below the row's total
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(1)  # first index whose CDF exceeds it
    return tokens.clamp(max=probabilities.shape[-1] - 1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019), as HF applies it: for tokens already seen, positive
    logits are divided by `penalty` and negative ones multiplied by it.

    Dividing a negative logit would *raise* it, so the sign decides; either way a penalty > 1
    makes a seen token less likely. logits (B, V), seen (B, V) bool.
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits of each row (and any tied with the k-th); -inf elsewhere."""
    top_k = min(top_k, logits.shape[-1])
    kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probabilities add up to at least `top_p`; -inf elsewhere. The most likely token always stays.

    Written as HF writes it: sort ascending and drop the tokens whose running total is still
    <= 1 - top_p, which is the same set, with the same tie-breaking at the boundary.
    """
    sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=False)  # (B, V)
    running_total = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    drop_sorted = running_total <= (1 - top_p)
    drop_sorted[:, -1] = False  # the most likely token
    drop = drop_sorted.scatter(1, sorted_index, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def check_sampling_options(temperature, top_k, top_p, repetition_penalty) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), not {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, not {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, not {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), not {repetition_penalty}")


def _stop_ids(eos_id: int | list[int] | None) -> list[int]:
    if eos_id is None:
        return []
    if isinstance(eos_id, (list, tuple, set)):
        return [int(i) for i in eos_id]
    return [int(eos_id)]


def _cut_after_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


def decode_without_cache(model: Llama, prompt_ids: list[int], max_new_tokens: int, eos_id=None) -> list[int]:
    """Greedy decoding the slow, obviously correct way: the whole sequence through the model for
    every new token, no cache. The reference `generate` is tested against."""
    stop_ids = set(_stop_ids(eos_id))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens, new_tokens = list(prompt_ids), []
    try:
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                logits = model(torch.tensor([tokens], device=device))[0, -1]  # (V,)
                token = int(logits.float().argmax())
                tokens.append(token)
                new_tokens.append(token)
                if token in stop_ids:
                    break
    finally:
        model.train(was_training)
    return new_tokens
