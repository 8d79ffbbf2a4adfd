"""One training example: a query, its positive document and optional hard negatives; or a single
text (a `texts` source: `positive` is None)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    query: str
    """The query, or the text of a `texts` source."""
    positive: str | None
    """The relevant document; None for a single text."""
    negatives: tuple[str, ...] = field(default_factory=tuple)
    source: int = 0
    """Index of the training source (data.train) it came from."""
    teacher_scores: tuple[float, ...] | None = None
    """A teacher's scores of the positive, then of each hard negative, when the data has them."""
