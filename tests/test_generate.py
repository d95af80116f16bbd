"""nanotune/generate.py against transformers' `generate` on the same weights, against decoding
without a cache, and against distributions computed by hand."""

from __future__ import annotations

import pytest
import torch

from helpers import hf_llama_from, tiny_model
from nanotune.generate import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    decode_without_cache,
    generate,
    generate_batch,
    sample_inverse_cdf,
)

PROMPTS = [[1, 5, 17, 33, 99, 4], [1, 9, 9], [1, 200, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1]]
MAX_NEW = 16


def hf_new_tokens(hf, prompt, **kwargs) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["gqa", "mha"])
def model_and_hf(request):
    # tiny_config has 4 query heads; GQA shares 2 key/value heads between them, MHA has 4.
    kv_heads = 2 if request.param == "gqa" else 4
    model = tiny_model(seed=0, num_key_value_heads=kv_heads).eval()
    return model, hf_llama_from(model)


def test_greedy_with_kv_cache_equals_transformers_greedy_generate(model_and_hf):
    model, hf = model_and_hf
    for prompt in PROMPTS:
        expected = hf_new_tokens(hf, prompt, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2, pad_token_id=0)
        assert generate(model, prompt, MAX_NEW, eos_id=2) == expected


def test_greedy_stops_at_eos_like_transformers(model_and_hf):
    model, hf = model_and_hf
    prompt = PROMPTS[0]
    free_run = generate(model, prompt, MAX_NEW)
    # Take as "EOS" a token that first appears a few steps in: both must stop right after it.
    eos = next(t for t in free_run[3:] if t not in free_run[:3])
    stop_at = free_run.index(eos)
    expected = hf_new_tokens(hf, prompt, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert expected == free_run[: stop_at + 1]
    assert generate(model, prompt, MAX_NEW, eos_id=eos) == expected
    # A list of stop ids stops at whichever comes first.
    assert generate(model, prompt, MAX_NEW, eos_id=[255, eos]) == expected


def test_greedy_with_kv_cache_equals_decoding_without_cache(model_and_hf):
    model, _ = model_and_hf
    for prompt in PROMPTS:
        assert generate(model, prompt, MAX_NEW, eos_id=2) == decode_without_cache(model, prompt, MAX_NEW, eos_id=2)


def test_greedy_with_repetition_penalty_equals_transformers(model_and_hf):
    model, hf = model_and_hf
    for penalty in (1.3, 0.8):
        expected = hf_new_tokens(hf, PROMPTS[0], max_new_tokens=MAX_NEW, do_sample=False, repetition_penalty=penalty,
                                 eos_token_id=2, pad_token_id=0)
        assert generate(model, PROMPTS[0], MAX_NEW, repetition_penalty=penalty, eos_id=2) == expected


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_left_padded_batch_equals_one_by_one(model_and_hf, penalty):
    model, _ = model_and_hf
    one_by_one_free = [generate(model, p, MAX_NEW, repetition_penalty=penalty) for p in PROMPTS]
    # Make one row stop early at its own EOS while the others go on.
    eos = one_by_one_free[1][4]
    one_by_one = [generate(model, p, MAX_NEW, repetition_penalty=penalty, eos_id=eos) for p in PROMPTS]
    assert len(one_by_one[1]) <= 5 and max(len(r) for r in one_by_one) == MAX_NEW
    # pad_id 9 is also a real prompt token: the penalty must count it only where it is real.
    batch = generate_batch(model, PROMPTS, MAX_NEW, repetition_penalty=penalty, eos_id=eos, pad_id=9)
    assert batch == one_by_one


def test_left_padded_batch_equals_transformers_left_padded_batch(model_and_hf):
    model, hf = model_and_hf
    pad_id = 0
    T = max(len(p) for p in PROMPTS)
    input_ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in PROMPTS])
    attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    out = hf.generate(input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW, do_sample=False,
                      eos_token_id=None, pad_token_id=pad_id)
    assert generate_batch(model, PROMPTS, MAX_NEW, pad_id=pad_id) == out[:, T:].tolist()


SAMPLING_SETTINGS = [
    dict(temperature=0.7, top_k=20, top_p=0.9),
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=1.3),
    dict(temperature=0.9, top_k=5, repetition_penalty=1.2),
]


@pytest.mark.parametrize("settings", SAMPLING_SETTINGS)
def test_sampling_equals_transformers_with_the_same_global_seed(model_and_hf, settings):
    # Same processors in the same order and one torch.multinomial per step: the same random
    # stream gives the same tokens, which checks temperature, top-k, top-p and penalty together.
    model, hf = model_and_hf
    hf_settings = dict(settings, top_k=settings.get("top_k", 0))  # HF's top_k=0 means "off"
    torch.manual_seed(3)
    expected = hf_new_tokens(hf, PROMPTS[0], max_new_tokens=MAX_NEW, do_sample=True, eos_token_id=2, pad_token_id=0,
                             **hf_settings)
    torch.manual_seed(3)
    assert generate(model, PROMPTS[0], MAX_NEW, eos_id=2, **settings) == expected


def test_sampling_with_a_fixed_seed_is_reproducible(model_and_hf):
    model, _ = model_and_hf

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return generate(model, PROMPTS[0], 24, temperature=1.0, top_p=0.95, generator=generator)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)  # 24 draws from a near-uniform distribution: never all equal


def test_one_generator_per_row_samples_a_prompt_alike_in_any_batch(model_and_hf):
    """Row b draws from generator b alone: the same prompt and seed give the same tokens whether
    the prompt is sampled alone, first or last in a batch, or with decoding kept going for other
    ranks (`all_ranks_finished` saying no until the limit)."""
    model, _ = model_and_hf

    def generators(seeds):
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    settings = dict(temperature=1.0, top_p=0.9, eos_id=[2, 7])
    alone = [generate_batch(model, [prompt], MAX_NEW, generator=generators([10 + i]), **settings)[0]
             for i, prompt in enumerate(PROMPTS)]
    together = generate_batch(model, PROMPTS, MAX_NEW, generator=generators([10, 11, 12, 13]), **settings)
    reversed_batch = generate_batch(model, PROMPTS[::-1], MAX_NEW, generator=generators([13, 12, 11, 10]), **settings)
    calls = []
    kept_going = generate_batch(model, PROMPTS, MAX_NEW, generator=generators([10, 11, 12, 13]), **settings,
                                all_ranks_finished=lambda done: calls.append(done) or False)
    assert together == alone and reversed_batch[::-1] == alone and kept_going == alone
    assert len(calls) == MAX_NEW - 1  # asked after every token but the last
    assert len({tuple(tokens) for tokens in alone}) > 1
    with pytest.raises(ValueError, match="2 generators for 4 prompts"):
        generate_batch(model, PROMPTS, MAX_NEW, generator=generators([1, 2]), temperature=1.0)


def test_inverse_cdf_sampling_draws_from_the_distribution_and_never_a_zero_probability_token():
    probabilities = torch.tensor([[0.2, 0.0, 0.5, 0.0, 0.3]]).expand(20000, 5)  # (B, V), one row per draw
    uniforms = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(sample_inverse_cdf(probabilities, uniforms), minlength=5) / 20000
    assert counts[1] == 0 and counts[3] == 0
    torch.testing.assert_close(counts, probabilities[0], atol=0.015, rtol=0)  # 3 sigma of 20000 draws is ~0.011
    edges = torch.tensor([0.0, 0.2, 0.2 + 1e-6, 0.7, 0.7 + 1e-6, 1 - 1e-7])  # the CDF steps' edges
    assert sample_inverse_cdf(probabilities[:6], edges).tolist() == [0, 2, 2, 4, 4, 4]


def test_shared_prompts_are_prefilled_once_and_finished_rows_leave_the_batch(model_and_hf):
    """A prompt asked for 4 times (GRPO's group) runs through the prefill once; rows that end early
    are dropped from later forwards. Neither changes any row's tokens: each equals its prompt
    sampled alone with the same generator."""
    model, _ = model_and_hf
    prompts = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    settings = dict(temperature=1.0, top_k=3)

    def sample_alone(eos):
        return [generate_batch(model, [prompt], 24, eos_id=eos, generator=[torch.Generator().manual_seed(i)],
                               **settings)[0] for i, prompt in enumerate(prompts)]

    # The token these rows sample most often, made the EOS: rows then end at different steps.
    eos = torch.tensor(sum(sample_alone(None), [])).bincount().argmax().item()
    alone = sample_alone(eos)
    rows_per_forward = []  # the prefill first, then one decode step per token
    real_hidden_states = model.hidden_states

    def counting_hidden_states(input_ids, *args, **kwargs):
        rows_per_forward.append(input_ids.shape[0])
        return real_hidden_states(input_ids, *args, **kwargs)

    model.hidden_states = counting_hidden_states
    try:
        together = generate_batch(model, prompts, 24, eos_id=eos,
                                  generator=[torch.Generator().manual_seed(i) for i in range(8)], **settings)
    finally:
        del model.hidden_states
    prefill_rows, batch_sizes = rows_per_forward[0], rows_per_forward[1:]
    assert together == alone
    lengths = sorted(len(tokens) for tokens in alone)
    assert lengths[0] < lengths[-1] and lengths[1] < 24  # rows did finish at different steps
    assert prefill_rows == 2  # two distinct prompts prefilled, not eight rows
    # Forward s makes token s + 1: it must hold every row still going, and holds fewer than 8.
    assert all(size >= sum(n > s + 1 for n in lengths) for s, size in enumerate(batch_sizes))
    assert batch_sizes == sorted(batch_sizes, reverse=True) and batch_sizes[-1] < 8
    assert max(len(tokens) for tokens in together) == len(batch_sizes) + 1  # one forward per token but the first


def test_top_k_1_sampling_equals_greedy(model_and_hf):
    model, _ = model_and_hf
    for prompt in PROMPTS:
        sampled = generate(model, prompt, MAX_NEW, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0))
        assert sampled == generate(model, prompt, MAX_NEW)


def test_top_k_and_top_p_restrict_the_support_to_the_hand_computed_set():
    model = tiny_model(seed=1).eval()
    prompt = PROMPTS[0]
    temperature = 1.0
    with torch.no_grad():
        # A random tiny model is close to uniform over its vocabulary; sharpen it so that a few
        # tokens dominate and the nucleus is small (here: one token of p = 0.57, then a long tail).
        model.lm_head.weight.mul_(15)
        logits = model(torch.tensor([prompt]))[0, -1].double() / temperature  # (V,)
    probabilities = logits.softmax(-1)
    order = probabilities.argsort(descending=True).tolist()

    # top-k = 4: exactly the 4 most likely tokens.
    top_k_set = set(order[:4])
    # top-p = 0.7: the smallest prefix of the most likely tokens whose probabilities sum to >= 0.6.
    top_p, total, top_p_set = 0.7, 0.0, set()
    for token in order:
        top_p_set.add(token)
        total += float(probabilities[token])
        if total >= top_p:
            assert total - top_p > 1e-4  # not on the boundary, where float rounding could decide
            break
    assert 3 <= len(top_p_set) < 30  # a real restriction of a 256-token vocabulary
    # Each allowed token has, renormalised, a probability high enough to appear in 400 draws.
    assert min(float(probabilities[t]) for t in top_k_set | top_p_set) / float(probabilities[order[0]]) > 0.03

    many = [prompt] * 400
    for options, allowed in ((dict(top_k=4), top_k_set), (dict(top_p=top_p), top_p_set)):
        generator = torch.Generator().manual_seed(0)
        drawn = generate_batch(model, many, 1, temperature=temperature, generator=generator, **options)
        assert {row[0] for row in drawn} == allowed, options


def test_logit_processors_equal_transformers_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=generator) * 3  # (B, V)
    previous = torch.randint(0, 50, (3, 12), generator=generator)  # (B, T) tokens seen so far
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, previous, True)
    expected = RepetitionPenaltyLogitsProcessor(1.4)(previous, logits)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.4), expected)
    for k in (1, 7, 50, 80):
        assert torch.equal(apply_top_k(logits, k), TopKLogitsWarper(k)(previous, logits))
    for p in (0.1, 0.5, 0.93):
        assert torch.equal(apply_top_p(logits, p), TopPLogitsWarper(p)(previous, logits))


def test_generation_restores_training_mode_and_rejects_bad_options():
    model = tiny_model(seed=0).train()
    generate(model, [1, 2, 3], 2)
    assert model.training
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 2, temperature=1, top_p=0)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 2)
    assert generate(model, [1, 2], 0) == []


def test_next_token_logits_is_the_lm_head_in_either_layout(model_and_hf):
    """Decode steps take the lm_head as weight @ hidden.T on the CPU (faster there); it is the same
    product as lm_head(hidden), and a head that is not a plain bias-free Linear takes the plain call."""
    from nanotune.generate import next_token_logits

    model, _ = model_and_hf
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.lm_head(hidden)
        got = next_token_logits(model, hidden)
        assert got.shape == expected.shape and got.is_contiguous()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        calls = []
        hook = model.lm_head.register_forward_hook(lambda *args: calls.append(1))
        try:
            next_token_logits(model, hidden)
            assert calls == []  # the plain Linear was not called: the transposed product was used
        finally:
            hook.remove()
