"""Clusters of similar queries for clustered batches (TAS-B, Contextual Document Embeddings).

Every source's distinct queries are embedded once at the start and grouped by k-means; each pair
takes its query's cluster, and the batch sampler draws every batch from one cluster, so that the
other pairs of a batch are about the same thing: hard in-batch negatives without mining. The
labels are saved as `clusters.npy` in the run folder and read back on resume.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch

from trainer.config import ClusteredBatchesConfig
from trainer.data.training_set import TrainingSet

FILE = "clusters.npy"
CHUNK = 4096
"""Points per distance computation: memory is CHUNK x clusters scores."""


def _nearest(points: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest center, squared distance to it) for every point, in chunks."""
    labels, distances = [], []
    center_norms = (centers * centers).sum(1)
    for first in range(0, len(points), CHUNK):
        chunk = points[first : first + CHUNK]
        squared = (chunk * chunk).sum(1, keepdim=True) - 2 * chunk @ centers.T + center_norms
        value, index = squared.min(1)
        labels.append(index)
        distances.append(value.clamp_min(0))
    return torch.cat(labels), torch.cat(distances)


def kmeans(points: torch.Tensor, k: int, iterations: int, seed: int) -> np.ndarray:
    """Labels (N,) of Lloyd's k-means from a seeded k-means++ start; a cluster that empties keeps
    its center. Deterministic for a seed."""
    points = points.double()
    n = len(points)
    k = max(1, min(k, n))
    generator = torch.Generator().manual_seed(seed)
    centers = points[torch.randint(n, (1,), generator=generator)]
    _, distances = _nearest(points, centers)
    for _ in range(1, k):  # k-means++: the next center far from the chosen ones, with probability ~ distance^2
        if distances.sum() <= 0:
            break  # fewer distinct points than k
        pick = torch.multinomial(distances / distances.sum(), 1, generator=generator)
        centers = torch.cat([centers, points[pick]])
        distances = torch.minimum(distances, _nearest(points, points[pick])[1])
    labels = None
    for _ in range(iterations):
        new, _ = _nearest(points, centers)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centers).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=len(centers)).unsqueeze(1)
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    if labels is None:
        labels, _ = _nearest(points, centers)
    return labels.numpy().astype(np.int64)


def query_clusters(config: ClusteredBatchesConfig, examples: TrainingSet, encoder, seed: int) -> tuple[np.ndarray, str]:
    """A cluster label per example (unique across sources), and a line saying what was done.
    `encoder` embeds (`Encoder.encode`'s signature)."""
    started = time.perf_counter()
    labels = np.zeros(len(examples), dtype=np.int64)
    offset = 0
    counts = []
    for source, table in enumerate(examples.tables):
        first = examples.offsets[source]
        queries = table["query"]
        distinct = list(dict.fromkeys(queries))
        row = {q: i for i, q in enumerate(distinct)}
        with torch.no_grad():
            embedded = encoder.encode(distinct, is_query=True, batch_size=config.batch_size, progress=f"cluster: source {source}")
        k = max(1, round(len(queries) / config.cluster_size))
        found = kmeans(embedded.float(), k, config.iterations, seed + source)
        labels[first : first + len(queries)] = offset + found[[row[q] for q in queries]]
        counts.append(len(np.unique(found)))
        offset += int(found.max()) + 1
    sizes = np.bincount(labels)
    sizes = sizes[sizes > 0]
    line = (f"clustered batches: {len(examples)} pairs in {sum(counts)} clusters of similar queries "
            f"(sizes {int(sizes.min())}-{int(sizes.max())}, median {int(np.median(sizes))}), in {time.perf_counter() - started:.1f} s")
    return labels, line


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def save(run_dir: Path, labels: np.ndarray) -> None:
    from trainer.run_dir import write_atomic

    write_atomic(run_dir / FILE, npy_bytes(labels))


def load(run_dir: Path) -> np.ndarray | None:
    path = run_dir / FILE
    return np.load(path) if path.exists() else None
