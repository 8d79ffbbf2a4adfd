"""Evaluation sets by kind; metric names are prefixed with the set's name."""

from __future__ import annotations

from typing import Callable

import torch

from trainer.config import EvalSetConfig, RetrievalEvalConfig, STSEvalConfig, dim_suffix
from trainer.evaluation.retrieval import RetrievalEvaluator
from trainer.schema import kind_of
from trainer.evaluation.sts import STSEvaluator
from trainer.evaluation.sharded import TextEncoder

Evaluator = Callable[[TextEncoder], dict[str, float]]
"""Called with an `Encoder`, or a `ShardedEncoder` on every process during training."""


EVALUATORS: dict[str, Callable[[EvalSetConfig], Evaluator]] = {
    kind_of(RetrievalEvalConfig): RetrievalEvaluator,
    kind_of(STSEvalConfig): STSEvaluator,
}
"""The evaluator of each kind of evaluation set (`EvalSetConfig.registry`), built from its config."""


def build_evaluator(config: EvalSetConfig) -> Evaluator:
    return EVALUATORS[config.kind](config)


class MemoEncoder:
    """Remembers the embeddings of the last lists of texts, so that evaluating at several
    dimensions embeds each text once."""

    def __init__(self, inner: TextEncoder) -> None:
        self.inner = inner
        self.memo: dict[tuple, torch.Tensor] = {}

    def encode(
        self, texts: list[str], *, is_query: bool, batch_size: int = 64, progress: str | None = None,
        prompt: str | None = None,
    ) -> torch.Tensor:
        key = (is_query, prompt, len(texts), hash(tuple(texts)))
        if key not in self.memo:
            self.memo[key] = self.inner.encode(texts, is_query=is_query, batch_size=batch_size, progress=progress, prompt=prompt)
        return self.memo[key]


class CutEncoder:
    """The first `dim` dimensions of another encoder's embeddings, re-normalised when it normalises."""

    def __init__(self, inner: TextEncoder, dim: int, normalize: bool) -> None:
        self.inner, self.dim, self.normalize = inner, dim, normalize

    def encode(
        self, texts: list[str], *, is_query: bool, batch_size: int = 64, progress: str | None = None,
        prompt: str | None = None,
    ) -> torch.Tensor:
        embeddings = self.inner.encode(texts, is_query=is_query, batch_size=batch_size, progress=progress, prompt=prompt)
        if embeddings.shape[-1] < self.dim:
            raise ValueError(f"evaluation.dims: {self.dim} is more than the model's {embeddings.shape[-1]} dimensions")
        cut = embeddings[:, : self.dim]
        if self.normalize and cut.stride(0) != 0:  # stride 0: the zeros other processes get, left as they are
            cut = torch.nn.functional.normalize(cut, dim=-1)
        return cut


def evaluate_set(evaluator: Evaluator, encoder: TextEncoder, dims: list[int], normalize: bool) -> dict[str, float]:
    """The set's metrics at full size and, suffixed `@dim<N>`, at each of `dims`."""
    if not dims:
        return evaluator(encoder)
    memo = MemoEncoder(encoder)
    values = dict(evaluator(memo))
    for dim in dims:
        values.update({f"{k}{dim_suffix(dim)}": v for k, v in evaluator(CutEncoder(memo, dim, normalize)).items()})
    return values


def evaluate(
    evaluators: dict[str, Evaluator], encoder: TextEncoder, dims: list[int] | None = None, normalize: bool = True
) -> dict[str, float]:
    """Run every set; returns e.g. {'scifact/ndcg@10': 0.64, 'stsb/spearman': 0.82} (and
    'scifact/ndcg@10@dim64' for each of `dims`)."""
    metrics = {}
    for name, evaluator in evaluators.items():
        for metric, value in evaluate_set(evaluator, encoder, dims or [], normalize).items():
            metrics[f"{name}/{metric}"] = value
    return metrics
