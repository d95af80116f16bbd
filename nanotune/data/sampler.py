"""Which samples each rank trains on at each optimizer step, independent of how the batch is split.

A run is described by its global batch: G samples per optimizer step. How those G samples are
spread over W ranks and A micro-steps of gradient accumulation (G = W * A * micro_batch_size) is
an implementation detail, and it must stay one: the same seed gives step s the same G samples
whether the run uses 1 GPU with 8 accumulation steps or 8 GPUs with none. That is what makes
gradient accumulation and FSDP testable against a single process, and lets a run resume on a
different number of GPUs.

So the order is decided globally and only then cut up:

    epoch e      permutation of range(num_samples), seeded by (seed, e), the same in every process
    step s       permutation[s*G : (s+1)*G]          (the last, partial global batch is dropped)
    rank r       its G/W contiguous share of step s, cut into A micro-batches of micro_batch_size

`state_dict()` is just (epoch, step_in_epoch) of the next step: resuming recomputes the
permutation from the seed instead of storing it.

Mixing (`sources` and `weights`: weighted `data.train_files`). Each sample belongs to a source
(a file or glob of `data.train_files`), and each source has a weight. An epoch is still as many
samples as the data set holds (`steps_per_epoch = num_samples // G`), but they are drawn from the
sources by weight, not in proportion to their sizes:

    quota_k      source k's samples per epoch: weight_k / sum(weights) of the epoch's samples,
                 rounded by largest remainder, the same in every epoch
    stream_k     source k's samples without replacement, pass after pass: pass p is a permutation
                 of its samples seeded by (seed, k, p), so a small source cycles and a large one is
                 partly seen, each sample at most once per pass
    epoch e      stream_k[e*quota_k : (e+1)*quota_k] of every source, shuffled together (seed, e)

so the mix holds exactly (to the rounding) in every epoch, and on average in each global batch (a
batch is a random draw from its epoch's samples, so its own counts vary around the weights). Epoch
e needs nothing but (seed, e), so resuming, any world size and `group_by_length` work as without
mixing, and the state is the same (epoch, step_in_epoch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

LENGTH_GROUPING_WINDOW = 50  # global batches sorted together by length ("megabatches" in HF)
SOURCE_STREAM = 0x50CE  # last word of a source pass's seed: never equal to an epoch's (seed, epoch)


class GlobalBatchSampler:
    """Yields, for each optimizer step, this rank's `grad_accum` micro-batches of sample indices.

    Iterates through epochs forever (the training loop stops at its max_steps); `epoch` and
    `step_in_epoch` always name the next step to be yielded.

    `group_by_length=True` (with `lengths`, for SFT batches padded to their longest sample): after
    the shuffle, samples are sorted by length within windows of 50 global batches and the order of
    the global batches within a window is shuffled again, so a micro-batch holds similar lengths
    and less padding, while the epoch stays a seeded permutation.

    `sources` (the source index 0..K-1 of every sample) with `weights` (K numbers > 0, relative):
    mixing, see the module docstring. `samples_per_epoch` then holds each source's quota.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        lengths: Sequence[int] | np.ndarray | None = None,
        group_by_length: bool = False,
        sources: Sequence[int] | np.ndarray | None = None,
        weights: Sequence[float] | None = None,
    ):
        if min(global_batch_size, micro_batch_size, world_size) < 1:
            raise ValueError(
                f"global_batch_size {global_batch_size}, micro_batch_size {micro_batch_size} and "
                f"world_size {world_size} must all be at least 1"
            )
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by micro_batch_size "
                f"{micro_batch_size} x world_size {world_size}; the accumulation steps must be a whole number"
            )
        if num_samples < global_batch_size:
            raise ValueError(
                f"only {num_samples} samples for a global batch of {global_batch_size}: an epoch would "
                f"have no full step; use more data or a smaller global_batch_size"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, not {seed}")
        if group_by_length:
            if lengths is None or len(lengths) != num_samples:
                raise ValueError(f"group_by_length needs lengths for all {num_samples} samples")
        if (sources is None) != (weights is None):
            raise ValueError("mixing needs both sources (one per sample) and weights (one per source)")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.group_by_length = group_by_length
        self.grad_accum = global_batch_size // (micro_batch_size * world_size)
        self.steps_per_epoch = num_samples // global_batch_size
        self.weights = None if weights is None else [float(w) for w in weights]
        if sources is not None:
            self._members, self.samples_per_epoch = self._plan_mixture(np.asarray(sources), self.weights)
        self.epoch, self.step_in_epoch = 0, 0
        self._order_of_epoch: tuple[int, np.ndarray] | None = None  # the last epoch's order, kept

    # -- the order --------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch`, (num_samples,): a function of (seed, epoch) only."""
        if self._order_of_epoch is not None and self._order_of_epoch[0] == epoch:
            return self._order_of_epoch[1]
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is not None:
            order = self._mixed_epoch(epoch, rng)
        else:
            order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        if self.group_by_length:
            order = self._grouped_by_length(order, rng)
        self._order_of_epoch = (epoch, order)
        return order

    def _grouped_by_length(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        G = self.global_batch_size
        window = LENGTH_GROUPING_WINDOW * G
        grouped = []
        for start in range(0, len(order), window):
            samples = order[start : start + window]
            samples = samples[np.argsort(-self.lengths[samples], kind="stable")]  # longest first
            n_full = len(samples) // G
            batches = samples[: n_full * G].reshape(n_full, G)  # (batches, G)
            if self.shuffle:
                batches = batches[rng.permutation(n_full)]  # lengths must not trend within an epoch
            grouped += [batches.reshape(-1), samples[n_full * G :]]  # the remainder is the dropped tail
        return np.concatenate(grouped)

    # -- mixing ---------------------------------------------------------------------------------

    def _plan_mixture(self, sources: np.ndarray, weights: list[float]) -> tuple[list[np.ndarray], np.ndarray]:
        """(the sample indices of each source, each source's quota of an epoch's samples)."""
        if len(sources) != self.num_samples:
            raise ValueError(f"sources has {len(sources)} entries for {self.num_samples} samples")
        if not weights or not all(np.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"mixing weights must be numbers > 0, not {weights}")
        K = len(weights)
        if len(sources) and (sources.min() < 0 or sources.max() >= K):
            raise ValueError(f"sources must be source indices in [0, {K}) for {K} weights")
        members = [np.flatnonzero(sources == k) for k in range(K)]
        empty = [k for k in range(K) if len(members[k]) == 0]
        if empty:
            raise ValueError(f"source(s) {empty} have no samples to draw")
        n_epoch = self.steps_per_epoch * self.global_batch_size
        exact = np.asarray(weights) / sum(weights) * n_epoch  # (K,)
        quota = np.floor(exact).astype(np.int64)
        by_remainder = np.argsort(-(exact - quota), kind="stable")  # largest remainder first
        quota[by_remainder[: n_epoch - int(quota.sum())]] += 1
        return members, quota

    def _source_stream(self, k: int, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) of source k's stream: its passes laid end to end, pass p a
        permutation seeded by (seed, k, p), so each sample comes once per pass."""
        members = self._members[k]
        n = len(members)
        first, last = start // n, (stop - 1) // n if stop > start else start // n
        passes = []
        for p in range(first, last + 1):
            rng = np.random.default_rng([self.seed, k, p, SOURCE_STREAM])
            passes.append(rng.permutation(n) if self.shuffle else np.arange(n))
        return members[np.concatenate(passes)[start - first * n : stop - first * n]]

    def _mixed_epoch(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        """Every source's quota for `epoch`, from where its stream stands, shuffled together;
        without shuffling, interleaved evenly (source k's j-th sample at time (j + 1/2) / quota_k)."""
        quotas = [int(q) for q in self.samples_per_epoch]
        parts = [self._source_stream(k, epoch * q, (epoch + 1) * q) for k, q in enumerate(quotas)]
        order = np.concatenate(parts)
        if self.shuffle:
            return order[rng.permutation(len(order))]
        times = np.concatenate([(np.arange(q) + 0.5) / q for q in self.samples_per_epoch if q > 0])
        return order[np.argsort(times, kind="stable")]

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """All G sample indices of optimizer step `step` of `epoch`, over every rank, (G,)."""
        G = self.global_batch_size
        return self.epoch_order(epoch)[step * G : (step + 1) * G]

    def micro_batches(self, epoch: int, step: int) -> list[list[int]]:
        """This rank's share of the global batch, as `grad_accum` lists of `micro_batch_size` indices."""
        per_rank = self.global_batch_size // self.world_size
        mine = self.global_batch(epoch, step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        M = self.micro_batch_size
        return [mine[a * M : (a + 1) * M].tolist() for a in range(self.grad_accum)]

    # -- iteration and resume -----------------------------------------------------------------

    def __iter__(self) -> Iterator[list[list[int]]]:
        while True:
            batches = self.micro_batches(self.epoch, self.step_in_epoch)
            self.step_in_epoch += 1  # advanced before yielding: state_dict() names the next step
            if self.step_in_epoch == self.steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            yield batches

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(
                f"sampler state epoch {epoch}, step_in_epoch {step} does not fit {self.steps_per_epoch} steps per epoch"
            )
        self.epoch, self.step_in_epoch = epoch, step


class MixedDataset:
    """The data sets of weighted sources laid end to end, for `GlobalBatchSampler`'s mixing.

    `dataset[i]` is sample i of the concatenation; `sources[i]` its source (0..K-1, the order of
    `parts`), `weights` and `names` the sources' (the training loop hands `sources` and `weights`
    to the sampler). `lengths` concatenates the parts' lengths where every part has them.
    """

    def __init__(self, parts: Sequence, weights: Sequence[float], names: Sequence[str]):
        if not len(parts) == len(weights) == len(names):
            raise ValueError(f"{len(parts)} parts, {len(weights)} weights and {len(names)} names: "
                             "one of each per source")
        self.parts, self.weights, self.names = list(parts), [float(w) for w in weights], [str(n) for n in names]
        sizes = [len(part) for part in self.parts]
        self.starts = np.cumsum([0] + sizes)  # (K + 1,) index of each part's first sample, then the total
        self.sources = np.repeat(np.arange(len(sizes)), sizes)  # (N,)
        has_lengths = all(getattr(part, "lengths", None) is not None for part in self.parts)
        self.lengths = [n for part in self.parts for n in part.lengths] if has_lengths else None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[k][index - int(self.starts[k])]

