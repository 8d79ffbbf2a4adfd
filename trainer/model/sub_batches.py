"""Length-sorted sub-batches: run the encoder on texts of similar length, with little padding.

The encoder embeds each text independently (only the loss couples them), so a column of texts
(the batch's queries, or its documents) can be sorted by length, cut into sub-batches, each
trimmed to its own longest text, and the embeddings put back in the original order: the same
embeddings, loss and gradients as one padded forward, for fewer tokens processed.

Where to cut is chosen to minimise the tokens processed (rows x longest length of each
sub-batch) plus a fixed cost per forward call (`overhead_tokens`, since every call runs every
layer's kernels however small it is), under optional limits on rows (the cached loss's chunk
size) and padded tokens (a memory bound, as sentence-transformers' `mini_batch_num_tokens`).
Sorted lengths make the best cuts contiguous runs, found exactly by dynamic programming.

With shape buckets (the training default), a sub-batch's length is rounded up to one of four
lengths per doubling (`bucket_length`: 24, 28, 32, 40, 48, ..., at most a quarter more padding)
and runs are multiples of `BUCKET_ROWS` texts (the run of the shortest texts takes what is
left). A batch then reuses the shapes earlier batches had, instead of bringing new ones every
step: the CPU's oneDNN kernels are compiled and cached per shape (a new shape costs time and
memory that is never returned; steps without buckets grew a run from 3.2 to 5.8 GB), and
repeated sizes let the allocator reuse freed buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

Features = dict[str, torch.Tensor]

BUCKET_ROWS = 8
"""With shape buckets, sub-batches hold a multiple of this many texts (but the last)."""

OVERHEAD_TOKENS = 64
"""Default cost of one forward call, in tokens. Measured on a 2-core CPU (MiniLM, batch 64,
fp32): 64 against 256 took SNLI triplets from 0.700 to 0.789 padding efficiency and 1.11 to
1.05 s per step, SciFact pairs from 0.929 to 0.953 and 8.78 to 8.66 s; 16 gained 0.04 more
efficiency on SNLI for no further speed (smaller matrix products run slower per token)."""


@dataclass
class SubBatches:
    """A column of tokenised texts cut into length-sorted sub-batches."""

    chunks: list[Features]
    """The sub-batches, longest texts first, each trimmed to its longest text."""
    order: torch.Tensor
    """(T,) the original row of each sorted row: concatenated chunks = rows[order]."""
    real_tokens: int
    """Tokens of the texts themselves (attention mask ones)."""
    padded_tokens: int
    """Tokens the chunks process, padding included."""

    def restore(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        """Rows in chunk order (T, ...) back to the original order (differentiable)."""
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(len(self.order), device=self.order.device)
        return sorted_rows[inverse.to(sorted_rows.device)]

    def sort(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows in the original order (T, ...) to chunk order."""
        return rows[self.order.to(rows.device)]

    def split(self, sorted_rows: torch.Tensor) -> list[torch.Tensor]:
        """Rows in chunk order cut like the chunks."""
        return list(torch.split(sorted_rows, [c["attention_mask"].shape[0] for c in self.chunks]))


def bucket_length(length: int) -> int:
    """`length` rounded up to one of four lengths per doubling: exact below 8, then steps of 2
    up to 16, of 4 up to 32, of 8 up to 64, ... (at most a quarter more)."""
    if length < 8:
        return length
    step = 1 << (length.bit_length() - 3)  # length in [2^k, 2^(k+1)): steps of 2^(k-2)
    return -(-length // step) * step


def best_cuts(
    lengths: list[int], max_rows: int | None, max_tokens: int | None, overhead_tokens: int, buckets: bool = False
) -> list[int]:
    """Sizes of consecutive runs of `lengths` (sorted longest first) that minimise
    sum(run size x its first length) + overhead_tokens per run, within the limits. A single
    text longer than max_tokens gets a run of its own. With `buckets`, a run's length is its
    first length rounded up by `bucket_length`, and runs hold a multiple of BUCKET_ROWS texts or
    max_rows texts (a single one too under a token budget), but the last run, which takes what
    is left."""
    total = len(lengths)
    lengths_ = np.asarray([bucket_length(n) for n in lengths] if buckets else lengths, dtype=np.float64)
    cost = np.zeros(total + 1)  # cost[i]: the best cost of the first i rows
    cut = np.zeros(total + 1, dtype=np.int64)
    for end in range(1, total + 1):
        first = 0 if max_rows is None else max(0, end - max_rows)
        starts = np.arange(first, end)
        padded = (end - starts) * lengths_[first:end]  # a run's longest text is its first
        allowed = np.ones(len(starts), dtype=bool) if max_tokens is None else (padded <= max_tokens)
        if buckets and end < total:
            sizes = end - starts
            allowed &= (sizes % BUCKET_ROWS == 0) | (sizes == max_rows)
        if not buckets or max_tokens is not None:
            allowed[-1] = True  # one text alone always fits a token budget
        candidates = np.where(allowed, cost[first:end] + padded + overhead_tokens, np.inf)
        best = int(np.argmin(candidates))
        cost[end], cut[end] = candidates[best], first + best
    sizes, end = [], total
    while end > 0:
        sizes.append(int(end - cut[end]))
        end = int(cut[end])
    return sizes[::-1]


def trim(chunk: Features, buckets: bool = False) -> Features:
    """Drop the columns that are padding in every row (right or left padding alike). With
    `buckets`, keep padding up to the bucket of the longest text: under right padding by adding
    masked columns where the chunk is narrower; under left padding (or none, where the side is
    unknown) only within the chunk, as more left padding would move a decoder's positions."""
    mask = chunk["attention_mask"]
    width = mask.shape[1]
    # one transfer to the host: which columns hold a text, and whether the first / last is full
    *used, first_full, last_full = torch.cat([mask.any(dim=0), mask[:, 0].all()[None], mask[:, -1].all()[None]]).tolist()
    if not any(used):
        return chunk
    first, last = used.index(True), width - used[::-1].index(True)
    if buckets:
        right_padded = first_full and not last_full
        bucket = bucket_length(last - first)
        if right_padded:
            last = bucket
        else:
            first = max(0, last - bucket)
    if first == 0 and last == width:
        return chunk
    if last > width:  # masked padding columns (their ids do not matter)
        pad = lambda v: torch.nn.functional.pad(v, (0, last - width))  # noqa: E731
        return {k: pad(v) if v.ndim == 2 and v.shape[1] == width else v for k, v in chunk.items()}
    return {k: v[:, first:last] if v.ndim == 2 and v.shape[1] == width else v for k, v in chunk.items()}  # (B,) extras stay


def sub_batches(
    features: Features,
    *,
    max_rows: int | None = None,
    max_tokens: int | None = None,
    overhead_tokens: int = OVERHEAD_TOKENS,
    sort: bool = True,
    buckets: bool = False,
) -> SubBatches:
    """Sort the texts by length and cut them where it saves the most (see the module). With
    `sort` False, rows keep their order and are cut every `max_rows` (the unsorted reference).
    `buckets`: shape buckets (see the module); only with `sort`."""
    mask = features["attention_mask"]
    lengths = mask.sum(dim=1)
    total = mask.shape[0]
    if sort:
        order = torch.sort(lengths, descending=True, stable=True).indices
        sorted_lengths = lengths[order].tolist()
        sizes = best_cuts(sorted_lengths, max_rows, max_tokens, overhead_tokens, buckets)
    else:
        order = torch.arange(total, device=mask.device)
        step = max_rows or total or 1
        sizes = [min(step, total - start) for start in range(0, total, step)]
    chunks, start = [], 0
    for size in sizes:
        index = order[start : start + size]
        chunks.append(trim({k: v[index] for k, v in features.items()}, buckets and sort))
        start += size
    padded = sum(c["attention_mask"].numel() for c in chunks)
    return SubBatches(chunks, order, int(lengths.sum()), padded)


def embed_in_sub_batches(encoder: Callable[[Features], torch.Tensor], batches: SubBatches) -> torch.Tensor:
    """The embeddings of every text, in the original order, one forward per sub-batch."""
    return batches.restore(torch.cat([encoder(chunk) for chunk in batches.chunks]))


class SubBatcher:
    """How the training step cuts each column of a batch (the recipe's settings), counting the
    tokens it processes: real ones and padded ones, for the padding efficiency the loop logs."""

    def __init__(
        self, sort: bool = True, max_tokens: int | None = None, overhead_tokens: int = OVERHEAD_TOKENS, buckets: bool = True
    ) -> None:
        self.sort, self.max_tokens, self.overhead_tokens, self.buckets = sort, max_tokens, overhead_tokens, buckets
        self.real_tokens = self.padded_tokens = 0
        self.tokens_seen = 0
        """Real tokens embedded since this batcher was made (never reset)."""

    def __call__(self, features: Features, max_rows: int | None = None) -> SubBatches:
        batches = sub_batches(
            features,
            max_rows=max_rows,
            max_tokens=self.max_tokens,
            overhead_tokens=self.overhead_tokens,
            sort=self.sort,
            buckets=self.buckets,
        )
        self.real_tokens += batches.real_tokens
        self.padded_tokens += batches.padded_tokens
        self.tokens_seen += batches.real_tokens
        return batches

    def take_counts(self) -> tuple[int, int]:
        """(real, padded) tokens since the last call."""
        counts = (self.real_tokens, self.padded_tokens)
        self.real_tokens = self.padded_tokens = 0
        return counts
