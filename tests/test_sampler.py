"""nanotune.data.sampler: the global batch of a step does not depend on how it is split."""

import itertools

import numpy as np
import pytest

from nanotune.data.sampler import GlobalBatchSampler

N, G, SEED = 203, 16, 7  # 12 full steps per epoch, 11 samples dropped each epoch


def _steps(sampler, n_steps):
    return list(itertools.islice(iter(sampler), n_steps))


def _oracle_global_batch(epoch, step):
    """Written out independently: the seeded permutation of the epoch, sliced."""
    return sorted(np.random.default_rng([SEED, epoch]).permutation(N)[step * G : (step + 1) * G].tolist())


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("grad_accum", [1, 2, 4])
def test_union_over_ranks_and_micro_steps_is_the_same_global_batch(world_size, grad_accum):
    micro = G // (world_size * grad_accum)
    samplers = [
        GlobalBatchSampler(N, global_batch_size=G, micro_batch_size=micro, world_size=world_size, rank=r, seed=SEED)
        for r in range(world_size)
    ]
    assert samplers[0].grad_accum == grad_accum and samplers[0].steps_per_epoch == 12
    n_steps = 30  # two and a half epochs: crosses epoch boundaries
    per_rank = [_steps(s, n_steps) for s in samplers]
    for step in range(n_steps):
        union = []
        for rank in range(world_size):
            micro_batches = per_rank[rank][step]
            assert len(micro_batches) == grad_accum and all(len(m) == micro for m in micro_batches)
            union += [i for m in micro_batches for i in m]
        assert len(union) == G, "a sample was given to two ranks or micro-steps"
        assert sorted(union) == _oracle_global_batch(step // 12, step % 12)


def test_each_epoch_is_a_new_permutation_without_repeats_and_drops_the_partial_batch():
    sampler = GlobalBatchSampler(N, global_batch_size=G, micro_batch_size=4, seed=SEED)
    steps = _steps(sampler, 24)
    epochs = [[i for step in steps[e * 12 : (e + 1) * 12] for m in step for i in m] for e in range(2)]
    for seen in epochs:
        assert len(seen) == len(set(seen)) == 12 * G  # no repeat; 203 - 192 = 11 dropped
    assert epochs[0] != epochs[1]
    assert sampler.state_dict() == {"epoch": 2, "step_in_epoch": 0}


def test_resume_from_state_dict_mid_epoch_continues_with_the_very_next_batch():
    make = lambda: GlobalBatchSampler(N, global_batch_size=G, micro_batch_size=2, world_size=2, rank=1, seed=SEED)  # noqa: E731
    sampler = make()
    iterator = iter(sampler)
    for _ in range(7):
        next(iterator)
    state = sampler.state_dict()
    assert state == {"epoch": 0, "step_in_epoch": 7}
    expected = [next(iterator) for _ in range(10)]  # runs on into epoch 1

    resumed = make()
    resumed.load_state_dict(state)
    assert _steps(resumed, 10) == expected
    assert resumed.state_dict() == sampler.state_dict() == {"epoch": 1, "step_in_epoch": 5}


def test_resume_on_a_different_world_size_continues_with_the_same_global_batches():
    one_rank = GlobalBatchSampler(N, global_batch_size=G, micro_batch_size=4, seed=SEED)
    _steps(one_rank, 5)
    state = one_rank.state_dict()
    expected = [sorted(i for m in step for i in m) for step in _steps(one_rank, 3)]
    four_ranks = []
    for rank in range(4):
        sampler = GlobalBatchSampler(N, global_batch_size=G, micro_batch_size=2, world_size=4, rank=rank, seed=SEED)
        sampler.load_state_dict(state)
        four_ranks.append(_steps(sampler, 3))
    for step in range(3):
        assert sorted(i for rank in four_ranks for i in itertools.chain(*rank[step])) == expected[step]


def test_no_shuffle_takes_samples_in_order():
    sampler = GlobalBatchSampler(40, global_batch_size=8, micro_batch_size=2, world_size=2, rank=1, shuffle=False)
    assert _steps(sampler, 1) == [[[4, 5], [6, 7]]]


def test_group_by_length_keeps_a_seeded_permutation_with_similar_lengths_per_micro_batch():
    rng = np.random.default_rng(0)
    n, g = 2000, 32
    lengths = rng.lognormal(5, 1, n).astype(int) + 1
    make = lambda: GlobalBatchSampler(  # noqa: E731
        n, global_batch_size=g, micro_batch_size=8, seed=3, lengths=lengths, group_by_length=True
    )
    steps = _steps(make(), n // g)
    seen = [i for step in steps for m in step for i in m]
    assert len(seen) == len(set(seen)) == (n // g) * g  # still each sample at most once per epoch
    assert _steps(make(), n // g) == steps  # deterministic

    def mean_spread(micro_batches):  # longest / shortest length within a micro-batch
        return np.mean([lengths[m].max() / lengths[m].min() for m in micro_batches])

    grouped_spread = mean_spread([m for step in steps for m in step])
    plain = GlobalBatchSampler(n, global_batch_size=g, micro_batch_size=8, seed=3)
    plain_spread = mean_spread([m for step in _steps(plain, n // g) for m in step])
    assert grouped_spread < 1.5 < 5 < plain_spread, (grouped_spread, plain_spread)  # measured 1.05 and 24
    # Within a window of 50 steps the step order is shuffled again: lengths do not fall step by step.
    step_mean_lengths = [np.mean(lengths[[i for m in step for i in m]]) for step in steps[:50]]
    assert step_mean_lengths != sorted(step_mean_lengths, reverse=True)


def test_bad_batch_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="global_batch_size 16 .* micro_batch_size 3 x world_size 2"):
        GlobalBatchSampler(N, global_batch_size=16, micro_batch_size=3, world_size=2)
    with pytest.raises(ValueError, match="only 10 samples for a global batch of 16"):
        GlobalBatchSampler(10, global_batch_size=16, micro_batch_size=4)
    sampler = GlobalBatchSampler(N, global_batch_size=G, micro_batch_size=4)
    with pytest.raises(ValueError, match="step_in_epoch 12"):
        sampler.load_state_dict({"epoch": 0, "step_in_epoch": 12})
    with pytest.raises(ValueError, match="lengths"):
        GlobalBatchSampler(N, global_batch_size=G, micro_batch_size=4, group_by_length=True)
