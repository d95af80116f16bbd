"""nanotune.model against the oracle: transformers' LlamaForCausalLM with the same weights."""

import pytest
import torch
import torch.nn.functional as F
from helpers import hf_llama_from, three_packed_documents, tiny_model

from nanotune.activation_checkpointing import apply_activation_checkpointing
from nanotune.loss import IGNORE_INDEX, linear_cross_entropy_sum
from nanotune.model import KVCache, positions_from_document_ids

ROPE_SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
    },
}


@pytest.mark.parametrize("rope", list(ROPE_SCALINGS))
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_logits_and_gradients_match_transformers(rope, tied, kv_heads):
    # max_position_embeddings 32 < T = 40 so that dynamic NTK scaling is really exercised.
    model = tiny_model(
        seed=1, rope_scaling=ROPE_SCALINGS[rope], tie_word_embeddings=tied,
        num_key_value_heads=kv_heads, max_position_embeddings=32,
    )
    hf = hf_llama_from(model)
    input_ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))

    ours = model(input_ids)
    theirs = hf(input_ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    F.cross_entropy(ours[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()).backward()
    F.cross_entropy(theirs[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()).backward()
    hf_params = dict(hf.named_parameters())
    for name, param in model.named_parameters():
        expected = hf_params[name].grad
        relative = (param.grad - expected).norm() / expected.norm()
        assert relative < 1e-5, f"{name}: relative gradient difference {relative:.2e}"


@pytest.mark.parametrize("packed_attention", ["spans", "mask", "flex"])
def test_packed_documents_get_their_unpacked_logits(packed_attention):
    model = tiny_model(seed=2, packed_attention=packed_attention)
    hf = hf_llama_from(model)
    documents, packed, document_ids = three_packed_documents(seed=1)

    # FlexAttention has no backward on the CPU (it is the CUDA path): check its forward here.
    with torch.set_grad_enabled(packed_attention != "flex"):
        logits = model(packed, document_ids=document_ids)[0]  # (24, V)
    start = 0
    for document in documents:
        alone = hf(document[None]).logits[0]
        torch.testing.assert_close(logits[start : start + len(document)], alone, atol=1e-5, rtol=0)
        start += len(document)


def test_positions_restart_at_each_document():
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [5, 5, 5, 5, 5, 5, 5, 5]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert torch.equal(positions_from_document_ids(document_ids), expected)


def _reference_summed_loss(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("with_ignored", [False, True])
def test_chunked_loss_and_gradients_equal_full_logits_cross_entropy(with_ignored):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 50, 16, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 300, (3, 50), generator=generator)
    if with_ignored:
        labels[:, ::3] = IGNORE_INDEX
    # chunk of 7 tokens: chunks do not divide the 150 tokens evenly
    chunked = linear_cross_entropy_sum(hidden, weight, labels, chunk_size=7)
    (grad_h, grad_w) = torch.autograd.grad(chunked * 0.5, (hidden, weight))
    full = _reference_summed_loss(hidden, weight, labels)
    (ref_h, ref_w) = torch.autograd.grad(full * 0.5, (hidden, weight))
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_h, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_w, ref_w, atol=1e-5, rtol=1e-5)


def test_model_loss_with_labels_equals_cross_entropy_of_logits_with_document_ids():
    model = tiny_model(seed=4, loss_chunk_tokens=16, tie_word_embeddings=True)
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 256, (2, 30), generator=generator)
    document_ids = torch.tensor([[0] * 10 + [1] * 20, [0] * 25 + [-1] * 5])
    labels = torch.where(torch.rand(2, 30, generator=generator) < 0.3, IGNORE_INDEX, torch.randint(0, 256, (2, 30), generator=generator))

    loss = model(input_ids, document_ids=document_ids, labels=labels)
    loss.backward()
    chunked_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids, document_ids=document_ids)
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_loss_without_grad_builds_no_graph():
    model = tiny_model(seed=6)
    input_ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        loss = model(input_ids, labels=input_ids)
    assert loss.grad_fn is None and loss.item() > 0


def test_kv_cache_prefill_then_one_token_at_a_time_equals_full_forward():
    model = tiny_model(seed=7).eval()
    input_ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(8))
    full = model(input_ids)
    cache = KVCache(model.config, batch_size=2, max_len=24)
    with torch.no_grad():
        pieces = [model(input_ids[:, :12], kv_cache=cache)]
        for t in range(12, 20):
            pieces.append(model(input_ids[:, t : t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny_model(seed=9)
    input_ids = torch.randint(0, 256, (2, 16))
    model(input_ids, labels=input_ids).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    apply_activation_checkpointing(model)
    model(input_ids, labels=input_ids).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        tiny_model(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        tiny_model(num_attention_heads=4, num_key_value_heads=3)
