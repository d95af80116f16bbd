"""Parameter groups and the learning-rate schedule."""

import math

import pytest
from helpers import tiny_model

from nanotune.config import OptimConfig
from nanotune.optim import build_optimizer, lr_at_step, parameter_groups, schedule_from_config


def test_schedule_values_at_chosen_steps():
    common = dict(lr=1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    cosine = [lr_at_step(s, schedule="cosine", **common) for s in (0, 4, 9, 10, 59.5, 109)]
    assert cosine[0] == pytest.approx(0.1) and cosine[1] == pytest.approx(0.5) and cosine[2] == pytest.approx(1.0)
    assert cosine[3] == pytest.approx(1.0)
    assert cosine[4] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert cosine[5] == pytest.approx(0.1)
    linear = [lr_at_step(s, schedule="linear", **common) for s in (10, 59.5, 109)]
    assert linear == pytest.approx([1.0, 0.55, 0.1])
    assert lr_at_step(80, schedule="constant", **common) == 1.0


def test_warmup_ratio_gives_the_warmup_length():
    config = OptimConfig(lr=2.0, warmup_ratio=0.05, schedule="constant")
    lr_for = schedule_from_config(config, total_steps=100)
    assert [lr_for(s) for s in (0, 4, 5)] == pytest.approx([0.4, 2.0, 2.0])


def test_no_weight_decay_on_norms_and_biases_and_frozen_params_left_out():
    model = tiny_model(attention_bias=True)
    model.model.layers[0].requires_grad_(False)
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    frozen = {id(p) for p in model.model.layers[0].parameters()}
    assert not frozen & {id(p) for g in (decay, no_decay) for p in g["params"]}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_trainable


@pytest.mark.parametrize("fused", ["fused", "foreach", "none"])
def test_every_adamw_implementation_gives_the_same_update(fused):
    import torch

    results = []
    for mode in (fused, "none"):
        model = tiny_model(seed=3)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, fused=mode))
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            model(ids, labels=ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results.append(model.lm_head.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fused", "foreach", "none"])
def test_state_created_before_the_first_step_is_adamws_own_and_changes_no_update(mode):
    """build_optimizer creates AdamW's state up front (create_adamw_state, for the allocator's sake):
    it must be what AdamW's own first step creates (keys, dtypes, devices, shapes), and training
    with it must give bit for bit the weights of a plain lazily initialised AdamW."""
    import torch

    def train(optimizer, model):
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            model(ids, labels=ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()]

    config = OptimConfig(lr=1e-2, weight_decay=0.1, fused=mode)
    ours_model, lazy_model = tiny_model(seed=3), tiny_model(seed=3)
    ours = build_optimizer(ours_model, config)
    assert len(ours.state) == sum(1 for p in ours_model.parameters() if p.requires_grad)  # before any step
    created = {name: {k: (v.dtype, v.device, v.shape) for k, v in ours.state[p].items()}
               for name, p in ours_model.named_parameters()}
    assert all(float(ours.state[p]["step"]) == 0 and not ours.state[p]["exp_avg"].any() for p in ours_model.parameters())
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "none": dict(foreach=False)}[mode]
    lazy = torch.optim.AdamW(parameter_groups(lazy_model, 0.1), lr=1e-2, betas=tuple(config.betas), eps=config.eps, **flags)
    ours_weights, lazy_weights = train(ours, ours_model), train(lazy, lazy_model)
    assert created == {name: {k: (v.dtype, v.device, v.shape) for k, v in lazy.state[p].items()}
                       for name, p in lazy_model.named_parameters()}
    assert all(torch.equal(a, b) for a, b in zip(ours_weights, lazy_weights))
