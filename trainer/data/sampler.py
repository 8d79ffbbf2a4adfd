"""Seeded batches in which no query, and no positive, appears twice across all processes.

A repeated positive in a batch would be scored both as the right answer for one query and
as a negative for another; a repeated query would see its other positive as a negative.
The sampler defers such examples to a later batch instead.

With several processes, cross-device negatives score every query against the documents of all
processes' batches of the same step, so the rule holds for that global batch: the sampler packs
global batches of `num_replicas x batch_size` pairs and process `rank` takes the `rank`-th
contiguous slice of `batch_size` pairs of each.

With several training sources (`Example.source`), optional weights set how many pairs each
source contributes per epoch, and global batches are drawn from one source at a time
(homogeneous) or from the pooled sources (mixed).
"""

from __future__ import annotations

from array import array
from collections import deque
from typing import Iterator

import numpy as np

from trainer.data.training_set import TextKeys


class NoDuplicatesBatchSampler:
    """Yields lists of example indices; the order depends only on (seed, epoch), the same in
    every process.

    Works on `TextKeys` (hashes of each example's texts), never on the texts, and keeps an epoch's
    order in flat integer arrays: about 16 bytes per pair in all, however large the data.

    `accumulation_steps`: gradient accumulation steps per optimiser step. Each epoch keeps a
    multiple of this many global batches (the trailing ones are dropped, like `drop_last`), so
    that an accumulation window never runs across the end of an epoch."""

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
        accumulation_steps: int = 1,
        clusters: np.ndarray | None = None,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be at least 1, not {accumulation_steps}")
        self.keys = keys
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.accumulation_steps = accumulation_steps
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
        self.clusters: list[list[np.ndarray]] | None = None
        """With clustered batches: each source's clusters (example indices), every batch from one of them."""
        if clusters is not None:
            if len(clusters) != len(keys):
                raise ValueError(f"{len(clusters)} cluster labels for {len(keys)} examples")
            self.clusters = [[group[clusters[group] == c] for c in np.unique(clusters[group])] for group in self.groups]

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
        """(flat example indices of all processes, (start, end) of each of this process's batches in it)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1], self._cache[2]
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.clusters is not None:
            packed = self._pack_clusters(rng)
        elif self.homogeneous and len(self.groups) > 1:
            packed = [self._pack(self._draw(group, count, rng))[:2] for group, count in zip(self.groups, self.counts)]
        else:
            packed = None
        if packed is not None:
            flat = np.concatenate([p[0] for p in packed])
            lengths = np.concatenate([np.diff(p[1]) for p in packed])
            starts = np.cumsum(lengths) - lengths
            if self.shuffle:
                permutation = rng.permutation(len(lengths))
                starts, lengths = starts[permutation], lengths[permutation]
        else:
            order = np.concatenate([self._draw(group, count, rng) for group, count in zip(self.groups, self.counts)])
            if self.shuffle and len(self.groups) > 1:
                order = rng.permutation(order)
            flat, bounds, _ = self._pack(order)
            starts, lengths = bounds[:-1], np.diff(bounds)
        # whole accumulation windows only
        usable = len(starts) - len(starts) % self.accumulation_steps
        starts, lengths = starts[:usable], lengths[:usable]
        if self.num_replicas > 1:  # every global batch is full: this process's slice of it
            starts = starts + self.rank * self.batch_size
            lengths = np.full_like(lengths, self.batch_size)
        spans = np.stack([starts, starts + lengths], axis=1)  # (batches, 2)
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

    def _pack_clusters(self, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each cluster packed into full batches of its own pairs only; what is left of the clusters
        of a source (fewer pairs than a batch takes) is packed afterwards, in cluster order, so that
        a batch keeps the recipe's size, holds the tails of as few clusters as possible, and no
        pair is left out for good. A source's weight scales every one of its clusters."""
        packed = []
        for clusters, group, count in zip(self.clusters, self.groups, self.counts):
            rest = []
            for cluster in clusters:
                share = len(cluster) if count == len(group) else max(1, round(count * len(cluster) / len(group)))
                flat, bounds, left = self._pack(self._draw(cluster, share, rng), full_only=True)
                packed.append((flat, bounds))
                rest.append(left)
            rest = np.concatenate(rest) if rest else np.zeros(0, dtype=np.int64)
            if len(rest):
                packed.append(self._pack(rest)[:2])
        return packed

    def _pack(self, order: np.ndarray, full_only: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy global batches in `order`; a pair that would repeat a text waits for the next batch.
        Returns the flat indices, the batch boundaries (len(batches) + 1) and the pairs left over.

        With one process a batch needs at least 2 pairs (in-batch negatives); with several, or
        with `full_only`, exactly `num_replicas x batch_size`, since processes gather each other's
        equal-sized batches. Pairs left over at the end are left out of this epoch (the next one
        reshuffles them)."""
        query, positive, negatives = self.keys.query, self.keys.positive, self.keys.negatives
        size = self.batch_size * self.num_replicas
        smallest = size if self.num_replicas > 1 or full_only else 2
        flat = array("q")  # 8 bytes per index, not a Python int object each
        bounds = array("q", [0])
        waiting: deque[int] = deque()
        dropped: list[int] = []
        position = 0
        while len(waiting) + len(order) - position >= smallest:
            batch: list[int] = []
            queries: set[int] = set()
            positives: set[int] = set()
            documents: set[int] = set()
            skipped: deque[int] = deque()
            while len(batch) < size and (waiting or position < len(order)):
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
            if len(batch) >= smallest:
                flat.extend(batch)
                bounds.append(len(flat))
            else:
                dropped.extend(batch)
        left = np.array(dropped + list(waiting) + [int(i) for i in order[position:]], dtype=np.int64)
        return np.frombuffer(flat, dtype=np.int64), np.frombuffer(bounds, dtype=np.int64), left

    def __iter__(self) -> Iterator[list[int]]:
        flat, spans = self._epoch()
        for a, b in spans[self.start_batch :]:
            yield flat[a:b].tolist()

    def __len__(self) -> int:
        """Batches of this process in the current epoch, skipped ones excluded."""
        return len(self._epoch()[1]) - self.start_batch
