"""The training examples of all sources, read lazily from Arrow tables.

A `pairs` file is converted once by Hugging Face `datasets` into its Arrow cache, which is
memory-mapped: the rows stay on disk and the operating system pages in what a batch touches, so a
training set larger than RAM works. What stays in memory per pair is its `TextKeys` entry: a 64-bit
hash of the query, the positive and each hard negative (8 bytes per text), which is all the batch
sampler needs to keep duplicates apart.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import xxhash

from trainer.data.examples import Example


def text_key(text: str) -> int:
    """A 64-bit hash of a text that is the same in every process and run (Python's `hash` of a
    string is salted per process), so that keys can fingerprint the data a checkpoint was trained on."""
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")) - 2**63


PAD = -(2**63)
"""Fills the negatives of rows with fewer than the widest; harmless to the sampler, which only
looks for positives among negatives."""


@dataclass
class TextKeys:
    """Per example: hashes of its texts and the index of its source. Equal hashes mean equal texts."""

    query: np.ndarray
    """(N,) int64"""
    positive: np.ndarray
    """(N,) int64; a single text (a `texts` source) has its own key here too"""
    negatives: np.ndarray
    """(N, num_negatives) int64"""
    source: np.ndarray
    """(N,) int32"""

    def __len__(self) -> int:
        return len(self.query)

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> "TextKeys":
        width = max((len(e.negatives) for e in examples), default=0)
        return cls(
            query=np.array([text_key(e.query) for e in examples], dtype=np.int64),
            positive=np.array([text_key(e.query if e.positive is None else e.positive) for e in examples], dtype=np.int64),
            negatives=np.array(
                [[text_key(n) for n in e.negatives] + [PAD] * (width - len(e.negatives)) for e in examples], dtype=np.int64
            ).reshape(len(examples), width),
            source=np.array([e.source for e in examples], dtype=np.int32),
        )

    def fingerprint(self) -> str:
        """sha256 of every key and source index, in order: changes with any text, row or order."""
        digest = hashlib.sha256()
        for values in (self.query, self.positive, self.negatives, self.source):
            digest.update(str(values.shape).encode())
            digest.update(np.ascontiguousarray(values).tobytes())
        return digest.hexdigest()

    @classmethod
    def concatenate(cls, parts: list["TextKeys"]) -> "TextKeys":
        """Parts with fewer negatives (single texts have none) are padded with PAD."""
        width = max(p.negatives.shape[1] for p in parts)
        negatives = [np.pad(p.negatives, ((0, 0), (0, width - p.negatives.shape[1])), constant_values=PAD) for p in parts]
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("query", "positive")),
                   np.concatenate(negatives), np.concatenate([p.source for p in parts]))


class TrainingSet(torch.utils.data.Dataset):
    """Example `i` of the concatenated sources; each table has columns query, positive[, negatives][, teacher_scores],
    or query only (single texts)."""

    def __init__(self, tables: list, keys: TextKeys, num_negatives: int) -> None:
        self.tables = tables
        self.keys = keys
        self.num_negatives = num_negatives
        self.offsets = np.cumsum([0] + [len(t) for t in tables]).tolist()
        self.negative_texts: list[str] | None = None
        self.negative_rows: np.ndarray | None = None

    def set_negatives(self, texts: list[str], rows: np.ndarray) -> None:
        """Serve `texts[rows[i]]` as example i's hard negatives from now on; a row starting with
        -1 serves the file's."""
        self.negative_texts, self.negative_rows = texts, rows

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < len(self):
            raise IndexError(index)
        source = bisect.bisect_right(self.offsets, index) - 1
        row = self.tables[source][index - self.offsets[source]]
        if "positive" not in row:  # a single text
            return Example(row["query"], None, (), source)
        negatives = tuple(row["negatives"][: self.num_negatives]) if self.num_negatives else ()
        if self.negative_rows is not None and self.negative_rows[index, 0] >= 0:
            negatives = tuple(self.negative_texts[j] for j in self.negative_rows[index])
        scores = row.get("teacher_scores")
        scores = tuple(float(s) for s in scores[: 1 + self.num_negatives]) if scores is not None else None
        return Example(row["query"], row["positive"], negatives, source, scores)
