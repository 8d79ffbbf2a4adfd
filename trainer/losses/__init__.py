"""Losses are pure functions of embeddings; `build_loss` turns the recipe's terms into one."""

from __future__ import annotations

import torch

from trainer.config import InfoNCEConfig, LossConfig
from trainer.losses.infonce import InfoNCE


def _make(config: LossConfig) -> torch.nn.Module:
    if isinstance(config, InfoNCEConfig):
        return InfoNCE(temperature=config.temperature)
    raise TypeError(f"no loss for {config!r}")  # pragma: no cover - the schema only builds known kinds


class WeightedLoss(torch.nn.Module):
    """Sum of weighted terms; `forward` returns the total and each term for logging."""

    def __init__(self, configs: list[LossConfig]) -> None:
        super().__init__()
        self.names = [f"{c.kind}_{i}" if len(configs) > 1 else c.kind for i, c in enumerate(configs)]
        self.weights = [c.weight for c in configs]
        self.terms = torch.nn.ModuleList(_make(c) for c in configs)

    def forward(
        self, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = query.new_zeros((), dtype=torch.float32)
        parts = {}
        for name, weight, term in zip(self.names, self.weights, self.terms):
            value = term(query, positive, negatives)
            parts[name] = value.detach()
            total = total + weight * value
        return total, parts


def build_loss(configs: list[LossConfig]) -> WeightedLoss:
    return WeightedLoss(configs)
