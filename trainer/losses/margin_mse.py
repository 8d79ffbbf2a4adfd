"""MarginMSE: the student's score margins between the positive and each other candidate match the
teacher's, in mean squared error.

    loss = mean over (query, candidate c != positive) of
           ((s(q, p) - s(q, c)) - (t(q, p) - t(q, c)))^2

Inputs (`LossInput`): query (B, D), positive (B, D), negatives (B, N, D); the teacher's scores
from the data (`teacher_scores`: candidates `own`, which needs N >= 1 hard negatives) or from a
frozen teacher model (`teacher:`, which can also score the in-batch documents). Student scores
are dot products of its embeddings.

Reference: Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with Cross-Architecture
Knowledge Distillation". Sentence-transformers' MarginMSELoss computes the same value
(tests/trainer/losses/test_distill.py).

Example::

    loss:
      - kind: margin_mse       # teacher_scores from `prep score --cross-encoder ...`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trainer.errors import RunError
from trainer.losses.base import LossConfig, LossContext, LossTerm, register_loss
from trainer.losses.infonce import at_least_float32
from trainer.losses.inputs import LossInput
from trainer.losses.teacher import candidate_scores, excluded_candidates, teacher_candidate_scores
from trainer.model.frozen import FrozenModelConfig, frozen_key
from trainer.schema import FieldError


@register_loss
@dataclass
class MarginMSEConfig(LossConfig):
    """Mean squared error between the student's and the teacher's positive-minus-candidate margins."""

    kind: Literal["margin_mse"]
    teacher: FrozenModelConfig | None = None
    """A frozen embedding model that scores the candidates online; null: the teacher_scores of the data."""
    candidates: Literal["own", "in_batch"] | None = None
    """own: the row's hard negatives; in_batch: every other document of the batch (needs a teacher
    model). null: in_batch with a teacher model, own with the data's scores."""

    def __post_init__(self) -> None:
        if self.candidates == "in_batch" and self.teacher is None:
            raise FieldError(
                "candidates", "in_batch needs a teacher model (teacher:); the data's scores cover only the row's own documents"
            )
        if self.candidates is None:
            self.candidates = "own" if self.teacher is None else "in_batch"

    def build(self, context: LossContext) -> "MarginMSE":
        return MarginMSE(self)


class MarginMSE(LossTerm):
    def __init__(self, config: MarginMSEConfig) -> None:
        super().__init__()
        self.config = config

    def frozen_encoders(self) -> dict[str, object]:
        return {frozen_key(self.config.teacher): self.config.teacher} if self.config.teacher is not None else {}

    def score_candidates(self) -> dict[str, str]:
        teacher = self.config.teacher
        return {frozen_key(teacher): self.config.candidates} if teacher is not None and teacher.scorer == "cross_encoder" else {}

    def forward(self, inputs: LossInput) -> torch.Tensor:
        config = self.config
        if config.candidates == "own" and inputs.num_negatives == 0:
            raise RunError(
                "loss margin_mse: the batch has no hard negatives to take margins against; give the source a "
                "negatives_column (prep mine) or score in-batch documents with a teacher model (candidates: in_batch)"
            )
        student = at_least_float32(candidate_scores(inputs.embeddings, config.candidates))
        teacher = at_least_float32(teacher_candidate_scores(inputs, config.teacher, config.candidates, config.kind)).to(student.dtype)
        size = student.shape[0]
        rows = torch.arange(size, device=student.device)
        positive = rows if config.candidates == "in_batch" else torch.zeros_like(rows)
        student_margin = student[rows, positive][:, None] - student  # (B, C)
        teacher_margin = teacher[rows, positive][:, None] - teacher
        keep = torch.ones_like(student_margin, dtype=torch.bool)
        keep[rows, positive] = False  # the positive against itself
        excluded = excluded_candidates(inputs, config.candidates)
        if excluded is not None:
            keep &= ~excluded
        return ((student_margin - teacher_margin) ** 2)[keep].mean()
