"""Batches of tokenised queries and documents, the input of the encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.data.examples import Example


def tokenize(tokenizer, texts: list[str], max_seq_length: int) -> dict[str, torch.Tensor]:
    """Padded to the longest text, truncated to max_seq_length: the one tokenisation for training and inference."""
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_seq_length, return_tensors="pt"))


@dataclass
class ContrastiveBatch:
    """`documents` holds the B positives first, then the B*N hard negatives, query-major."""

    queries: dict[str, torch.Tensor]
    documents: dict[str, torch.Tensor]
    num_negatives: int

    @property
    def size(self) -> int:
        return self.queries["input_ids"].shape[0]

    def to(self, device: Any, non_blocking: bool = False) -> "ContrastiveBatch":
        move = lambda d: {k: v.to(device, non_blocking=non_blocking) for k, v in d.items()}  # noqa: E731
        return ContrastiveBatch(move(self.queries), move(self.documents), self.num_negatives)


class Collator:
    """Adds the recipe's prompts and tokenises; runs in DataLoader workers."""

    def __init__(self, tokenizer, max_seq_length: int, prompts: list[tuple[str, str]] | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.prompts = prompts or [("", "")]
        """(query prompt, document prompt) for each training source."""

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, texts, self.max_seq_length)

    def __call__(self, examples: list[Example]) -> ContrastiveBatch:
        num_negatives = len(examples[0].negatives)
        queries = [self.prompts[e.source][0] + e.query for e in examples]
        documents = [self.prompts[e.source][1] + e.positive for e in examples]
        documents += [self.prompts[e.source][1] + n for e in examples for n in e.negatives]
        return ContrastiveBatch(self.tokenize(queries), self.tokenize(documents), num_negatives)
