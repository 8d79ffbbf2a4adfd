"""Losses are pure functions of a `LossInput`; `build_loss` turns the recipe's terms into one
module that returns the weighted total and each term for logging.

Importing this package registers every loss kind (one file each) with the recipe schema.
"""

from __future__ import annotations

import torch

from trainer.losses import (  # noqa: F401 - registers the kinds
    adaptive_layers,
    distill_kl,
    embed_distill,
    gor,
    infonce,
    jasper,
    margin_mse,
    matryoshka,
)
from trainer.losses.base import LossConfig, LossContext, LossTerm, merged_candidates, run_terms
from trainer.losses.inputs import Embeddings, LossInput

__all__ = ["Embeddings", "LossConfig", "LossContext", "LossInput", "LossTerm", "WeightedLoss", "build_loss"]


class WeightedLoss(torch.nn.Module):
    """Sum of weighted terms; `forward` returns the total and each term (detached) for logging.
    Its parameters (learnable temperatures, heads) are trained with the model."""

    def __init__(self, configs: list[LossConfig], context: LossContext) -> None:
        super().__init__()
        self.names = [f"{c.kind}_{i}" if len(configs) > 1 else c.kind for i, c in enumerate(configs)]
        self.weights = [c.weight for c in configs]
        self.terms = torch.nn.ModuleList(c.build(context) for c in configs)

    def forward(self, inputs: LossInput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, values = run_terms(list(self.terms), self.weights, inputs)
        return total, {name: v.detach() for name, v in zip(self.names, values) if v is not None}

    def frozen_encoders(self) -> dict[str, object]:
        """Frozen models the terms read (key -> `FrozenModelConfig`), each loaded once."""
        return {k: v for term in self.terms for k, v in term.frozen_encoders().items()}

    @property
    def needs_pairs(self) -> bool:
        """Whether every term needs pairs (then a batch of single texts has nothing to train)."""
        return all(term.needs_pairs for term in self.terms)

    def score_candidates(self) -> dict[str, str]:
        """Frozen cross-encoders and the candidates to score with each (`in_batch` when any term wants them)."""
        return merged_candidates(self.terms)

    def layer_indices(self) -> tuple[int, ...]:
        """Earlier layers whose pooled embeddings the terms read (the step computes them)."""
        return tuple(sorted({i for term in self.terms for i in term.layer_indices()}))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_loss(configs: list[LossConfig], context: LossContext) -> WeightedLoss:
    return WeightedLoss(configs, context)
