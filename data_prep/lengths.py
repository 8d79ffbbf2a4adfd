"""Text-length statistics, in characters and, for a given tokenizer, in tokens.

Texts are counted in batches as they stream past, so only one integer per text is kept.
`over_max` counts texts longer than `max_seq_length` tokens: those the trainer will truncate.
"""

from __future__ import annotations

import numpy as np


class LengthStats:
    def __init__(self, tokenizer=None, max_seq_length: int | None = None, batch_size: int = 1024) -> None:
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self._pending: dict[str, list[str]] = {}
        self._chars: dict[str, list[np.ndarray]] = {}
        self._tokens: dict[str, list[np.ndarray]] = {}

    def add(self, field: str, texts: list[str]) -> None:
        pending = self._pending.setdefault(field, [])
        pending.extend(texts)
        if len(pending) >= self.batch_size:
            self._flush(field)

    def _flush(self, field: str) -> None:
        texts = self._pending.get(field) or []
        if not texts:
            return
        self._chars.setdefault(field, []).append(np.fromiter((len(t) for t in texts), dtype=np.int32, count=len(texts)))
        if self.tokenizer is not None:
            ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
            self._tokens.setdefault(field, []).append(np.fromiter((len(i) for i in ids), dtype=np.int32, count=len(ids)))
        self._pending[field] = []

    def summary(self) -> dict:
        for field in list(self._pending):
            self._flush(field)
        out: dict[str, dict] = {}
        for field, parts in self._chars.items():
            entry = {"characters": _describe(np.concatenate(parts))}
            if field in self._tokens:
                tokens = np.concatenate(self._tokens[field])
                entry["tokens"] = _describe(tokens)
                if self.max_seq_length is not None:
                    entry["tokens"][f"over_{self.max_seq_length}"] = int((tokens > self.max_seq_length).sum())
            out[field] = entry
        return out


def _describe(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"count": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "count": int(values.size),
        "min": int(values.min()),
        "mean": round(float(values.mean()), 1),
        "p50": int(p50),
        "p90": int(p90),
        "p99": int(p99),
        "max": int(values.max()),
    }
