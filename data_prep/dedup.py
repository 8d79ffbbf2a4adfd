"""Exact and near-duplicate training pairs.

- exact: the same query and the same positive, character for character (after stripping
  surrounding whitespace). Costs 16 bytes per kept pair.
- near: the same positive after normalisation (case, punctuation, whitespace, Unicode form), and
  a query whose character 4-gram Jaccard similarity to an earlier query of that positive is at
  least `threshold` (default 0.75; "How do I reset my password?" / "how do i reset my pasword"). Estimated with
  MinHash and found with LSH (datasketch), then checked on the MinHash signatures. Different
  queries that share a positive (common in retrieval data) are not duplicates.
"""

from __future__ import annotations

import hashlib

import numpy as np

from data_prep.leakage import normalise

_NUM_PERM = 128


def _digest(*texts: str) -> bytes:
    hasher = hashlib.blake2b(digest_size=16)
    for text in texts:
        hasher.update(text.encode("utf-8", "surrogatepass"))
        hasher.update(b"\x1f")
    return hasher.digest()


def shingles(text: str, size: int = 4) -> set[bytes]:
    text = normalise(text)
    if len(text) <= size:
        return {text.encode()}
    return {text[i : i + size].encode() for i in range(len(text) - size + 1)}


class Deduplicator:
    """`check(query, positive)` returns None for a new pair, or the reason it is a duplicate."""

    def __init__(self, mode: str = "near", threshold: float = 0.75) -> None:
        if mode not in ("none", "exact", "near"):
            raise ValueError(f"dedup mode must be none, exact or near, got {mode!r}")
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.mode = mode
        self.threshold = threshold
        self._exact: set[bytes] = set()
        self._normalised: set[bytes] = set()
        self._lsh = None
        self._signatures: dict[int, tuple[np.ndarray, bytes]] = {}
        if mode == "near":
            from datasketch import MinHashLSH

            # LSH only proposes candidates: a lower bar there misses fewer pairs near the threshold,
            # which the signature comparison below then decides
            self._lsh = MinHashLSH(threshold=min(0.85, max(0.1, threshold - 0.15)), num_perm=_NUM_PERM)

    def check(self, query: str, positive: str) -> str | None:
        if self.mode == "none":
            return None
        exact = _digest(query.strip(), positive.strip())
        if exact in self._exact:
            return "exact_duplicate"
        if self.mode == "exact":
            self._exact.add(exact)
            return None
        positive_key = _digest(normalise(positive))
        normalised = _digest(normalise(query), normalise(positive))
        if normalised in self._normalised:
            return "near_duplicate"
        signature = self._minhash(query)
        for key in self._lsh.query(signature):
            earlier, earlier_positive = self._signatures[key]
            if earlier_positive == positive_key and np.mean(earlier == signature.hashvalues) >= self.threshold:
                return "near_duplicate"
        self._exact.add(exact)
        self._normalised.add(normalised)
        key = len(self._signatures)
        self._signatures[key] = (signature.hashvalues.astype(np.uint32), positive_key)  # values < 2**32
        self._lsh.insert(key, signature)
        return None

    @staticmethod
    def _minhash(text: str):
        from datasketch import MinHash

        signature = MinHash(num_perm=_NUM_PERM, seed=1)
        signature.update_batch(list(shingles(text)))
        return signature
