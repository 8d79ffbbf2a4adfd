"""Seeded batches in which no query, and no positive, appears twice.

A repeated positive in a batch would be scored both as the right answer for one query and
as a negative for another; a repeated query would see its other positive as a negative.
The sampler defers such examples to a later batch instead.

With several training sources (`Example.source`), optional weights set how many pairs each
source contributes per epoch, and batches are drawn from one source at a time (homogeneous)
or from the pooled sources (mixed).
"""

from __future__ import annotations

from array import array
from collections import deque
from typing import Iterator

import numpy as np

from trainer.data.training_set import TextKeys


class NoDuplicatesBatchSampler:
    """Yields lists of example indices; the order depends only on (seed, epoch).

    Works on `TextKeys` (hashes of each example's texts), never on the texts, and keeps an epoch's
    order in flat integer arrays: about 16 bytes per pair in all, however large the data."""

    def __init__(
        self,
        keys: TextKeys,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        weights: list[float] | None = None,
        homogeneous: bool = True,
    ) -> None:
        self.keys = keys
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self.homogeneous = homogeneous
        num_sources = int(keys.source.max()) + 1 if len(keys) else 1
        self.groups: list[np.ndarray] = [np.flatnonzero(keys.source == s) for s in range(num_sources)]
        if weights is not None and len(weights) != num_sources:
            raise ValueError(f"{len(weights)} weights for {num_sources} sources")
        self.counts = self._counts(weights)
        """Pairs drawn from each source per epoch."""

    def _counts(self, weights: list[float] | None) -> list[int]:
        sizes = [len(g) for g in self.groups]
        if weights is None:
            return sizes
        total = sum(sizes)
        return [max(1, round(total * w / sum(weights))) if size else 0 for w, size in zip(weights, sizes)]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; `start_batch` skips this process's first batches (resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def _epoch(self) -> tuple[np.ndarray, np.ndarray]:
        """(flat example indices, start of each of this process's batches in it, plus the end)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1], self._cache[2]
        rng = np.random.default_rng([self.seed, self.epoch])
        orders = [self._draw(group, count, rng) for group, count in zip(self.groups, self.counts)]
        if self.homogeneous and len(self.groups) > 1:
            packed = [self._pack(order) for order in orders]
            flat = np.concatenate([p[0] for p in packed])
            lengths = np.concatenate([np.diff(p[1]) for p in packed])
            starts = np.cumsum(lengths) - lengths
            if self.shuffle:
                permutation = rng.permutation(len(lengths))
                starts, lengths = starts[permutation], lengths[permutation]
        else:
            order = np.concatenate(orders)
            if self.shuffle and len(self.groups) > 1:
                order = rng.permutation(order)
            flat, bounds = self._pack(order)
            starts, lengths = bounds[:-1], np.diff(bounds)
        if self.num_replicas > 1:  # processes gather each other's embeddings: equal batch sizes only
            full = lengths == self.batch_size
            starts, lengths = starts[full], lengths[full]
        # every process gets the same number of batches: the global batches r, r+W, r+2W, ...
        usable = len(starts) - len(starts) % self.num_replicas
        mine = slice(self.rank, usable, self.num_replicas)
        spans = np.stack([starts[mine], starts[mine] + lengths[mine]], axis=1)
        self._cache = (self.epoch, flat, spans)
        return flat, spans

    def batches(self) -> list[list[int]]:
        flat, spans = self._epoch()
        return [flat[a:b].tolist() for a, b in spans]

    def _draw(self, group: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """`count` indices of a source: shuffled, cycling (reshuffled) when count exceeds its size."""
        if not len(group):
            return group
        cycles = []
        for _ in range(-(-count // len(group))):
            cycles.append(rng.permutation(group) if self.shuffle else group)
        return np.concatenate(cycles)[:count]

    def _pack(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Greedy batches in `order`; a pair that would repeat a text waits for the next batch.
        Returns the flat indices and the batch boundaries (len(batches) + 1)."""
        query, positive, negatives = self.keys.query, self.keys.positive, self.keys.negatives
        flat = array("q")  # 8 bytes per index, not a Python int object each
        bounds = array("q", [0])
        waiting: deque[int] = deque()
        position = 0
        while waiting or position < len(order):
            batch: list[int] = []
            queries: set[int] = set()
            positives: set[int] = set()
            documents: set[int] = set()
            skipped: deque[int] = deque()
            while len(batch) < self.batch_size and (waiting or position < len(order)):
                if waiting:
                    index = waiting.popleft()
                else:
                    index = int(order[position])
                    position += 1
                q, p, n = int(query[index]), int(positive[index]), negatives[index].tolist()
                if q in queries or p in documents or positives.intersection(n):
                    skipped.append(index)
                    continue
                batch.append(index)
                queries.add(q)
                positives.add(p)
                documents.add(p)
                documents.update(n)
            waiting = skipped + waiting
            if len(batch) >= 2:
                flat.extend(batch)
                bounds.append(len(flat))
            # a lone leftover example has no in-batch negatives; it waits for the next epoch
        return np.frombuffer(flat, dtype=np.int64), np.frombuffer(bounds, dtype=np.int64)

    def __iter__(self) -> Iterator[list[int]]:
        flat, spans = self._epoch()
        for a, b in spans[self.start_batch :]:
            yield flat[a:b].tolist()

    def __len__(self) -> int:
        """Batches of this process in the current epoch, skipped ones excluded."""
        return len(self._epoch()[1]) - self.start_batch
