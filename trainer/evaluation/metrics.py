"""Ranking metrics from ranked document ids and graded relevance judgements (qrels).

nDCG uses linear gains (rel / log2(rank + 1)), as trec_eval and BEIR do. Queries without
any relevant document are skipped, as in BEIR.
"""

from __future__ import annotations

import math


def ndcg_at_k(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    dcg = sum(relevant.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted((r for r in relevant.values() if r > 0), reverse=True)[:k]
    idcg = sum(rel / math.log2(rank + 2) for rank, rel in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    for rank, doc in enumerate(ranked[:k]):
        if relevant.get(doc, 0) > 0:
            return 1.0 / (rank + 1)
    return 0.0


def recall_at_k(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    positives = {doc for doc, rel in relevant.items() if rel > 0}
    if not positives:
        return 0.0
    return len(positives.intersection(ranked[:k])) / len(positives)


def retrieval_metrics(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """Mean nDCG@10, MRR@10, Recall@10 and Recall@100 over the judged queries in `ranked`."""
    judged = [q for q in ranked if any(r > 0 for r in qrels.get(q, {}).values())]
    if not judged:
        raise ValueError("no ranked query has a relevant document in the qrels")
    metrics = {
        "ndcg@10": lambda r, rel: ndcg_at_k(r, rel, 10),
        "mrr@10": lambda r, rel: mrr_at_k(r, rel, 10),
        "recall@10": lambda r, rel: recall_at_k(r, rel, 10),
        "recall@100": lambda r, rel: recall_at_k(r, rel, 100),
    }
    return {name: sum(fn(ranked[q], qrels[q]) for q in judged) / len(judged) for name, fn in metrics.items()}
