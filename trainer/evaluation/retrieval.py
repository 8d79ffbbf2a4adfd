"""Exact-search retrieval evaluation on a BEIR folder."""

from __future__ import annotations

import torch

from trainer.config import RetrievalEvalConfig
from trainer.data.beir import BeirSet, read_beir
from trainer.evaluation.metrics import retrieval_metrics
from trainer.evaluation.sharded import TextEncoder


def exact_search(
    queries: torch.Tensor, corpus: torch.Tensor, top_k: int, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k dot-product scores and indices of corpus rows for each query, chunked over queries."""
    top_k = min(top_k, corpus.shape[0])
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        chunk = queries[start : start + chunk_size] @ corpus.T  # (chunk, n_docs)
        top = chunk.topk(top_k, dim=1)
        scores.append(top.values)
        indices.append(top.indices)
    return torch.cat(scores), torch.cat(indices)


class RetrievalEvaluator:
    """Loads the BEIR set once; each call encodes corpus and queries and ranks exactly."""

    def __init__(self, config: RetrievalEvalConfig) -> None:
        self.config = config
        self.data: BeirSet = read_beir(config.path, config.split)
        # only queries with a relevant document count in the metrics (and in max_queries)
        query_ids = [q for q, docs in self.data.qrels.items() if q in self.data.queries and any(r > 0 for r in docs.values())]
        if config.max_queries is not None:
            query_ids = query_ids[: config.max_queries]
        self.query_ids = query_ids
        self.doc_ids = list(self.data.corpus)

    def __call__(self, encoder: TextEncoder) -> dict[str, float]:
        name = self.config.name
        docs = encoder.encode(
            [self.data.corpus[d] for d in self.doc_ids],
            is_query=False,
            batch_size=self.config.batch_size,
            progress=f"{name}: corpus",
            prompt=self.config.document_prompt,
        )
        queries = encoder.encode(
            [self.data.queries[q] for q in self.query_ids],
            is_query=True,
            batch_size=self.config.batch_size,
            progress=f"{name}: queries",
            prompt=self.config.query_prompt,
        )
        _, top = exact_search(queries, docs, top_k=100)
        ranked = {q: [self.doc_ids[i] for i in row.tolist()] for q, row in zip(self.query_ids, top)}
        return retrieval_metrics(ranked, self.data.qrels)
