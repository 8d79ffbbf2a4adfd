"""Batches of tokenised queries and documents with their extras, the input of a training step."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from trainer.data.examples import Example
from trainer.data.training_set import text_key

Features = dict[str, torch.Tensor]


def tokenize(tokenizer, texts: list[str], max_seq_length: int) -> Features:
    """Padded to the longest text, truncated to max_seq_length: the one tokenisation for training and inference."""
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_seq_length, return_tensors="pt"))


PROMPT_LENGTH = "prompt_length"
"""Features key: (B,) tokens of each row's prompt, to leave out of pooling (`model.pool_prompt: false`)."""


def prompt_token_count(tokenizer, prompt: str) -> int:
    """Tokens a prompt takes at the start of a text, as sentence-transformers counts them: the
    prompt tokenised alone (with a leading special token such as [CLS]), less a trailing special
    token ([SEP], EOS)."""
    if not prompt:
        return 0
    ids = tokenizer(prompt)["input_ids"]
    return len(ids) - (1 if ids and ids[-1] in tokenizer.all_special_ids else 0)


@dataclass
class TextTokenizer:
    """How one encoder tokenises: its tokenizer, length and (query, document) prompt per source."""

    tokenizer: Any
    max_seq_length: int
    prompts: list[tuple[str, str]]
    """(query prompt, document prompt) for each training source (one pair for all sources when
    the list has one entry)."""
    pool_prompt: bool = True
    """False: the features carry each row's prompt length (PROMPT_LENGTH), left out of pooling."""

    def prompt(self, source: int, is_query: bool) -> str:
        pair = self.prompts[source] if len(self.prompts) > 1 else self.prompts[0]
        return pair[0] if is_query else pair[1]

    def texts(self, examples: list[Example]) -> tuple[list[str], list[str] | None]:
        """The queries and the documents (None for single texts) with their prompts."""
        queries = [self.prompt(e.source, True) + e.query for e in examples]
        if examples[0].positive is None:  # single texts
            return queries, None
        documents = [self.prompt(e.source, False) + e.positive for e in examples]
        documents += [self.prompt(e.source, False) + n for e in examples for n in e.negatives]
        return queries, documents

    def __call__(self, examples: list[Example]) -> tuple[Features, Features | None]:
        queries, documents = self.texts(examples)
        query_features = tokenize(self.tokenizer, queries, self.max_seq_length)
        document_features = None if documents is None else tokenize(self.tokenizer, documents, self.max_seq_length)
        if not self.pool_prompt:
            query_features[PROMPT_LENGTH] = self.prompt_lengths([e.source for e in examples], True)
            if document_features is not None:
                sources = [e.source for e in examples] + [e.source for e in examples for _ in e.negatives]
                document_features[PROMPT_LENGTH] = self.prompt_lengths(sources, False)
        return query_features, document_features

    def prompt_lengths(self, sources: list[int], is_query: bool) -> torch.Tensor:
        counts = {s: prompt_token_count(self.tokenizer, self.prompt(s, is_query)) for s in set(sources)}
        return torch.tensor([counts[s] for s in sources], dtype=torch.int64)

    def with_ids(self, examples: list[Example]) -> "FrozenBatch":
        """Tokenised, with the `text_key` of every text as this encoder sees it (prompt included)."""
        queries, documents = self.texts(examples)
        query_features, document_features = self(examples)
        return FrozenBatch(query_features, document_features, text_ids(queries), None if documents is None else text_ids(documents))


def text_ids(texts: list[str]) -> torch.Tensor:
    return torch.tensor([text_key(t) for t in texts], dtype=torch.int64)


@dataclass
class FrozenBatch:
    """A batch's texts tokenised for one frozen encoder, with ids of the texts it sees; for a
    cross-encoder, which tokenises (query, document) pairs in the step, the texts themselves."""

    queries: Features | None
    documents: Features | None
    query_ids: torch.Tensor
    """(B,) `text_key` of each query with the encoder's prompt: its key in the embedding cache."""
    document_ids: torch.Tensor | None
    """(B*(1+N),) the same for the documents."""
    query_texts: list[str] | None = None
    """The queries, for a cross-encoder."""
    document_texts: list[str] | None = None
    """The documents (positives, then hard negatives), for a cross-encoder."""


@dataclass
class PairTexts:
    """What a cross-encoder needs from a batch: its texts (it reads pairs, tokenised in the step)."""

    def with_ids(self, examples: list[Example]) -> FrozenBatch:
        queries = [e.query for e in examples]
        if examples[0].positive is None:
            return FrozenBatch(None, None, text_ids(queries), None, queries, None)
        documents = [e.positive for e in examples] + [n for e in examples for n in e.negatives]
        return FrozenBatch(None, None, text_ids(queries), text_ids(documents), queries, documents)


@dataclass
class ContrastiveBatch:
    """`documents` holds the B positives first, then the B*N hard negatives, query-major; the
    id and extra fields are row-aligned with them. A batch of single texts (a `texts` source) has
    them in `queries` and no documents."""

    queries: Features
    documents: Features | None
    num_negatives: int
    query_ids: torch.Tensor
    """(B,) int64 `text_key` of each query (without prompt)."""
    document_ids: torch.Tensor
    """(B*(1+N),) int64 `text_key` of each document, in the order of `documents`."""
    source: torch.Tensor
    """(B,) int64 training source of each row."""
    in_batch: torch.Tensor
    """(B,) bool: the row's source takes in-batch negatives."""
    teacher_scores: torch.Tensor | None = None
    """(B, 1+N) float32 teacher scores, when every row has them."""
    frozen: dict[str, "FrozenBatch"] = field(default_factory=dict)
    """The texts tokenised for each frozen encoder, by its key."""
    progress: float = 0.0
    """Fraction of the run's optimiser steps done before this batch's step (0 at the first), set
    by the training loop; losses whose weighting follows the training schedule read it."""

    @property
    def size(self) -> int:
        return self.queries["input_ids"].shape[0]

    def map_tensors(self, fn) -> "ContrastiveBatch":
        """The batch with `fn` applied to every tensor it holds."""

        def apply(value):
            if isinstance(value, torch.Tensor):
                return fn(value)
            if isinstance(value, dict):
                return {k: apply(v) for k, v in value.items()}
            if isinstance(value, tuple):
                return tuple(apply(v) for v in value)
            if isinstance(value, FrozenBatch):
                return FrozenBatch(*(apply(getattr(value, f.name)) for f in fields(value)))
            return value

        return ContrastiveBatch(**{f.name: apply(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: Any, non_blocking: bool = False) -> "ContrastiveBatch":
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "ContrastiveBatch":
        """Page-locked copies, so that the copy to a GPU can overlap the step (DataLoader's pin_memory)."""
        return self.map_tensors(lambda t: t.pin_memory())


class Collator:
    """Adds the prompts and tokenises, for the model and for each frozen encoder; hashes the texts
    into stable ids. Runs in DataLoader workers."""

    def __init__(
        self,
        tokenizer,
        max_seq_length: int,
        prompts: list[tuple[str, str]] | None = None,
        in_batch: list[bool] | None = None,
        frozen: dict[str, "TextTokenizer | PairTexts"] | None = None,
        pool_prompt: bool = True,
    ) -> None:
        self.model = TextTokenizer(tokenizer, max_seq_length, prompts or [("", "")], pool_prompt)
        self.in_batch = in_batch or [True]
        """Per training source: whether its rows take in-batch negatives."""
        self.frozen = frozen or {}

    def tokenize(self, texts: list[str]) -> Features:
        return tokenize(self.model.tokenizer, texts, self.model.max_seq_length)

    def __call__(self, examples: list[Example]) -> ContrastiveBatch:
        single = [e.positive is None for e in examples]
        if any(single) and not all(single):
            raise ValueError("a batch mixes single texts and pairs; texts sources need data.batching: homogeneous")
        num_negatives = len(examples[0].negatives)
        queries, documents = self.model(examples)
        document_texts = [] if single[0] else [e.positive for e in examples] + [n for e in examples for n in e.negatives]
        scores = None
        if all(e.teacher_scores is not None for e in examples):
            scores = torch.tensor([e.teacher_scores for e in examples], dtype=torch.float32)
        return ContrastiveBatch(
            queries=queries,
            documents=documents,
            num_negatives=num_negatives,
            query_ids=torch.tensor([text_key(e.query) for e in examples], dtype=torch.int64),
            document_ids=torch.tensor([text_key(t) for t in document_texts], dtype=torch.int64),
            source=torch.tensor([e.source for e in examples], dtype=torch.int64),
            in_batch=torch.tensor([self.in_batch[e.source if len(self.in_batch) > 1 else 0] for e in examples]),
            teacher_scores=scores,
            frozen={key: tokenizer.with_ids(examples) for key, tokenizer in self.frozen.items()},
        )
