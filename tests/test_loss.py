"""nanotune.loss against its oracles: the readable references beside it, and transformers' logits."""

import pytest
import torch
import torch.nn.functional as F
from helpers import hf_llama_from, tiny_model

from nanotune.loss import (
    IGNORE_INDEX,
    _LinearCrossEntropySum,
    _SequenceLogprobs,
    _TokenLogprobs,
    batch_sequence_ids,
    linear_cross_entropy_sum,
    linear_cross_entropy_sum_reference,
    sequence_logprobs,
    sequence_logprobs_reference,
    token_logprobs,
    token_logprobs_reference,
)


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _hidden_weight_labels(seed: int, ignored_share: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 20, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (3, 20), generator=generator)
    labels[torch.rand(3, 20, generator=generator) < ignored_share] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_fused_cross_entropy_equals_the_readable_reference(chunk_size):
    hidden, weight, labels = _hidden_weight_labels(seed=1)
    fast = linear_cross_entropy_sum(hidden, weight, labels, chunk_size=chunk_size)
    fast_grads = torch.autograd.grad(fast * 0.5, (hidden, weight))
    reference = linear_cross_entropy_sum_reference(hidden, weight, labels, chunk_size=chunk_size)
    reference_grads = torch.autograd.grad(reference * 0.5, (hidden, weight))
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    for fast_grad, reference_grad in zip(fast_grads, reference_grads):
        torch.testing.assert_close(fast_grad, reference_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("host_checks_are_free", [True, False])
def test_fused_cross_entropy_keeps_ignored_rows_at_zero_gradient_when_they_reach_the_kernel(host_checks_are_free):
    """On CUDA the rows without a target are not dropped first: the kernel itself must give them
    zero loss and zero gradient (called here directly, as it runs there; False is CUDA's way)."""
    hidden, weight, labels = _hidden_weight_labels(seed=2)
    flat_hidden, flat_labels = hidden.reshape(-1, 16), labels.reshape(-1)
    assert (flat_labels == IGNORE_INDEX).any()
    fast = _LinearCrossEntropySum.apply(flat_hidden, weight, flat_labels, 7, True, None, host_checks_are_free)
    fast_grads = torch.autograd.grad(fast, (hidden, weight))
    reference = linear_cross_entropy_sum_reference(hidden, weight, labels)
    reference_grads = torch.autograd.grad(reference, (hidden, weight))
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    for fast_grad, reference_grad in zip(fast_grads, reference_grads):
        torch.testing.assert_close(fast_grad, reference_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("host_checks_are_free", [True, False])
def test_fused_cross_entropy_is_exact_where_the_target_probability_underflows(host_checks_are_free):
    """Token losses far above 87 (p(target) below fp32's smallest normal number): the softmax
    alone would give inf there (-log p(target)). On the CPU (True) those rows are recomputed; on
    CUDA (False, run here on the CPU) the log-sum-exp is read from the largest logit's
    probability, which cannot underflow. Both must be exact, in the loss and its gradients."""
    hidden, weight, labels = _hidden_weight_labels(seed=3, ignored_share=0.0)
    hidden = (hidden.detach() * 40).requires_grad_()  # logits in the hundreds
    fast = _LinearCrossEntropySum.apply(hidden.reshape(-1, 16), weight, labels.reshape(-1), 16, True, None,
                                        host_checks_are_free)
    fast_grads = torch.autograd.grad(fast, (hidden, weight))
    reference = linear_cross_entropy_sum_reference(hidden, weight, labels)
    reference_grads = torch.autograd.grad(reference, (hidden, weight))
    token_losses = F.cross_entropy(hidden.detach().reshape(-1, 16) @ weight.detach().t(), labels.reshape(-1),
                                   reduction="none")
    assert (token_losses > 200).sum() > 10  # p(target) really underflows fp32 for these
    assert torch.isfinite(fast)
    torch.testing.assert_close(fast, reference, atol=1e-3, rtol=1e-6)
    for fast_grad, reference_grad in zip(fast_grads, reference_grads):
        torch.testing.assert_close(fast_grad, reference_grad, atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # the forward-only path computes log-sum-exp directly
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, labels, chunk_size=16), reference,
                                   atol=1e-3, rtol=1e-6)


def test_batch_sequence_ids_number_rows_or_document_runs_in_row_major_order():
    labels = torch.zeros(2, 6, dtype=torch.long)
    ids, n = batch_sequence_ids(labels)
    assert n == 2 and torch.equal(ids, torch.tensor([[0] * 6, [1] * 6]))
    # a document cut by the row boundary (7) is two sequences; -1 is a packed block's padding
    document_ids = torch.tensor([[3, 3, 5, 5, 5, 7], [7, 7, 8, -1, -1, -1]])
    ids, n = batch_sequence_ids(labels, document_ids)
    assert n == 5 and torch.equal(ids, torch.tensor([[0, 0, 1, 1, 1, 2], [3, 3, 4, -1, -1, -1]]))


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("drop_rows", [True, False])
def test_sequence_logprobs_equal_the_readable_reference(chunk_size, drop_rows):
    """Values, token counts and gradients; `drop_rows=False` runs the kernel on every row, as on CUDA."""
    hidden, weight, labels = _hidden_weight_labels(seed=2)
    sequence_ids = torch.tensor([0] * 25 + [1] * 15 + [-1] * 5 + [3] * 15).view(3, 20)  # sequence 2 is empty
    reference = sequence_logprobs_reference(hidden, weight, labels, sequence_ids, 4, chunk_size)
    if drop_rows:
        fast = sequence_logprobs(hidden, weight, labels, sequence_ids, 4, chunk_size)
    else:
        fast_sums = _SequenceLogprobs.apply(hidden.view(60, 16), weight, labels.view(60), sequence_ids.view(60), 4, chunk_size)
        fast = reference._replace(logprobs=fast_sums)
    upstream = torch.tensor([0.5, -2.0, 3.0, 1.5])
    fast_grads = torch.autograd.grad((fast.logprobs * upstream).sum(), (hidden, weight))
    reference_grads = torch.autograd.grad((reference.logprobs * upstream).sum(), (hidden, weight))

    counted = (labels != IGNORE_INDEX) & (sequence_ids >= 0)
    expected_counts = torch.stack([(counted & (sequence_ids == s)).sum() for s in range(4)])
    assert torch.equal(fast.n_tokens, expected_counts) and fast.n_tokens[2] == 0
    torch.testing.assert_close(fast.logprobs, reference.logprobs, atol=1e-5, rtol=1e-5)
    assert fast.logprobs[2] == 0
    for fast_grad, reference_grad in zip(fast_grads, reference_grads):
        torch.testing.assert_close(fast_grad, reference_grad, atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_may_be_backpropagated_twice():
    hidden, weight, labels = _hidden_weight_labels(seed=3)
    sequence_ids, n = batch_sequence_ids(labels)
    logprobs = sequence_logprobs(hidden, weight, labels, sequence_ids, n, chunk_size=8).logprobs
    first = torch.autograd.grad(logprobs.sum(), hidden, retain_graph=True)[0]
    second = torch.autograd.grad(logprobs.sum(), hidden)[0]
    assert torch.equal(first, second)


# ---- per-sequence log-probs of a model against transformers -------------------------------------


def _padded_batch(seed: int):
    """Three right-padded rows of 9, 16 and 4 real tokens; labels are the next token, -100 on padding."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [9, 16, 4]
    input_ids = torch.zeros(3, 16, dtype=torch.long)  # 0 is the padding token
    labels = torch.full((3, 16), IGNORE_INDEX)
    pieces = []
    for row, n in enumerate(lengths):
        piece = torch.randint(1, 256, (n,), generator=generator)
        input_ids[row, :n] = piece
        labels[row, : n - 1] = piece[1:]
        pieces.append(piece)
    return {"input_ids": input_ids, "labels": labels}, pieces


def _packed_batch(seed: int):
    """Two rows of 24 tokens holding three documents each (the second row ends in padding)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 256, (2, 24), generator=generator)
    document_ids = torch.tensor([[0] * 7 + [1] * 12 + [2] * 5, [0] * 10 + [1] * 6 + [2] * 5 + [-1] * 3])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    same_document = (document_ids[:, 1:] == document_ids[:, :-1]) & (document_ids[:, 1:] >= 0)
    labels[:, :-1] = torch.where(same_document, input_ids[:, 1:], IGNORE_INDEX)
    pieces = [row_ids[row_documents == d] for row_ids, row_documents in zip(input_ids, document_ids) for d in (0, 1, 2)]
    return {"input_ids": input_ids, "labels": labels, "document_ids": document_ids}, pieces


def _transformers_sequence_logprobs(hf, pieces: list[torch.Tensor]) -> torch.Tensor:
    """Each sequence run alone through transformers: the sum of log p(next token) over its full logits."""
    sums = []
    for piece in pieces:
        logits = hf(piece[None]).logits[0].float()  # (n, V)
        token_logprobs = F.log_softmax(logits[:-1], dim=-1).gather(1, piece[1:, None]).squeeze(1)  # (n - 1,)
        sums.append(token_logprobs.sum())
    return torch.stack(sums)  # (S,)


@pytest.mark.parametrize("make_batch", [_padded_batch, _packed_batch], ids=["padded", "packed"])
def test_sequence_logprobs_and_their_gradients_equal_transformers_full_logits(make_batch):
    model = tiny_model(seed=21)
    hf = hf_llama_from(model).train()
    batch, pieces = make_batch(seed=22)
    sequence_ids, n_sequences = batch_sequence_ids(batch["labels"], batch.get("document_ids"))
    assert n_sequences == len(pieces)
    upstream = torch.randn(n_sequences, generator=torch.Generator().manual_seed(23))  # a random weighting

    hidden = model.hidden_states(batch["input_ids"], document_ids=batch.get("document_ids"))  # (B, T, C)
    ours = sequence_logprobs(hidden, model.lm_head.weight, batch["labels"], sequence_ids, n_sequences, chunk_size=7)
    (ours.logprobs * upstream).sum().backward()
    theirs = _transformers_sequence_logprobs(hf, pieces)
    (theirs * upstream).sum().backward()

    torch.testing.assert_close(ours.logprobs, theirs.detach(), atol=1e-5, rtol=1e-5)
    assert ours.n_tokens.tolist() == [len(piece) - 1 for piece in pieces]
    hf_parameters = dict(hf.named_parameters())
    for name, param in model.named_parameters():
        assert _relative_difference(param.grad, hf_parameters[name].grad) <= 1e-5, name


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("drop_rows", [True, False])
def test_token_logprobs_and_entropies_equal_full_logit_log_softmax(chunk_size, drop_rows):
    """Per-token values (0 on ignored positions), entropies, and the gradient of any weighted sum;
    `drop_rows=False` runs the kernel on every row, as on CUDA."""
    hidden, weight, labels = _hidden_weight_labels(seed=4)
    reference = token_logprobs_reference(hidden, weight, labels)
    if drop_rows:
        fast = token_logprobs(hidden, weight, labels, chunk_size)
    else:
        logprobs, entropy = _TokenLogprobs.apply(hidden.view(60, 16), weight, labels.view(60), chunk_size)
        fast = reference._replace(logprobs=logprobs.view(3, 20), entropy=entropy.view(3, 20))
    upstream = torch.randn(3, 20, generator=torch.Generator().manual_seed(5))
    fast_grads = torch.autograd.grad((fast.logprobs * upstream).sum(), (hidden, weight), retain_graph=True)
    reference_grads = torch.autograd.grad((reference.logprobs * upstream).sum(), (hidden, weight))

    ignored = labels == IGNORE_INDEX
    assert fast.logprobs.shape == (3, 20) and bool((fast.logprobs[ignored] == 0).all())
    torch.testing.assert_close(fast.logprobs, reference.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.entropy, reference.entropy, atol=1e-5, rtol=1e-5)
    assert not fast.entropy.requires_grad
    for fast_grad, reference_grad in zip(fast_grads, reference_grads):
        assert _relative_difference(fast_grad, reference_grad) < 1e-5
    again = torch.autograd.grad((fast.logprobs * upstream).sum(), (hidden, weight))  # a second backward
    for grad, reference_grad in zip(again, reference_grads):
        assert _relative_difference(grad, reference_grad) < 1e-5
