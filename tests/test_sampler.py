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


# -- mixing: weighted sources ------------------------------------------------------------------

SIZES, WEIGHTS = (300, 1200, 90), (0.5, 0.2, 0.3)  # the small source is drawn far above its size
SOURCES = np.repeat(np.arange(3), SIZES)  # sample i belongs to source SOURCES[i]


def _mixed(world_size=1, rank=0, micro=4, g=32, **options):
    return GlobalBatchSampler(len(SOURCES), global_batch_size=g, micro_batch_size=micro, world_size=world_size,
                              rank=rank, seed=SEED, sources=SOURCES, weights=WEIGHTS, **options)


def _flat(steps):
    return [i for step in steps for m in step for i in m]


def test_mixing_draws_each_source_by_its_weight_within_two_percent_over_10000_samples():
    sampler = _mixed()
    assert sampler.steps_per_epoch == len(SOURCES) // 32  # an epoch holds as many samples as the data
    drawn = np.array(_flat(_steps(sampler, 10_000 // 32 + 1))[:10_000])  # 5.6 epochs
    shares = np.bincount(SOURCES[drawn], minlength=3) / len(drawn)
    assert np.abs(shares - np.array(WEIGHTS)).max() < 0.02, shares
    # Weights are relative: 5, 2, 3 is the same mixture as 0.5, 0.2, 0.3.
    scaled = GlobalBatchSampler(len(SOURCES), global_batch_size=32, micro_batch_size=4, seed=SEED, sources=SOURCES,
                                weights=[5, 2, 3])
    assert _steps(scaled, 20) == _steps(_mixed(), 20)


def test_mixing_samples_each_source_without_replacement_within_its_pass_and_cycles():
    sampler = _mixed()
    per_epoch = sampler.samples_per_epoch
    assert per_epoch.sum() == sampler.steps_per_epoch * 32 and per_epoch.tolist() == [784, 314, 470]
    drawn = _flat(_steps(sampler, 4 * sampler.steps_per_epoch))
    for k, size in enumerate(SIZES):
        stream = [i for i in drawn if SOURCES[i] == k]
        members = set(np.flatnonzero(SOURCES == k).tolist())
        # Without replacement within a pass: after n full passes every sample came n or n + 1 times.
        n_passes = len(stream) // size
        counts = np.bincount(np.array(stream) - min(members), minlength=size)
        assert set(stream) <= members
        assert counts.min() >= n_passes and counts.max() <= n_passes + 1, (k, counts.min(), counts.max())
    # The big source (1200 samples, 314 an epoch): in 4 epochs its whole first pass and 56 of the next.
    big = [i for i in drawn if SOURCES[i] == 1]
    assert len(big) == 4 * 314 and len(set(big)) == 1200


def test_mixing_gives_the_same_global_batches_on_1_2_and_4_ranks():
    reference = [sorted(i for m in step for i in m) for step in _steps(_mixed(), 70)]  # crosses 3 epochs
    for world_size in (2, 4):
        per_rank = [_steps(_mixed(world_size=world_size, rank=r, micro=2), 70) for r in range(world_size)]
        for step in range(70):
            union = [i for rank in per_rank for m in rank[step] for i in m]
            assert len(union) == 32 and sorted(union) == reference[step]


def test_mixing_resumes_with_exactly_the_continuation():
    sampler = _mixed(group_by_length=True, lengths=np.arange(len(SOURCES)) % 97 + 1)
    iterator = iter(sampler)
    for _ in range(60):  # into the second epoch
        next(iterator)
    state = sampler.state_dict()
    assert state == {"epoch": 1, "step_in_epoch": 60 - sampler.steps_per_epoch}
    expected = [next(iterator) for _ in range(60)]
    resumed = _mixed(group_by_length=True, lengths=np.arange(len(SOURCES)) % 97 + 1)
    resumed.load_state_dict(state)
    assert _steps(resumed, 60) == expected


def test_mixing_without_shuffle_interleaves_the_sources_evenly_and_bad_mixtures_are_errors():
    sampler = _mixed(shuffle=False)
    first = _flat(_steps(sampler, 1))
    assert first[:3] == [0, 1500, 300]  # each source from its start, the most frequent first
    with pytest.raises(ValueError, match="weights must be numbers > 0"):
        GlobalBatchSampler(len(SOURCES), global_batch_size=32, micro_batch_size=4, sources=SOURCES,
                           weights=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"source\(s\) \[2\] have no samples"):
        GlobalBatchSampler(100, global_batch_size=10, micro_batch_size=5, sources=[0] * 50 + [1] * 50,
                           weights=[1, 1, 1])
    with pytest.raises(ValueError, match="both sources"):
        GlobalBatchSampler(100, global_batch_size=10, micro_batch_size=5, weights=[1, 1])
