"""Batch samplers."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from wsss.errors import ConfigError


class BreedBatchSampler(Sampler[list[int]]):
    """Batches of ``breeds_per_batch`` distinct breeds, ``batch_size // breeds_per_batch`` images each.

    Each epoch, every breed's indices are shuffled and cut into chunks of ``k = batch_size //
    breeds_per_batch``; a breed's last short chunk is topped up with other images of that breed (with
    replacement only if the breed has fewer than ``k`` images). Batches draw distinct breeds with
    probability proportional to their remaining chunks, so each image is used about once per epoch; when
    fewer breeds than ``breeds_per_batch`` have chunks left, extra breeds are oversampled with fresh chunks.
    Deterministic for a given ``seed`` and :meth:`set_epoch`.

    Args:
        breeds: breed label of each dataset index (any hashable; pass only the indices to sample from).
        batch_size: images per batch (rounded down to a multiple of ``breeds_per_batch``).
        breeds_per_batch: distinct breeds per batch.
        seed: base seed.
        drop_last: drop the epoch's final incomplete group of chunks instead of filling it by oversampling.
    """

    def __init__(
        self,
        breeds: Sequence[Hashable],
        batch_size: int,
        breeds_per_batch: int,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        groups: dict[Hashable, list[int]] = {}
        for i, b in enumerate(breeds):
            groups.setdefault(b, []).append(i)
        if breeds_per_batch < 1 or batch_size < breeds_per_batch:
            raise ConfigError(
                f"batch_size ({batch_size}) must be >= breeds_per_batch ({breeds_per_batch}) >= 1"
            )
        if len(groups) < breeds_per_batch:
            raise ConfigError(
                f"breeds_per_batch = {breeds_per_batch} but the data holds only {len(groups)} breed(s)"
            )
        self._keys = list(groups)
        self._groups = [np.asarray(groups[k], dtype=np.int64) for k in self._keys]
        self.per_breed = batch_size // breeds_per_batch
        self.breeds_per_batch = breeds_per_batch
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        n_chunks = sum(math.ceil(len(g) / self.per_breed) for g in self._groups)
        n = n_chunks / breeds_per_batch
        self._len = max(1, math.floor(n) if drop_last else math.ceil(n))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (deterministic) order :meth:`__iter__` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def _fresh_chunk(self, rng: np.random.Generator, b: int) -> np.ndarray:
        idx = self._groups[b]
        return rng.choice(idx, self.per_breed, replace=len(idx) < self.per_breed)

    def _chunks(self, rng: np.random.Generator, b: int) -> list[np.ndarray]:
        idx = rng.permutation(self._groups[b])
        k = self.per_breed
        chunks = [idx[i:i + k] for i in range(0, len(idx), k)]
        last = chunks[-1]
        if len(last) < k:
            others = np.setdiff1d(self._groups[b], last)
            need = k - len(last)
            pool = others if len(others) else last
            fill = rng.choice(pool, need, replace=len(pool) < need)
            chunks[-1] = np.concatenate([last, fill])
        return chunks

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        queues = [self._chunks(rng, b) for b in range(len(self._groups))]
        for _ in range(self._len):
            remaining = np.array([len(q) for q in queues], dtype=np.float64)
            avail = np.flatnonzero(remaining)
            if len(avail) >= self.breeds_per_batch:
                picked = rng.choice(avail, self.breeds_per_batch, replace=False, p=remaining[avail] / remaining.sum())
                chunks = [queues[b].pop() for b in picked]
            else:
                chunks = [queues[b].pop() for b in avail]
                others = np.setdiff1d(np.arange(len(queues)), avail)
                extra = rng.choice(others, self.breeds_per_batch - len(avail), replace=False)
                chunks += [self._fresh_chunk(rng, b) for b in extra]
            yield [int(i) for c in chunks for i in c]
