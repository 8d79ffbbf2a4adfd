"""Losses are pure functions of a `LossInput`; `build_loss` turns the recipe's terms into one
module that returns the weighted total and each term for logging.

Importing this package registers every loss kind (one file each) with the recipe schema.
"""

from __future__ import annotations

import torch

from trainer.losses import adaptive_layers, gor, infonce, matryoshka  # noqa: F401 - registers the kinds
from trainer.losses.base import LossConfig, LossContext, LossTerm
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
        total = inputs.query.new_zeros((), dtype=torch.float32)
        parts = {}
        for name, weight, term in zip(self.names, self.weights, self.terms):
            value = term(inputs)
            parts[name] = value.detach()
            total = total + weight * value
        return total, parts

    def frozen_encoders(self) -> dict[str, object]:
        """Frozen models the terms read (key -> `FrozenModelConfig`), each loaded once."""
        return {k: v for term in self.terms for k, v in term.frozen_encoders().items()}

    def layer_indices(self) -> tuple[int, ...]:
        """Earlier layers whose pooled embeddings the terms read (the step computes them)."""
        return tuple(sorted({i for term in self.terms for i in term.layer_indices()}))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_loss(configs: list[LossConfig], context: LossContext) -> WeightedLoss:
    return WeightedLoss(configs, context)
