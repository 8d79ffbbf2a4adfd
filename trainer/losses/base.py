"""The loss seam: a term's config (a `kind:` dataclass, registered here) builds the term, a
module whose `forward(LossInput)` returns a scalar.

A loss kind is one file in `trainer/losses/`: its config dataclass, decorated with
`@register_loss`, with a docstring under each field and a `build(context)` method, and the module
it builds. The recipe schema reads `loss:` entries through this registry, so a new kind needs no
change anywhere else. Terms may hold parameters (a learnable temperature, a projection head):
they are trained, synchronised across processes and checkpointed with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from trainer.losses.inputs import LossInput
from trainer.schema import kind_of


@dataclass
class LossContext:
    """What building a term may need to know about the model being trained."""

    dim: int
    """The encoder's embedding dimension."""
    normalized: bool
    """Whether the encoder's embeddings are unit vectors (model.normalize)."""
    num_layers: int | None = None
    """Transformer layers of the backbone, when it says."""
    widths: tuple[int, ...] | None = None
    """The widths the term's embeddings may have, when a wrapper cuts them (Matryoshka's dims);
    None: `dim` only."""
    frozen_dim: Callable[[object], int] | None = None
    """The embedding dimension of a frozen model (a `FrozenModelConfig`), for terms that size a
    projection to a teacher; it loads the model once, and the step reuses it."""


class LossTerm(torch.nn.Module):
    """A loss: `forward(inputs)` -> scalar tensor."""

    needs_pairs: ClassVar[bool] = True
    """Whether the term needs (query, positive) pairs. Terms that do not (embedding distillation)
    also train on batches of single texts (a `texts` source); the others sit those batches out."""

    def forward(self, inputs: LossInput) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def frozen_encoders(self) -> dict[str, object]:
        """Frozen models (name -> `FrozenModelConfig`) whose embeddings this term reads from
        `inputs.frozen`; the step computes them."""
        return {}

    def layer_indices(self) -> list[int]:
        """Earlier transformer layers whose pooled embeddings this term reads (2D Matryoshka)."""
        return []

    def score_candidates(self) -> dict[str, str]:
        """Frozen cross-encoders this term reads scores from (key -> `own` or `in_batch`): the step
        scores those candidates with them."""
        return {}


@dataclass(kw_only=True)
class LossConfig:
    """Options every loss term has; the `kind` field of a subclass picks it."""

    registry: ClassVar[dict[str, type["LossConfig"]]] = {}
    weight: float = 1.0
    """Factor on this term in the total loss."""

    def build(self, context: LossContext) -> LossTerm:  # pragma: no cover - abstract
        raise NotImplementedError


def register_loss(cls: type[LossConfig]) -> type[LossConfig]:
    """Class decorator: makes `cls` a `loss:` kind of the recipe."""
    kind = kind_of(cls)
    if kind in LossConfig.registry:
        raise ValueError(f"loss kind {kind!r} is registered twice")
    LossConfig.registry[kind] = cls
    return cls


def run_terms(terms: list[LossTerm], weights: list[float], inputs: LossInput) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """sum(weight x term(inputs)) and each term's value (None for a term that needs pairs, on a
    batch of single texts: it sits the batch out, its parameters kept in the graph with a zero)."""
    total = inputs.query.new_zeros((), dtype=torch.float32)
    values: list[torch.Tensor | None] = []
    for weight, term in zip(weights, terms):
        if term.needs_pairs and not inputs.has_pairs:
            total = total + sum((p.sum() * 0 for p in term.parameters()), torch.zeros((), device=inputs.query.device))
            values.append(None)
            continue
        value = term(inputs)
        values.append(value)
        total = total + weight * value
    return total, values


def merged_candidates(terms) -> dict[str, str]:
    """The terms' `score_candidates`, merged: `in_batch` (a superset) wins over `own`."""
    wanted: dict[str, str] = {}
    for term in terms:
        for key, candidates in term.score_candidates().items():
            wanted[key] = "in_batch" if "in_batch" in (candidates, wanted.get(key)) else candidates
    return wanted
