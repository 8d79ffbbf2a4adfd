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

from trainer.model.packing import Features, PackingSupport, Placement, Rows, pack, processed_tokens

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
    """The sub-batches, longest texts first, each trimmed to its longest text (or packed:
    `trainer.model.packing`)."""
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


@dataclass(frozen=True)
class Packing:
    """When and how sub-batches are packed (several texts per row, `trainer.model.packing`)."""

    support: PackingSupport
    """How the model takes packed rows."""
    always: bool = False
    """Pack every column; otherwise only where packing costs less than padded sub-batches."""
    attention_cost: float = 0.0
    """The cost of attention per token and per token of its row, relative to the rest of the
    token's forward (about 1 / (6 x hidden size) for a transformer layer with a 4x MLP): how the
    comparison prices wider rows."""


def attention_cost(hidden_size: int) -> float:
    """`Packing.attention_cost` of a transformer layer of `hidden_size` with a 4x MLP: per token,
    attention takes 2 x hidden multiply-adds per token of its row (scores and mixing), the
    projections and MLP 12 x hidden^2."""
    return 1 / (6 * hidden_size)


def run_width(longest: int, buckets: bool) -> int:
    """The padded length of a run whose longest text has `longest` tokens (its shape bucket)."""
    return bucket_length(longest) if buckets else longest


def packed_groups(
    lengths: list[int], max_rows: int | None, max_tokens: int | None, buckets: bool
) -> list[tuple[int, Placement]]:
    """Consecutive runs of `lengths` (sorted longest first), each packed into rows as long as its
    longest text (rounded up by `bucket_length` with `buckets`): (run size, placement) per run.
    A run holds at most max_rows texts and max_tokens row tokens (but a single text)."""
    groups, start, total = [], 0, len(lengths)
    while start < total:
        width = max(1, run_width(lengths[start], buckets))  # texts of no tokens: rows of 1
        rows, starts = Rows(width), []
        for length in lengths[start:]:
            if len(starts) == max_rows:
                break
            if max_tokens is not None and starts and rows.needs_new_row(length) and (len(rows.used) + 1) * width > max_tokens:
                break
            starts.append(rows.add(length))
        groups.append((len(starts), Placement(width, len(rows.used), starts)))
        start += len(starts)
    return groups


def plan_cost(shapes: list[tuple[int, int]], overhead_tokens: int, attention_cost: float) -> float:
    """The price of forwards of (rows, width) each, in tokens: rows x width x (1 + width x
    attention_cost) plus overhead_tokens per forward."""
    return sum(rows * width * (1 + width * attention_cost) + overhead_tokens for rows, width in shapes)


def choose_plan(
    lengths: list[int], max_rows: int | None, max_tokens: int | None, overhead_tokens: int, buckets: bool,
    packing: Packing | None,
) -> list[tuple[int, Placement | None]]:
    """How to run a column of texts of `lengths` (sorted longest first): runs of (texts,
    placement), each packed into rows by its placement, or padded (None) as `best_cuts` cuts them;
    packed where `packing` says so (always, or where `plan_cost` prices it lower)."""
    groups = packed_groups(lengths, max_rows, max_tokens, buckets) if packing is not None and lengths else None
    if groups is not None and packing.always:
        return groups
    sizes = best_cuts(lengths, max_rows, max_tokens, overhead_tokens, buckets)
    if groups is not None:
        starts = np.cumsum([0] + sizes[:-1])
        padded = [(size, run_width(lengths[start], buckets)) for size, start in zip(sizes, starts)]
        packed = [(placement.rows, placement.width) for _, placement in groups]
        if plan_cost(packed, overhead_tokens, packing.attention_cost) < plan_cost(padded, overhead_tokens, packing.attention_cost):
            return groups
    return [(size, None) for size in sizes]


def sub_batches(
    features: Features,
    *,
    max_rows: int | None = None,
    max_tokens: int | None = None,
    overhead_tokens: int = OVERHEAD_TOKENS,
    sort: bool = True,
    buckets: bool = False,
    packing: Packing | None = None,
) -> SubBatches:
    """Sort the texts by length and cut them where it saves the most (see the module). With
    `sort` False, rows keep their order and are cut every `max_rows` (the unsorted reference).
    `buckets`: shape buckets (see the module); only with `sort`. `packing`: pack the runs of
    texts into shared rows (where it is cheaper, unless `always`); only with `sort`."""
    mask = features["attention_mask"]
    lengths = mask.sum(dim=1)
    total = mask.shape[0]
    plan: list[tuple[int, Placement | None]]  # (texts, where they go in packed rows; None: a padded sub-batch)
    if sort:
        order = torch.sort(lengths, descending=True, stable=True).indices
        sorted_lengths = lengths[order].tolist()
        plan = choose_plan(sorted_lengths, max_rows, max_tokens, overhead_tokens, buckets, packing)
    else:
        order = torch.arange(total, device=mask.device)
        step = max_rows or total or 1
        plan = [(min(step, total - start), None) for start in range(0, total, step)]
    chunks, start = [], 0
    for size, placement in plan:
        chunk = {k: v[order[start : start + size]] for k, v in features.items()}
        chunks.append(trim(chunk, buckets and sort) if placement is None else pack(chunk, placement, packing.support.position_offset))
        start += size
    padded = sum(processed_tokens(c) for c in chunks)
    return SubBatches(chunks, order, int(lengths.sum()), padded)


def embed_in_sub_batches(encoder: Callable[[Features], torch.Tensor], batches: SubBatches) -> torch.Tensor:
    """The embeddings of every text, in the original order, one forward per sub-batch."""
    return batches.restore(torch.cat([encoder(chunk) for chunk in batches.chunks]))


class SubBatcher:
    """How the training step cuts each column of a batch (the recipe's settings), counting the
    tokens it processes: real ones and padded ones, for the padding efficiency the loop logs."""

    def __init__(
        self, sort: bool = True, max_tokens: int | None = None, overhead_tokens: int = OVERHEAD_TOKENS, buckets: bool = True,
        packing: Packing | None = None,
    ) -> None:
        self.sort, self.max_tokens, self.overhead_tokens, self.buckets = sort, max_tokens, overhead_tokens, buckets
        self.packing = packing
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
            packing=self.packing,
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
