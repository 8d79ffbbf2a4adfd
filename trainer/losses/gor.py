"""Global orthogonal regularisation: a spread-out term that pushes unrelated embeddings apart.

For each column of the batch (the queries, the positives, each column of hard negatives), with
S the similarities between different rows of that column:
    mean term      M1^2          M1 = mean of S
    second moment  max(0, M2 - 1/D)   M2 = mean of S^2, D the embedding dimension
Both are averaged (or summed) over the columns and weighted. Random unit vectors in D
dimensions have M1 ~ 0 and M2 ~ 1/D; the term pulls the embedding space towards that spread.

Inputs: a `LossInput` (embeddings only; batches of single texts too). Use it next to a
contrastive term.

References: Zhang et al., "Learning Spread-out Local Feature Descriptors", ICCV 2017;
EmbeddingGemma (Schechter Vera et al. 2025) uses the second-moment term summed over columns.
The same values as sentence-transformers' GlobalOrthogonalRegularizationLoss (tests/losses/test_gor.py).

Example::

    loss:
      - kind: infonce
      - kind: gor
        weight: 0.1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trainer.losses.base import LossConfig, LossContext, LossTerm, register_loss
from trainer.losses.infonce import at_least_float32
from trainer.losses.inputs import LossInput
from trainer.schema import FieldError


@register_loss
@dataclass
class GORConfig(LossConfig):
    """Global orthogonal regularisation (spread-out term) over each column of the batch."""

    kind: Literal["gor"]
    mean_weight: float = 1.0
    """Factor on the squared mean similarity (0: off)."""
    second_moment_weight: float = 1.0
    """Factor on max(0, mean squared similarity - 1/dim) (0: off)."""
    aggregation: Literal["mean", "sum"] = "mean"
    """How the columns' values combine (EmbeddingGemma: sum)."""

    def __post_init__(self) -> None:
        if self.mean_weight < 0 or self.second_moment_weight < 0:
            raise FieldError("mean_weight", "mean_weight and second_moment_weight must be >= 0")
        if self.mean_weight == 0 and self.second_moment_weight == 0:
            raise FieldError("mean_weight", "mean_weight and second_moment_weight are both 0: the term does nothing")

    def build(self, context: LossContext) -> "GlobalOrthogonalRegularization":
        return GlobalOrthogonalRegularization(self)


class GlobalOrthogonalRegularization(LossTerm):
    needs_pairs = False

    def __init__(self, config: GORConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, inputs: LossInput) -> torch.Tensor:
        columns = [t for t in (inputs.query, inputs.positive) if t is not None]
        if inputs.negatives is not None:
            columns += list(inputs.negatives.unbind(dim=1))
        means, second_moments = zip(*(spread(at_least_float32(c)) for c in columns))
        combine = torch.sum if self.config.aggregation == "sum" else torch.mean
        return self.config.mean_weight * combine(torch.stack(means)) + self.config.second_moment_weight * combine(
            torch.stack(second_moments)
        )


def spread(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M1^2, max(0, M2 - 1/D)) over the off-diagonal similarities of (B, D) embeddings."""
    size, dim = embeddings.shape
    similarity = embeddings @ embeddings.T
    similarity = similarity * (1 - torch.eye(size, device=embeddings.device, dtype=similarity.dtype))
    pairs = max(size * (size - 1), 1)
    return (similarity.sum() / pairs) ** 2, torch.relu(similarity.pow(2).sum() / pairs - 1.0 / dim)
