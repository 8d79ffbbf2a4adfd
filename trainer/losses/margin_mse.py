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
from trainer.losses.base import LossContext, register_loss
from trainer.losses.infonce import at_least_float32
from trainer.losses.inputs import LossInput
from trainer.losses.teacher import (
    ScoreDistillOptions,
    ScoreDistillTerm,
    candidate_scores,
    excluded_candidates,
    teacher_candidate_scores,
)


@register_loss
@dataclass
class MarginMSEConfig(ScoreDistillOptions):
    """Mean squared error between the student's and the teacher's positive-minus-candidate margins."""

    kind: Literal["margin_mse"]

    def build(self, context: LossContext) -> "MarginMSE":
        return MarginMSE(self)


class MarginMSE(ScoreDistillTerm):
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
