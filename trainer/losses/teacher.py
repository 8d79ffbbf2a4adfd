"""What the distillation terms share: where the teacher's scores and embeddings come from, the
candidates a query is scored against, and the projection from the student's space to the teacher's.

Teachers:
- offline: the scores in the data (`teacher_scores`, written by `embtrain prep score` or
  `prep mine`), one per candidate of the row: its positive, then each hard negative;
- online: a frozen embedding model (`teacher:` in the term), which embeds the batch's texts inside
  the step without gradient, in its own precision and with its own tokenizer and prompts; its
  scores are dot products of its embeddings, so it scores any candidate, in-batch ones included;
- online: a frozen cross-encoder (`teacher: {scorer: cross_encoder}`), which reads each (query,
  candidate) pair inside the step (`inputs.frozen_scores`).

Candidates of query i:
- `own`: its positive and its hard negatives, (B, 1+N), positive first;
- `in_batch`: every document of the batch, (B, B*(1+N)), ordered as `Embeddings.documents`
  (its positive is column i); rows whose source has `in_batch_negatives: false` see only their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trainer.errors import RunError
from trainer.losses.base import LossConfig, LossContext, LossTerm
from trainer.losses.inputs import Embeddings, LossInput
from trainer.model.frozen import FrozenModelConfig, frozen_key
from trainer.schema import FieldError

Candidates = Literal["own", "in_batch"]


@dataclass(kw_only=True)
class ScoreDistillOptions(LossConfig):
    """Options of the terms that distill a teacher's scores of each query's candidates."""

    teacher: FrozenModelConfig | None = None
    """A frozen model that scores the candidates online (an embedding model, or scorer:
    cross_encoder); null: the teacher_scores of the data (a source's teacher_scores_column)."""
    candidates: Literal["own", "in_batch"] | None = None
    """own: the row's positive and hard negatives; in_batch: every document of the batch (needs a
    teacher model). null: in_batch with a teacher model, own with the data's scores."""

    def __post_init__(self) -> None:
        if self.candidates == "in_batch" and self.teacher is None:
            raise FieldError(
                "candidates", "in_batch needs a teacher model (teacher:); the data's scores cover only the row's own documents"
            )
        if self.candidates is None:
            self.candidates = "own" if self.teacher is None else "in_batch"


class ScoreDistillTerm(LossTerm):
    """A term with `ScoreDistillOptions`: it names its teacher, and the candidates a cross-encoder
    teacher must score."""

    def __init__(self, config: ScoreDistillOptions) -> None:
        super().__init__()
        self.config = config

    def frozen_encoders(self) -> dict[str, object]:
        return {frozen_key(self.config.teacher): self.config.teacher} if self.config.teacher is not None else {}

    def score_candidates(self) -> dict[str, str]:
        teacher = self.config.teacher
        return {frozen_key(teacher): self.config.candidates} if teacher is not None and teacher.scorer == "cross_encoder" else {}


class EmbeddingDistillTerm(LossTerm):
    """A term that compares the student's embeddings of every text of the batch with a frozen
    teacher's (`config.teacher`), through the learned projection where the widths differ."""

    needs_pairs = False

    def __init__(self, config, projection: "Projection | None") -> None:
        super().__init__()
        self.config = config
        self.projection = projection

    def frozen_encoders(self) -> dict[str, object]:
        return {frozen_key(self.config.teacher): self.config.teacher}

    def student_and_teacher(self, inputs: LossInput) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, D_teacher) projected student embeddings in at least float32, and the teacher's (detached)."""
        from trainer.losses.infonce import at_least_float32

        student = at_least_float32(project(self.projection, inputs.embeddings.texts))
        teacher = teacher_embeddings(inputs, self.config.teacher).texts.detach().to(student.dtype)
        return student, teacher


def teacher_embeddings(inputs: LossInput, teacher: FrozenModelConfig) -> Embeddings:
    """The batch's texts as the frozen teacher embeds them."""
    return inputs.frozen[frozen_key(teacher)]


def candidate_scores(embeddings: Embeddings, candidates: Candidates) -> torch.Tensor:
    """Dot products of each query with its candidates: (B, 1+N) for `own`, (B, B*(1+N)) for `in_batch`."""
    if candidates == "in_batch":
        return embeddings.query @ embeddings.documents.T
    documents = embeddings.positive[:, None]
    if embeddings.negatives is not None and embeddings.negatives.shape[1] > 0:
        documents = torch.cat([documents, embeddings.negatives], dim=1)  # (B, 1+N, D)
    return torch.einsum("bd,bkd->bk", embeddings.query, documents)


def teacher_candidate_scores(
    inputs: LossInput, teacher: FrozenModelConfig | None, candidates: Candidates, term: str
) -> torch.Tensor:
    """The teacher's scores of the candidates, shaped like `candidate_scores`, without gradient."""
    if teacher is not None and teacher.scorer == "cross_encoder":
        key = frozen_key(teacher)
        if f"{key}|{candidates}" in inputs.frozen_scores:
            return inputs.frozen_scores[f"{key}|{candidates}"].detach()
        return own_columns(inputs.frozen_scores[f"{key}|in_batch"], inputs.num_negatives).detach()
    if teacher is not None:
        return candidate_scores(teacher_embeddings(inputs, teacher), candidates).detach()
    if inputs.teacher_scores is None:
        raise RunError(
            f"loss {term}: the batch has no teacher scores. Give the training source a teacher_scores_column "
            "(written by `embtrain prep score`), or give the term a teacher: model to score online"
        )
    return inputs.teacher_scores[:, : 1 + inputs.num_negatives].detach()


def own_columns(scores: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """(B, 1+N) from (B, B*(1+N)): each row's positive column, then its hard negatives' columns."""
    size = scores.shape[0]
    rows = torch.arange(size, device=scores.device)
    columns = torch.cat([rows[:, None], size + rows[:, None] * num_negatives + torch.arange(num_negatives, device=scores.device)], dim=1)
    return scores.gather(1, columns)


def excluded_candidates(inputs: LossInput, candidates: Candidates) -> torch.Tensor | None:
    """(B, C) True for other rows' documents in rows whose source takes no in-batch negatives; None if none."""
    if candidates == "own" or bool(inputs.in_batch.all()):
        return None
    size, device = inputs.query.shape[0], inputs.query.device
    rows = torch.arange(size, device=device)
    owner = torch.cat([rows, rows.repeat_interleave(inputs.num_negatives)])
    return (owner[None, :] != rows[:, None]) & ~inputs.in_batch[:, None]


class Projection(torch.nn.Module):
    """Learned linear maps from the student's embeddings to the teacher's dimension, one per width
    the student's embeddings may have (Matryoshka cuts them); a width equal to the teacher's has
    none unless asked. Trained and checkpointed with the loss, left out of the exported model."""

    def __init__(self, widths: list[int], teacher_dim: int) -> None:
        super().__init__()
        self.maps = torch.nn.ModuleDict({str(w): torch.nn.Linear(w, teacher_dim) for w in widths})

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        linear = self.maps[str(embeddings.shape[-1])]
        return linear(embeddings.to(linear.weight.dtype))


def projection(context: LossContext, teacher: FrozenModelConfig, wanted: bool | None) -> Projection | None:
    """A `Projection` for the widths that differ from the teacher's (all of them when `wanted`);
    None when no width needs one."""
    teacher_dim = context.frozen_dim(teacher) if context.frozen_dim is not None else context.dim
    widths = list(context.widths or (context.dim,))
    differ = [w for w in widths if w != teacher_dim]
    if wanted is False and differ:
        raise RunError(
            f"loss: the student embeds in {differ[0]} dimensions and the teacher {teacher.name_or_path} in "
            f"{teacher_dim}; set projection: true (or leave it unset) to learn a map between them"
        )
    chosen = widths if wanted else differ
    return Projection(chosen, teacher_dim) if chosen else None


def project(projection: Projection | None, embeddings: torch.Tensor) -> torch.Tensor:
    """The embeddings through the projection of their width, if it has one."""
    if projection is None or str(embeddings.shape[-1]) not in projection.maps:
        return embeddings
    return projection(embeddings)
