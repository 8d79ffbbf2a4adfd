"""Matryoshka representation learning: the inner terms summed over truncated prefixes.

The encoder runs once; each term is computed again on the first `dim` dimensions of every
embedding (re-normalised when the model normalises), for each of `dims`, and the weighted sum is
the loss. The model then embeds well at every listed size, so its vectors can be cut after
training (`embtrain export --dim 64`) with little loss of quality.

Inputs: a `LossInput` (any fields the inner terms read). Frozen (guide) embeddings are not cut.

Reference: Kusupati et al., "Matryoshka Representation Learning", NeurIPS 2022. The same sum as
sentence-transformers' MatryoshkaLoss (tests/losses/test_matryoshka.py).

Example::

    loss:
      - kind: matryoshka
        dims: [384, 256, 128, 64, 32]
        terms:
          - kind: infonce
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import Literal

import torch

from trainer.errors import RunError
from trainer.losses.base import LossConfig, LossContext, LossTerm, merged_candidates, register_loss, run_terms
from trainer.losses.inputs import LossInput
from trainer.schema import FieldError


@register_loss
@dataclass
class MatryoshkaConfig(LossConfig):
    """Wraps loss terms and sums them over truncated embedding prefixes."""

    kind: Literal["matryoshka"]
    dims: list[int]
    """Prefix sizes, e.g. [384, 256, 128, 64, 32]; each at most the model's dimension. Include
    the full dimension to keep the full embedding as good as without Matryoshka."""
    terms: list[LossConfig]
    """The loss terms computed at each size (any kinds, each with its own weight)."""
    weights: list[float] | None = None
    """Factor per entry of `dims`; null: 1 for each."""
    dims_per_step: int | None = None
    """Use a random subset of this many sizes each step (cheaper); null: all of them."""

    def __post_init__(self) -> None:
        if not self.dims:
            raise FieldError("dims", "needs at least one size")
        for i, dim in enumerate(self.dims):
            if dim < 1:
                raise FieldError(f"dims.{i}", f"must be >= 1, got {dim}")
        if len(set(self.dims)) != len(self.dims):
            raise FieldError("dims", f"lists a size twice: {self.dims}")
        if self.weights is not None:
            if len(self.weights) != len(self.dims):
                raise FieldError("weights", f"needs one weight per entry of dims ({len(self.dims)}), got {len(self.weights)}")
            for i, weight in enumerate(self.weights):
                if weight <= 0:
                    raise FieldError(f"weights.{i}", f"must be > 0, got {weight}")
        if self.dims_per_step is not None and not 1 <= self.dims_per_step <= len(self.dims):
            raise FieldError("dims_per_step", f"must be between 1 and {len(self.dims)} or null, got {self.dims_per_step}")
        if not self.terms:
            raise FieldError("terms", "needs at least one loss term")
        for i, term in enumerate(self.terms):
            if isinstance(term, MatryoshkaConfig):
                raise FieldError(f"terms.{i}.kind", "a matryoshka term cannot hold another matryoshka term")

    def build(self, context: LossContext) -> "Matryoshka":
        too_large = [d for d in self.dims if d > context.dim]
        if too_large:
            raise RunError(f"loss: matryoshka dims {too_large} are larger than the model's {context.dim} dimensions")
        inner = dataclasses.replace(context, widths=tuple(sorted(set(self.dims))))
        return Matryoshka(self, [t.build(inner) for t in self.terms])


class Matryoshka(LossTerm):
    def __init__(self, config: MatryoshkaConfig, terms: list[LossTerm]) -> None:
        super().__init__()
        self.dims = list(config.dims)
        self.dim_weights = list(config.weights) if config.weights is not None else [1.0] * len(self.dims)
        self.dims_per_step = config.dims_per_step
        self.term_weights = [t.weight for t in config.terms]
        self.terms = torch.nn.ModuleList(terms)
        self.needs_pairs = all(t.needs_pairs for t in terms)

    def frozen_encoders(self) -> dict[str, object]:
        return {k: v for term in self.terms for k, v in term.frozen_encoders().items()}

    def score_candidates(self) -> dict[str, str]:
        return merged_candidates(self.terms)

    def layer_indices(self) -> list[int]:
        return sorted({i for term in self.terms for i in term.layer_indices()})

    def forward(self, inputs: LossInput) -> torch.Tensor:
        chosen = range(len(self.dims))
        if self.dims_per_step is not None:  # the global RNG: every process draws the same subset
            chosen = sorted(torch.randperm(len(self.dims))[: self.dims_per_step].tolist())
        total = inputs.query.new_zeros((), dtype=torch.float32)
        for index in chosen:
            dim = self.dims[index]
            truncated = inputs if dim == inputs.query.shape[-1] else inputs.truncated(dim)
            total = total + self.dim_weights[index] * run_terms(list(self.terms), self.term_weights, truncated)[0]
        return total
