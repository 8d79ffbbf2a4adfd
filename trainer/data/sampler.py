"""Seeded batches in which no query, and no positive, appears twice.

A repeated positive in a batch would be scored both as the right answer for one query and
as a negative for another; a repeated query would see its other positive as a negative.
The sampler defers such examples to a later batch instead.

With several training sources (`Example.source`), optional weights set how many pairs each
source contributes per epoch, and batches are drawn from one source at a time (homogeneous)
or from the pooled sources (mixed).
"""

from __future__ import annotations

import random
from collections import deque
from typing import Iterator

from trainer.data.examples import Example


class NoDuplicatesBatchSampler:
    """Yields lists of example indices; the order depends only on (seed, epoch)."""

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        weights: list[float] | None = None,
        homogeneous: bool = True,
    ) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0
        self._cache: tuple[int, list[list[int]]] | None = None
        self.homogeneous = homogeneous
        num_sources = max(e.source for e in examples) + 1 if examples else 1
        self.groups: list[list[int]] = [[] for _ in range(num_sources)]
        for index, example in enumerate(examples):
            self.groups[example.source].append(index)
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

    def batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        orders = [self._draw(group, count, rng) for group, count in zip(self.groups, self.counts)]
        if self.homogeneous and len(self.groups) > 1:
            batches = [batch for order in orders for batch in self._pack(order)]
            if self.shuffle:
                rng.shuffle(batches)
        else:
            order = [index for o in orders for index in o]
            if self.shuffle and len(self.groups) > 1:
                rng.shuffle(order)
            batches = self._pack(order)
        if self.num_replicas > 1:  # processes gather each other's embeddings: equal batch sizes only
            batches = [b for b in batches if len(b) == self.batch_size]
        # every process gets the same number of batches: the global batches r, r+W, r+2W, ...
        usable = len(batches) - len(batches) % self.num_replicas
        batches = batches[self.rank : usable : self.num_replicas]
        self._cache = (self.epoch, batches)
        return batches

    def _draw(self, group: list[int], count: int, rng: random.Random) -> list[int]:
        """`count` indices of a source: shuffled, cycling (reshuffled) when count exceeds its size."""
        drawn: list[int] = []
        while len(drawn) < count and group:
            cycle = list(group)
            if self.shuffle:
                rng.shuffle(cycle)
            drawn += cycle[: count - len(drawn)]
        return drawn

    def _pack(self, order: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        pending: deque[int] = deque(order)
        while pending:
            batch: list[int] = []
            queries: set[str] = set()
            positives: set[str] = set()
            documents: set[str] = set()
            skipped: deque[int] = deque()
            while pending and len(batch) < self.batch_size:
                index = pending.popleft()
                ex = self.examples[index]
                if ex.query in queries or ex.positive in documents or positives.intersection(ex.negatives):
                    skipped.append(index)
                    continue
                batch.append(index)
                queries.add(ex.query)
                positives.add(ex.positive)
                documents.add(ex.positive)
                documents.update(ex.negatives)
            pending = skipped + pending
            if len(batch) >= 2:
                batches.append(batch)
            # a lone leftover example has no in-batch negatives; it waits for the next epoch
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches()[self.start_batch :])

    def __len__(self) -> int:
        """Batches of this process in the current epoch, skipped ones excluded."""
        return len(self.batches()) - self.start_batch
