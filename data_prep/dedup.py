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
across the whole data set. Memory (200,000 pairs, 60-character queries): about 170 bytes per
pair for `exact`, 600 for `near`, which also keeps each normalised query and its location.
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
    """`check(query, positive, location)` returns None for a new pair (and remembers it), or the
    reason it is a duplicate and the location of the earlier pair."""

    def __init__(self, mode: str = "near", threshold: float = 0.75) -> None:
        if mode not in ("none", "exact", "near"):
            raise ValueError(f"dedup mode must be none, exact or near, got {mode!r}")
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.mode = mode
        self.threshold = threshold
        self._exact: dict[bytes, str] = {}
        """Digest of the pair -> its location."""
        self._queries_of: dict[bytes, list[tuple[str, str]]] = {}
        """Normalised positive's digest -> (normalised query, location) of the pairs kept with it."""

    def check(self, query: str, positive: str, location: str = "") -> tuple[str, str] | None:
        if self.mode == "none":
            return None
        exact = _digest(query.strip(), positive.strip())
        if exact in self._exact:
            return "exact_duplicate", self._exact[exact]
        if self.mode == "near":
            earlier = self._near(query, positive, location)
            if earlier is not None:
                return "near_duplicate", earlier
        self._exact[exact] = location
        return None

    def _near(self, query: str, positive: str, location: str) -> str | None:
        """The location of an earlier near duplicate; if there is none, remember this query."""
        group = self._queries_of.setdefault(_digest(normalise(positive)), [])
        normalised = normalise(query)
        new = None
        for earlier, where in reversed(group[-MAX_COMPARED:]):
            if earlier == normalised:
                return where
            new = new or shingles(normalised)
            if jaccard(new, shingles(earlier)) >= self.threshold:
                return where
        group.append((normalised, location))
        return None
