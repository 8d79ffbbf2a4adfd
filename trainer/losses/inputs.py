"""What every loss term receives: the batch's embeddings and its extras, row-aligned.

    query      (B, D)     positive (B, D)     negatives (B, N, D) or None
    query_ids  (B,)       positive_ids (B,)   negative_ids (B, N) or None   stable text ids
    source     (B,)       in_batch (B,)       teacher_scores (B, 1+N) or None     progress   fraction of training done
    frozen     {name: Embeddings}   the same texts embedded by frozen encoders (a guide model)
    frozen_scores {name|candidates: (B, C)}  a frozen cross-encoder's scores of the candidates
    layers     {layer: Embeddings}  the model's embeddings pooled from earlier layers (2D Matryoshka)

A batch of a `texts` source (embedding distillation) has no documents: `positive` and
`positive_ids` are None and `query` holds its texts; `has_pairs` tells the two apart, and `texts`
is every text of the batch, whichever it is.

Text ids are `text_key` hashes of the raw texts (without prompts): equal ids mean equal texts,
in every process. After `gather()` every field holds the rows of all processes, rank-major, so a
loss sees the global batch; embeddings that carry a gradient keep it through the gather.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from trainer.losses.distributed import gather_no_grad, gather_with_grad, world_size

Tensor = torch.Tensor


@dataclass
class Embeddings:
    """Embeddings of one batch's texts: queries (B, D), positives (B, D) or None (a batch of
    single texts), negatives (B, N, D) or None."""

    query: Tensor
    positive: Tensor | None
    negatives: Tensor | None = None

    @property
    def documents(self) -> Tensor:
        """Positives, then every hard negative, query-major: (B*(1+N), D)."""
        if self.positive is None:
            raise ValueError("a batch of single texts has no documents")
        if self.negatives is None or self.negatives.shape[1] == 0:
            return self.positive
        return torch.cat([self.positive, self.negatives.reshape(-1, self.negatives.shape[-1])])

    @property
    def texts(self) -> Tensor:
        """Every text of the batch: the queries, then the documents when there are any: (T, D)."""
        return self.query if self.positive is None else torch.cat([self.query, self.documents])

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Embeddings":
        return Embeddings(*(None if t is None else fn(t) for t in (self.query, self.positive, self.negatives)))

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.query, self.positive, self.negatives) if t is not None]


@dataclass
class LossInput:
    query: Tensor
    """(B, D) query embeddings."""
    positive: Tensor | None
    """(B, D) positive document embeddings; row i belongs to query i. None in a batch of single
    texts (`query` then holds them)."""
    negatives: Tensor | None
    """(B, N, D) hard negatives of each query, or None."""
    query_ids: Tensor
    """(B,) int64 stable id of each query text."""
    positive_ids: Tensor | None
    """(B,) int64 stable id of each positive text; None without positives."""
    negative_ids: Tensor | None
    """(B, N) int64 stable id of each hard negative, or None."""
    source: Tensor
    """(B,) int64 index of the training source (data.train) of each row."""
    in_batch: Tensor
    """(B,) bool: whether the row's source lets other rows' documents serve as its negatives."""
    teacher_scores: Tensor | None = None
    """(B, 1+N) float32 teacher scores of the positive then each hard negative, when the data has them."""
    frozen: dict[str, Embeddings] = field(default_factory=dict)
    """The same texts embedded by frozen encoders (no gradient), by name."""
    frozen_scores: dict[str, Tensor] = field(default_factory=dict)
    """A frozen cross-encoder's scores of each query's candidates, by `frozen_key|own` ((B, 1+N):
    its positive, then its hard negatives) or `frozen_key|in_batch` ((B, B*(1+N)): every document)."""
    layers: dict[int, Embeddings] = field(default_factory=dict)
    """The model's embeddings pooled from the output of its first `layer` transformer layers (0: the
    token embeddings), for the layers the terms ask for (`LossTerm.layer_indices`); they carry a
    gradient like the final ones."""
    normalized: bool = True
    """Whether the embeddings are unit vectors (model.normalize): truncation re-normalises them."""
    progress: float = 0.0
    """Fraction of the run's optimiser steps done before this step, in [0, 1): what a weighting that
    changes over training (InfoNCE's `focal_gamma_end`) follows."""

    @classmethod
    def of(cls, query: Tensor, positive: Tensor | None, negatives: Tensor | None = None, **extras) -> "LossInput":
        """Embeddings with a distinct id for every text, one source, in-batch negatives on; `extras`
        set other fields. For tests and for calling a loss by hand."""
        size, device = query.shape[0], query.device
        count = 0 if negatives is None else negatives.shape[1]
        fields = {
            "query_ids": torch.arange(size, device=device),
            "positive_ids": None if positive is None else size + torch.arange(size, device=device),
            "negative_ids": None if negatives is None else 2 * size + torch.arange(size * count, device=device).reshape(size, count),
            "source": torch.zeros(size, dtype=torch.int64, device=device),
            "in_batch": torch.ones(size, dtype=torch.bool, device=device),
        }
        return cls(query=query, positive=positive, negatives=negatives, **{**fields, **extras})

    @property
    def embeddings(self) -> Embeddings:
        return Embeddings(self.query, self.positive, self.negatives)

    @property
    def has_pairs(self) -> bool:
        """Whether the rows are (query, positive, ...) pairs, not single texts."""
        return self.positive is not None

    @property
    def text_ids(self) -> Tensor:
        """(T,) ids in the order of `Embeddings.texts`."""
        return self.query_ids if self.positive is None else torch.cat([self.query_ids, self.document_ids])

    @property
    def num_negatives(self) -> int:
        return 0 if self.negatives is None else self.negatives.shape[1]

    @property
    def document_ids(self) -> Tensor:
        """(B*(1+N),) ids in the order of `Embeddings.documents`."""
        if self.negative_ids is None or self.negative_ids.shape[1] == 0:
            return self.positive_ids
        return torch.cat([self.positive_ids, self.negative_ids.reshape(-1)])

    def with_embeddings(self, embeddings: Embeddings) -> "LossInput":
        return dataclasses.replace(
            self, query=embeddings.query, positive=embeddings.positive, negatives=embeddings.negatives
        )

    def at_layer(self, layer: int) -> "LossInput":
        """The embeddings pooled from `layer` in place of the final ones (which a term then sees)."""
        return dataclasses.replace(self.with_embeddings(self.layers[layer]), layers={})

    def model_embeddings(self) -> list[Embeddings]:
        """The model's own embeddings: the final ones, then each entry of `layers` by layer."""
        return [self.embeddings] + [self.layers[k] for k in sorted(self.layers)]

    def with_model_embeddings(self, embeddings: list[Embeddings]) -> "LossInput":
        """The inverse of `model_embeddings`."""
        layers = dict(zip(sorted(self.layers), embeddings[1:]))
        return dataclasses.replace(self.with_embeddings(embeddings[0]), layers=layers)

    def truncated(self, dim: int) -> "LossInput":
        """The first `dim` dimensions of the model's embeddings, earlier layers' included
        (re-normalised when they were unit vectors); frozen encoders' embeddings are left whole."""
        cut = lambda t: F.normalize(t[..., :dim], dim=-1) if self.normalized else t[..., :dim]  # noqa: E731
        return self.with_model_embeddings([e.map(cut) for e in self.model_embeddings()])

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> "LossInput":
        """`fn` applied to every tensor field, frozen embeddings included."""
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = fn(value)
            elif f.name in ("frozen", "layers"):
                changes[f.name] = {name: e.map(fn) for name, e in value.items()}
            elif f.name == "frozen_scores":
                changes[f.name] = {name: fn(t) for name, t in value.items()}
        return dataclasses.replace(self, **changes)

    def gather(self) -> "LossInput":
        """Every field from every process, rank-major; embeddings with a gradient keep it."""
        if world_size() == 1:
            return self
        return self.map_tensors(lambda t: gather_with_grad(t) if t.requires_grad else gather_no_grad(t))
