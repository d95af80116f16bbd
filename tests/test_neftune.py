"""NEFTune as a forward hook: the noise of the paper, in training mode only, removable."""

import math

import pytest
import torch
from helpers import tiny_model

from nanotune.neftune import add_neftune_noise


def test_training_mode_embeddings_get_uniform_noise_of_size_alpha_over_sqrt_tc():
    model = tiny_model(seed=1).train()
    input_ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    clean = model.model.embed_tokens(input_ids)  # (B, T, C)
    alpha, (T, C) = 5.0, clean.shape[1:]
    scale = alpha / math.sqrt(T * C)
    torch.manual_seed(3)
    expected = clean + torch.empty_like(clean).uniform_(-scale, scale)  # the same draw from the same RNG

    handle = add_neftune_noise(model, alpha)
    torch.manual_seed(3)
    noisy = model.model.embed_tokens(input_ids)
    assert torch.equal(noisy, expected)
    assert 0 < float((noisy - clean).abs().max().detach()) <= scale

    model.eval()  # evaluation and generation see clean embeddings
    assert torch.equal(model.model.embed_tokens(input_ids), clean)
    model.train()
    handle.remove()
    assert torch.equal(model.model.embed_tokens(input_ids), clean)


def test_noise_changes_the_training_loss_but_not_the_eval_logits():
    model = tiny_model(seed=4)
    input_ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    clean_loss = model.train()(input_ids, labels=input_ids).detach()
    clean_logits = model.eval()(input_ids).detach()
    add_neftune_noise(model, 5.0)
    assert not torch.equal(model.train()(input_ids, labels=input_ids).detach(), clean_loss)
    assert torch.equal(model.eval()(input_ids).detach(), clean_logits)


def test_alpha_must_be_positive():
    with pytest.raises(ValueError, match="must be positive"):
        add_neftune_noise(tiny_model(), 0.0)
