"""Adaptive layers (2D Matryoshka): the inner terms also on embeddings from earlier layers.

The encoder runs once and returns, besides its final embeddings, the embeddings pooled (and
normalised) the same way from the output of earlier transformer layers. The loss is

    last_layer_weight * terms(final)
      + sum over the sampled layers l of
          prior_layers_weight * w(l) / k * terms(layer l)
          + kl_weight * kl_temperature * KL(softmax(final / T) || softmax(layer l / T))

where k is the number of layers sampled this step and w(l) the layer weighting. The KL term pulls
each earlier layer's embedding towards the final one (the final embedding is the detached
teacher; the softmax runs over the embedding's dimensions, the mean over every text of the
batch). Wrap a `matryoshka` term to train for fewer layers and fewer dimensions at once; the model
can then be cut to its first l layers for faster inference.

Inputs: a `LossInput` with `layers` (the step fills it for `layer_indices()`).

Reference: Li et al., "2D Matryoshka Sentence Embeddings", 2024 (arXiv:2402.14776); the same sum
as sentence-transformers' AdaptiveLayerLoss / Matryoshka2dLoss (tests/losses/test_adaptive_layers.py).

Example::

    loss:
      - kind: adaptive_layers
        layers_per_step: 1
        terms:
          - kind: matryoshka
            dims: [384, 256, 128, 64]
            terms:
              - kind: infonce
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from trainer.errors import RunError
from trainer.losses.base import LossConfig, LossContext, LossTerm, merged_candidates, register_loss, run_terms
from trainer.losses.infonce import at_least_float32
from trainer.losses.inputs import LossInput
from trainer.schema import FieldError

LAYER_WEIGHTING = {
    "uniform": lambda layer: 1.0,
    "log": lambda layer: 1.0 / (1.0 + math.log(1 + layer)),
    "linear": lambda layer: 1.0 / (1 + layer),
}
"""w(l) of each `layer_weighting` choice (l = 0: the token embeddings)."""


@register_loss
@dataclass
class AdaptiveLayersConfig(LossConfig):
    """Wraps loss terms and adds them on embeddings pooled from earlier layers."""

    kind: Literal["adaptive_layers"]
    terms: list[LossConfig]
    """The loss terms computed on the final layer and on each sampled earlier layer (any kinds,
    a `matryoshka` term included)."""
    layers: list[int] | None = None
    """Earlier layers to train, as the number of transformer layers applied (1 .. layers-1; 0 is the
    token embeddings); null: every layer from 0 to the last but one."""
    layers_per_step: int | None = 1
    """How many of `layers` to sample each step (the 2D Matryoshka paper uses 1); null: all of them."""
    last_layer_weight: float = 1.0
    """Factor on the terms at the final layer."""
    prior_layers_weight: float = 1.0
    """Factor on the terms at the earlier layers (averaged over the sampled layers)."""
    layer_weighting: Literal["uniform", "log", "linear"] = "uniform"
    """w(l) per earlier layer l: 1 (uniform, as the 2D Matryoshka and Starbucks papers),
    1/(1+ln(1+l)) (log, as the ESE paper) or 1/(1+l) (linear)."""
    kl_weight: float = 1.0
    """Factor on the KL divergence that pulls each earlier layer's embedding towards the final one."""
    kl_temperature: float = 0.3
    """Temperature of the softmax over embedding dimensions in the KL term; 0 turns the KL term off."""

    def __post_init__(self) -> None:
        if not self.terms:
            raise FieldError("terms", "needs at least one loss term")
        for i, term in enumerate(self.terms):
            if isinstance(term, AdaptiveLayersConfig):
                raise FieldError(f"terms.{i}.kind", "an adaptive_layers term cannot hold another adaptive_layers term")
        if self.layers is not None:
            if not self.layers:
                raise FieldError("layers", "needs at least one layer, or null for all of them")
            for i, layer in enumerate(self.layers):
                if layer < 0:
                    raise FieldError(f"layers.{i}", f"must be >= 0, got {layer}")
            if len(set(self.layers)) != len(self.layers):
                raise FieldError("layers", f"lists a layer twice: {self.layers}")
        if self.layers_per_step is not None and self.layers_per_step < 1:
            raise FieldError("layers_per_step", f"must be >= 1 or null, got {self.layers_per_step}")
        for name in ("last_layer_weight", "prior_layers_weight", "kl_weight", "kl_temperature"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be >= 0, got {getattr(self, name)}")

    def build(self, context: LossContext) -> "AdaptiveLayers":
        if context.num_layers is None:
            raise RunError("loss: adaptive_layers needs a backbone whose config gives num_hidden_layers")
        last = context.num_layers
        layers = list(range(last)) if self.layers is None else sorted(self.layers)
        too_deep = [layer for layer in layers if layer >= last]
        if too_deep:
            raise RunError(
                f"loss: adaptive_layers layers {too_deep} are not earlier layers: the model has {last} "
                f"layers, so they go from 0 to {last - 1}"
            )
        return AdaptiveLayers(self, layers, [t.build(context) for t in self.terms])


class AdaptiveLayers(LossTerm):
    def __init__(self, config: AdaptiveLayersConfig, layers: list[int], terms: list[LossTerm]) -> None:
        super().__init__()
        self.layers = layers
        self.per_step = config.layers_per_step
        self.last_weight = config.last_layer_weight
        self.prior_weight = config.prior_layers_weight
        self.layer_weight = LAYER_WEIGHTING[config.layer_weighting]
        self.kl_weight = config.kl_weight
        self.kl_temperature = config.kl_temperature
        self.term_weights = [t.weight for t in config.terms]
        self.terms = torch.nn.ModuleList(terms)
        self.needs_pairs = all(t.needs_pairs for t in terms)

    def frozen_encoders(self) -> dict[str, object]:
        return {k: v for term in self.terms for k, v in term.frozen_encoders().items()}

    def score_candidates(self) -> dict[str, str]:
        return merged_candidates(self.terms)

    def layer_indices(self) -> list[int]:
        inner = {i for term in self.terms for i in term.layer_indices()}
        return sorted(inner | set(self.layers))

    def _terms(self, inputs: LossInput) -> torch.Tensor:
        return run_terms(list(self.terms), self.term_weights, inputs)[0]

    def forward(self, inputs: LossInput) -> torch.Tensor:
        total = self.last_weight * self._terms(inputs)
        chosen = self.layers
        if self.per_step is not None and self.per_step < len(self.layers):  # the global RNG: the same in every process
            chosen = [self.layers[i] for i in sorted(torch.randperm(len(self.layers))[: self.per_step].tolist())]
        if self.kl_temperature > 0:  # the final layer is the teacher: no gradient through it
            final = inputs.embeddings.texts
            teacher = F.softmax(at_least_float32(final.detach()) / self.kl_temperature, dim=-1)
        for layer in chosen:
            at_layer = inputs.at_layer(layer)
            total = total + self.prior_weight * self.layer_weight(layer) / len(chosen) * self._terms(at_layer)
            if self.kl_temperature > 0:
                student = at_least_float32(at_layer.embeddings.texts)
                kl = F.kl_div(F.log_softmax(student / self.kl_temperature, dim=-1), teacher, reduction="batchmean")
                total = total + self.kl_weight * self.kl_temperature * kl
        return total
