"""Evaluation sets by kind; metric names are prefixed with the set's name."""

from __future__ import annotations

from typing import Callable

from trainer.config import EvalSetConfig, RetrievalEvalConfig, STSEvalConfig
from trainer.evaluation.retrieval import RetrievalEvaluator
from trainer.evaluation.sts import STSEvaluator
from trainer.evaluation.sharded import TextEncoder

Evaluator = Callable[[TextEncoder], dict[str, float]]
"""Called with an `Encoder`, or a `ShardedEncoder` on every process during training."""


def build_evaluator(config: EvalSetConfig) -> Evaluator:
    if isinstance(config, RetrievalEvalConfig):
        return RetrievalEvaluator(config)
    if isinstance(config, STSEvalConfig):
        return STSEvaluator(config)
    raise TypeError(f"no evaluator for {config!r}")  # pragma: no cover


def evaluate(evaluators: dict[str, Evaluator], encoder: TextEncoder) -> dict[str, float]:
    """Run every set; returns e.g. {'scifact/ndcg@10': 0.64, 'stsb/spearman': 0.82}."""
    metrics = {}
    for name, evaluator in evaluators.items():
        for metric, value in evaluator(encoder).items():
            metrics[f"{name}/{metric}"] = value
    return metrics
