"""The fast paths of nanotune.model and nanotune.loss give what the readable paths and transformers give.

tests/test_model.py already checks the chunked loss against full-logits cross-entropy (with and
without -100 targets, and through the model with document_ids). Here: what the speed work added
or relies on: regional compilation (`block.compile()` per layer), the skipping of rows without a
target, the gradients of packed rows (attention per document span) against documents run alone
in transformers, and the loss's bf16 and single-backward edges.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import hf_llama_from, tiny_model

from nanotune.loss import IGNORE_INDEX, linear_cross_entropy_sum, target_rows_only
from nanotune.model import resolve_packed_attention


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def _compiled_tiny_model(seed: int):
    """A tiny model whose blocks are compiled one by one (regional compilation), as training does."""
    model = tiny_model(seed=seed, packed_attention=resolve_packed_attention("auto", compiled=True, device="cpu"))
    for block in model.model.layers:
        block.compile()
    return model


def _packed_batch(seed: int):
    """Two rows of 24 tokens: documents of 7, 12, 5 and of 10, 14 tokens, labels as packing makes them."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 256, (2, 24), generator=generator)
    document_ids = torch.tensor([[0] * 7 + [1] * 12 + [2] * 5, [0] * 10 + [1] * 14])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(document_ids[:, 1:] == document_ids[:, :-1], input_ids[:, 1:], IGNORE_INDEX)
    return input_ids, document_ids, labels


def test_regionally_compiled_blocks_give_the_eager_loss_and_gradients():
    eager = tiny_model(seed=11)
    compiled = _compiled_tiny_model(seed=11)
    input_ids, document_ids, labels = _packed_batch(seed=12)
    plain_labels = torch.cat([input_ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)

    for batch in ({"labels": plain_labels}, {"labels": labels, "document_ids": document_ids}):
        n_targets = (batch["labels"] != IGNORE_INDEX).sum()
        losses = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids, **batch) / n_targets  # mean token loss
            loss.backward()
            losses.append(loss.detach())
        assert abs(float(losses[1] - losses[0])) <= 1e-4, losses
        for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
            assert _relative_difference(p_compiled.grad, p_eager.grad) <= 1e-4, name


@pytest.mark.parametrize("packed_attention", ["spans", "mask"])
def test_packed_rows_get_the_gradients_of_their_documents_run_alone_in_transformers(packed_attention):
    model = tiny_model(seed=13, packed_attention=packed_attention)
    hf = hf_llama_from(model).train()
    input_ids, document_ids, labels = _packed_batch(seed=14)

    model(input_ids, document_ids=document_ids, labels=labels).backward()

    oracle = torch.zeros(())
    for row_ids, row_documents in zip(input_ids, document_ids):
        for document in row_documents.unique():
            piece = row_ids[row_documents == document]  # one document, run alone, unpacked
            logits = hf(piece[None]).logits[0]  # (n, V)
            oracle = oracle + F.cross_entropy(logits[:-1], piece[1:], reduction="sum")
    oracle.backward()
    hf_parameters = dict(hf.named_parameters())
    for name, param in model.named_parameters():
        assert _relative_difference(param.grad, hf_parameters[name].grad) <= 1e-5, name


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("target_share", [0.0, 0.1, 1.0])
def test_loss_skips_rows_without_targets_and_gives_them_zero_gradient(chunk_size, target_share):
    generator = torch.Generator().manual_seed(15)
    hidden = torch.randn(2, 20, 16, generator=generator, requires_grad=True)
    weight = torch.randn(64, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 64, (2, 20), generator=generator)
    labels[torch.rand(2, 20, generator=generator) >= target_share] = IGNORE_INDEX

    loss = linear_cross_entropy_sum(hidden, weight, labels, chunk_size=chunk_size)
    grad_hidden, grad_weight = torch.autograd.grad(loss * 0.25, (hidden, weight))
    reference = _summed_cross_entropy(hidden @ weight.t(), labels)  # full (2, 20, 64) logits: the readable way
    ref_hidden, ref_weight = torch.autograd.grad(reference * 0.25, (hidden, weight))

    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_weight, ref_weight, atol=1e-5, rtol=1e-5)
    assert torch.all(grad_hidden[labels == IGNORE_INDEX] == 0)


def test_target_rows_only_keeps_exactly_the_rows_with_a_label():
    hidden = torch.arange(12.0).view(6, 2)
    labels = torch.tensor([5, IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX, 0])
    kept_hidden, kept_labels = target_rows_only(hidden, labels)
    assert torch.equal(kept_labels, torch.tensor([5, 7, 0]))
    assert torch.equal(kept_hidden, hidden[[0, 2, 5]])
    all_targets, first_rows = torch.tensor([1, 2, 3]), hidden[:3]
    kept_hidden, kept_labels = target_rows_only(first_rows, all_targets)
    assert kept_hidden is first_rows and kept_labels is all_targets  # nothing to drop: no copy


def test_bf16_loss_and_gradients_are_close_to_the_fp32_reference():
    generator = torch.Generator().manual_seed(16)
    hidden = torch.randn(40, 32, generator=generator).bfloat16().requires_grad_()
    weight = (torch.randn(96, 32, generator=generator) * 0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, 96, (40,), generator=generator)
    labels[::4] = IGNORE_INDEX

    loss = linear_cross_entropy_sum(hidden, weight, labels, chunk_size=16)  # 3 chunks: bf16 partial sums
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    hidden32 = hidden.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    reference = F.cross_entropy(hidden32 @ weight32.t(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    reference.backward()
    # bf16 has 8 bits of mantissa: about 0.4% per rounding
    assert abs(float(loss.detach() - reference.detach())) / float(reference.detach()) <= 1e-2
    assert _relative_difference(hidden.grad.float(), hidden32.grad) <= 2e-2
    assert _relative_difference(weight.grad.float(), weight32.grad) <= 2e-2


def test_a_second_backward_through_the_loss_is_a_clear_error():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy_sum(hidden, weight, torch.tensor([1, 2, 3, 4, 5]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward may run only once"):
        loss.backward()


def test_the_reused_logits_workspace_grows_when_needed_and_changes_no_loss():
    model = tiny_model(seed=17, loss_chunk_tokens=16)
    generator = torch.Generator().manual_seed(18)
    for T in (5, 30, 12):  # 10 tokens (a 10-row workspace), then 60 (grows to a 16-row chunk), then 24
        input_ids = torch.randint(0, 256, (2, T), generator=generator)
        labels = torch.cat([input_ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
        loss = model(input_ids, labels=labels)
        with torch.no_grad():
            logits = model(input_ids)  # (2, T, V): the readable path, no workspace
        reference = _summed_cross_entropy(logits, labels)
        torch.testing.assert_close(loss.detach(), reference, atol=1e-5, rtol=1e-5)
    workspace = model.logits_workspace.buffer
    assert workspace.shape == (16, 256)
    model(input_ids, labels=labels)
    assert model.logits_workspace.buffer is workspace  # kept from one step to the next

    model.to(torch.bfloat16)  # bf16 logits are copied into the fp32 workspace
    loss = model(input_ids, labels=labels)
    with torch.no_grad():
        reference = _summed_cross_entropy(model(input_ids).float(), labels)
    assert abs(float(loss.detach() - reference)) / float(reference) <= 1e-2


def test_compiled_blocks_compile_once_for_every_packing():
    """With compiled blocks, "auto" packed attention resolves to a mask tensor on the CPU, not Python
    spans: the span boundaries would be baked into the compiled graph and every new packing would recompile."""
    from torch._dynamo.utils import counters

    model = _compiled_tiny_model(seed=19)
    generator = torch.Generator().manual_seed(20)
    graphs_after_first_batch = None
    for cuts in ([7, 19], [3, 11, 20], [12]):  # three different packings of 24-token rows
        input_ids = torch.randint(0, 256, (2, 24), generator=generator)
        document_ids = torch.zeros(2, 24, dtype=torch.long)
        for cut in cuts:
            document_ids[:, cut:] += 1
        labels = torch.cat([input_ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
        loss = model(input_ids, document_ids=document_ids, labels=labels)
        loss.backward()
        reference = tiny_model(seed=19)(input_ids, document_ids=document_ids, labels=labels)  # eager
        assert abs(float(loss.detach() - reference.detach())) <= 1e-4 * float(reference.detach())
        if graphs_after_first_batch is None:
            graphs_after_first_batch = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs_after_first_batch
