"""Score distillation with KL divergence: the student's distribution over each query's candidates
is pulled towards the teacher's.

    p_teacher = softmax(teacher scores / teacher_temperature)
    p_student = softmax(student scores / temperature)
    loss      = mean over queries of KL(p_teacher || p_student)

Inputs (`LossInput`): query (B, D), positive (B, D), negatives (B, N, D); the teacher's scores,
either from the data (`teacher_scores`, the positive's then each hard negative's: candidates
`own`) or from a frozen teacher model embedding the same texts (`teacher:`), which can also score
every in-batch document (candidates `in_batch`). Student scores are dot products of its
embeddings (cosine when model.normalize).

References: Hinton et al. 2015; Lin et al. 2021 (TCT-ColBERT, in-batch KD); Rosa et al. 2022.
Sentence-transformers' DistillKLDivLoss computes the same value times student_temperature²
(tests/trainer/losses/test_distill.py); here the term's `weight` scales it instead.

Example::

    loss:
      - kind: distill_kl           # scores from `prep score` in the data
        temperature: 0.05
        teacher_temperature: 1.0   # cross-encoder logits
      - kind: distill_kl           # an online teacher over every document of the batch
        teacher: {name_or_path: BAAI/bge-base-en-v1.5}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

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
from trainer.schema import FieldError


@register_loss
@dataclass
class DistillKLConfig(ScoreDistillOptions):
    """KL divergence between the teacher's and the student's softmax over each query's candidates."""

    kind: Literal["distill_kl"]
    temperature: float = 0.05
    """The student's scores are divided by this."""
    teacher_temperature: float | None = None
    """The teacher's scores are divided by this; null: `temperature`. Match it to the teacher's
    scale: about 1 for cross-encoder logits, like `temperature` for cosine scores."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("temperature", "teacher_temperature"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise FieldError(name, f"must be > 0, got {value}")

    def build(self, context: LossContext) -> "DistillKL":
        return DistillKL(self)


class DistillKL(ScoreDistillTerm):
    def forward(self, inputs: LossInput) -> torch.Tensor:
        config = self.config
        student = at_least_float32(candidate_scores(inputs.embeddings, config.candidates)) / config.temperature
        teacher = at_least_float32(teacher_candidate_scores(inputs, config.teacher, config.candidates, config.kind))
        teacher = teacher.to(student.dtype) / (config.teacher_temperature or config.temperature)
        excluded = excluded_candidates(inputs, config.candidates)
        if excluded is not None:
            student, teacher = student.masked_fill(excluded, -math.inf), teacher.masked_fill(excluded, -math.inf)
        return kl_divergence(teacher, student)


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student)); -inf logits are left out."""
    teacher_log_p = F.log_softmax(teacher_logits, dim=-1)
    student_log_p = F.log_softmax(student_logits, dim=-1)
    terms = teacher_log_p.exp() * (teacher_log_p - student_log_p)
    terms = torch.where(torch.isfinite(teacher_logits), terms, torch.zeros_like(terms))
    return terms.sum(-1).mean()
