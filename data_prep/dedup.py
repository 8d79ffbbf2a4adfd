"""Exact and near-duplicate training pairs.

- exact: the same query and the same positive, character for character (after stripping
  surrounding whitespace).
- near: the same positive after normalisation (case, punctuation, spacing, Unicode form), and a
  query equal after normalisation or whose character 4-gram Jaccard similarity to an earlier
  query of that positive is at least `threshold` (default 0.75; "How do I reset my password?" /
  "how do i reset my pasword"). Different queries that share a positive (common in retrieval
  data) are not duplicates.

Near duplicates can only share a positive, so queries are compared within their positive's
group only (exactly, on the shingle sets; the last `MAX_COMPARED` queries of a group), never
across the whole data set. Memory: about 100 bytes per pair for `exact`, plus the normalised
query text for `near`.
"""

from __future__ import annotations

import hashlib

from data_prep.leakage import normalise

MAX_COMPARED = 256
"""Earlier queries of the same positive a new query is compared with (bounds the time for
positives shared by thousands of queries)."""


def _digest(*texts: str) -> bytes:
    hasher = hashlib.blake2b(digest_size=12)
    for text in texts:
        hasher.update(text.encode("utf-8", "surrogatepass"))
        hasher.update(b"\x1f")
    return hasher.digest()


def shingles(normalised: str, size: int = 4) -> set[str]:
    if len(normalised) <= size:
        return {normalised}
    return {normalised[i : i + size] for i in range(len(normalised) - size + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class Deduplicator:
    """`check(query, positive)` returns None for a new pair (and remembers it), or the reason it
    is a duplicate of an earlier one."""

    def __init__(self, mode: str = "near", threshold: float = 0.75) -> None:
        if mode not in ("none", "exact", "near"):
            raise ValueError(f"dedup mode must be none, exact or near, got {mode!r}")
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.mode = mode
        self.threshold = threshold
        self._exact: set[bytes] = set()
        self._queries_of: dict[bytes, list[str]] = {}
        """Normalised positive's digest -> normalised queries kept with it."""

    def check(self, query: str, positive: str) -> str | None:
        if self.mode == "none":
            return None
        exact = _digest(query.strip(), positive.strip())
        if exact in self._exact:
            return "exact_duplicate"
        if self.mode == "near" and self._near(query, positive):
            return "near_duplicate"
        self._exact.add(exact)
        return None

    def _near(self, query: str, positive: str) -> bool:
        """Is it a near duplicate? If not, remember the query under its positive."""
        group = self._queries_of.setdefault(_digest(normalise(positive)), [])
        normalised = normalise(query)
        if group:
            if normalised in group:
                return True
            new = shingles(normalised)
            if any(jaccard(new, shingles(earlier)) >= self.threshold for earlier in group[-MAX_COMPARED:]):
                return True
        group.append(normalised)
        return False
