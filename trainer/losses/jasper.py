"""Jasper/Stella's three distillation losses, over the embeddings of every text of the batch.

With s_i the student's embedding of text i (normalised), P a learned projection to the teacher's
dimension (when they differ) and t_i the teacher's embedding (normalised):
    cosine      mean over texts of 1 - normalise(P s_i) . t_i
    similarity  mean over (i, j) of (s_i . s_j - t_i . t_j)^2       the in-batch similarity matrices
    relative    mean over (i, j, k), j != i != k, with t_i . t_j > t_i . t_k of
                max(0, margin - (s_i . s_j - s_i . s_k))             the teacher's ranking, per row
    loss = cosine_weight x cosine + similarity_weight x similarity + relative_weight x relative

The similarity and relative terms compare (T, T) similarity matrices, which have the same shape
whatever the widths, so they are computed on the student's own embeddings: the vectors the
exported model serves, at every Matryoshka cut (as the paper's dimension-reduction stage trains
its reduced vectors with these two losses alone). Only the cosine term goes through P.

The relative term compares the candidates of each text's row of the similarity matrix (which of
two texts is closer to text i), so its cost grows with T^3 for T texts in the batch. Works on
pairs and on batches of single texts (a `texts` source).

Inputs (`LossInput`): every embedding of the batch (`Embeddings.texts`) and a frozen teacher's
embeddings of the same texts (`teacher:`, required).

Reference: Zhang et al. 2024, "Jasper and Stella: distillation of SOTA embedding models"
(weights 10, 200, 20 and margin 0.015 are theirs).

Example::

    loss:
      - kind: jasper
        teacher: {name_or_path: dunzhang/stella_en_1.5B_v5}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from trainer.losses.base import LossConfig, LossContext, register_loss
from trainer.losses.infonce import at_least_float32
from trainer.losses.inputs import LossInput
from trainer.losses.teacher import EmbeddingDistillTerm, projection
from trainer.model.frozen import FrozenModelConfig, embedding_teacher
from trainer.schema import FieldError


@register_loss
@dataclass
class JasperConfig(LossConfig):
    """Jasper/Stella's cosine, similarity-matrix and relative-similarity distillation losses."""

    kind: Literal["jasper"]
    teacher: FrozenModelConfig
    """The frozen embedding model to distill."""
    cosine_weight: float = 10.0
    """Factor on the cosine loss (0: off)."""
    similarity_weight: float = 200.0
    """Factor on the similarity-matrix loss (0: off)."""
    relative_weight: float = 20.0
    """Factor on the relative-similarity (ranking) loss (0: off)."""
    margin: float = 0.015
    """Margin of the relative-similarity loss."""
    projection: bool | None = None
    """Learn a linear map from the student's embeddings to the teacher's space for the cosine loss
    (the other two compare similarity matrices and need none): null: only when the dimensions
    differ; true: always; false: never. No map is made when cosine_weight is 0."""

    def __post_init__(self) -> None:
        embedding_teacher("teacher", self.teacher)
        weights = (self.cosine_weight, self.similarity_weight, self.relative_weight)
        if min(weights) < 0:
            raise FieldError("cosine_weight", "cosine_weight, similarity_weight and relative_weight must be >= 0")
        if max(weights) == 0:
            raise FieldError("cosine_weight", "cosine_weight, similarity_weight and relative_weight are all 0")
        if self.margin < 0:
            raise FieldError("margin", f"must be >= 0, got {self.margin}")
        if self.projection and not self.cosine_weight:
            raise FieldError("projection", "only the cosine loss uses the projection, and cosine_weight is 0")

    def build(self, context: LossContext) -> "Jasper":
        return Jasper(self, projection(context, self.teacher, self.projection) if self.cosine_weight else None)


class Jasper(EmbeddingDistillTerm):
    def forward(self, inputs: LossInput) -> torch.Tensor:
        config = self.config
        projected, teacher = self.student_and_teacher(inputs)
        teacher = F.normalize(teacher, dim=-1)
        total = teacher.new_zeros(())
        if config.cosine_weight:
            total = total + config.cosine_weight * (1 - (F.normalize(projected, dim=-1) * teacher).sum(-1)).mean()
        student = F.normalize(at_least_float32(inputs.embeddings.texts), dim=-1)  # (T, D_student)
        student_sim, teacher_sim = student @ student.T, teacher @ teacher.T  # (T, T) each
        if config.similarity_weight:
            total = total + config.similarity_weight * F.mse_loss(student_sim, teacher_sim)
        if config.relative_weight:
            total = total + config.relative_weight * relative_similarity(student_sim, teacher_sim, config.margin)
        return total


def relative_similarity(student_sim: torch.Tensor, teacher_sim: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean hinge over the (i, j, k) the teacher orders t_ij > t_ik, j and k other than i."""
    size = student_sim.shape[0]
    other = ~torch.eye(size, dtype=torch.bool, device=student_sim.device)
    ordered = (teacher_sim[:, :, None] > teacher_sim[:, None, :]) & other[:, :, None] & other[:, None, :]
    hinge = torch.relu(margin - (student_sim[:, :, None] - student_sim[:, None, :]))
    count = ordered.sum()
    return (hinge * ordered).sum() / count.clamp(min=1)
