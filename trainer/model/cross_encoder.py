"""A frozen cross-encoder teacher inside the step: it reads each (query, document) pair and
scores it, without gradient, in its own precision.

The score is the relevance score of `embtrain prep score --cross-encoder`: the model's single
logit, or the log-odds of its relevant label. It scores the candidates the distillation terms
ask for: each query's own documents (positive and hard negatives), or every document of the
batch. Scores are cached on disk by pair (the ids of the query and the document), so a pair is
scored once per run.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.model.embedding_cache import EmbeddingCache


def pair_ids(query_ids: torch.Tensor, document_ids: torch.Tensor) -> np.ndarray:
    """One int64 per (query, document) pair, from the two text ids (the same in every process)."""
    q = query_ids.cpu().numpy().astype(np.uint64)
    d = document_ids.cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = (q * np.uint64(0x9E3779B97F4A7C15)) ^ (d + np.uint64(0x632BE59BD9B4E019) + (q << np.uint64(6)))
    return mixed.view(np.int64)


class CrossEncoderScorer(torch.nn.Module):
    def __init__(self, model, tokenizer, label: int | None, max_seq_length: int, cache: EmbeddingCache | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.label = label
        self.max_seq_length = max_seq_length
        self.cache = cache
        self.candidates = "own"
        """What the step scores: each query's own documents, or `in_batch` (set from the loss terms)."""

    @torch.no_grad()
    def score_pairs(self, queries: list[str], documents: list[str], chunk_size: int | None) -> torch.Tensor:
        from data_prep.score import relevance_scores

        device = next(self.model.parameters()).device
        size = chunk_size or len(queries) or 1
        out = []
        for start in range(0, len(queries), size):
            features = self.tokenizer(
                queries[start : start + size], documents[start : start + size], padding=True, truncation=True,
                max_length=self.max_seq_length, return_tensors="pt",
            ).to(device)
            out.append(relevance_scores(self.model(**features).logits.float(), self.label))
        return torch.cat(out) if out else torch.zeros(0, device=device)

    def score(self, texts, size: int, num_negatives: int, candidates: str, chunk_size: int | None) -> torch.Tensor:
        """(B, 1+N) scores of each query's own documents, or (B, B*(1+N)) of every document of the batch."""
        rows = torch.arange(size)
        if candidates == "in_batch":
            columns = torch.arange(size * (1 + num_negatives))
            pairs = [(i, c) for i in rows.tolist() for c in columns.tolist()]
            shape = (size, len(columns))
        else:
            pairs = [(i, c) for i in rows.tolist() for c in [i] + [size + i * num_negatives + j for j in range(num_negatives)]]
            shape = (size, 1 + num_negatives)
        query_index = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        document_index = torch.tensor([c for _, c in pairs], dtype=torch.long)
        device = next(self.model.parameters()).device
        scores = torch.zeros(len(pairs), device=device)
        todo = np.arange(len(pairs))
        keys = None
        if self.cache is not None:
            keys = pair_ids(texts.query_ids[query_index], texts.document_ids[document_index])
            found, cached = self.cache.lookup(keys)
            scores[torch.from_numpy(np.flatnonzero(found)).to(device)] = torch.from_numpy(cached[found, 0]).to(device)
            todo = np.flatnonzero(~found)
        if len(todo):
            fresh = self.score_pairs(
                [texts.query_texts[query_index[k]] for k in todo.tolist()],
                [texts.document_texts[document_index[k]] for k in todo.tolist()],
                chunk_size,
            )
            scores[torch.from_numpy(todo).to(device)] = fresh
            if self.cache is not None:
                self.cache.add(keys[todo], fresh.cpu().numpy()[:, None])
        return scores.reshape(shape)


def load_cross_encoder(config) -> CrossEncoderScorer:
    """The `FrozenModelConfig`'s model as a frozen sequence classifier with its relevance label."""
    from transformers import AutoModelForSequenceClassification

    from data_prep.score import relevance_label
    from trainer.config import ModelConfig
    from trainer.model.encoder import LOAD_ERRORS, load_error, load_tokenizer, read_backbone_config
    from trainer.model.frozen import DTYPES

    path, _ = read_backbone_config(ModelConfig(name_or_path=config.name_or_path, trust_remote_code=config.trust_remote_code))
    tokenizer = load_tokenizer(config.name_or_path, config.trust_remote_code)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except LOAD_ERRORS as exc:
        raise load_error(config.name_or_path, path, "weights", exc) from None
    model.to(DTYPES[config.dtype]).eval().requires_grad_(False)
    limit = getattr(model.config, "max_position_embeddings", 512) or 512
    length = min(config.max_seq_length or 512, limit)
    return CrossEncoderScorer(model, tokenizer, relevance_label(model.config, config.label), length)
