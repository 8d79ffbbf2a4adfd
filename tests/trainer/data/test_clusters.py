"""Clustered batches: k-means, batches drawn from one cluster, and a run that clusters its queries."""

import numpy as np
import pytest
import torch

from conftest import write_recipe
from trainer.config import load_recipe
from trainer.data.clusters import kmeans
from trainer.data.sampler import NoDuplicatesBatchSampler
from trainer.data.training_set import TextKeys


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def blobs(per_blob: int = 30, centers: int = 4, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    middle = torch.randn(centers, 8, generator=generator) * 10
    truth = np.repeat(np.arange(centers), per_blob)
    return middle[truth] + torch.randn(len(truth), 8, generator=generator) * 0.1, truth


def test_kmeans_finds_separated_blobs_and_is_seeded():
    points, truth = blobs()
    labels = kmeans(points, 4, iterations=20, seed=1)
    for blob in range(4):  # every blob is one cluster, a different one each
        assert len(set(labels[truth == blob])) == 1
    assert len(set(labels)) == 4
    assert np.array_equal(kmeans(points, 4, 20, seed=1), labels)


def test_kmeans_with_more_clusters_than_distinct_points():
    points = torch.tensor([[0.0, 1.0]] * 5 + [[1.0, 0.0]] * 5)
    labels = kmeans(points, 6, iterations=5, seed=0)
    assert len(set(labels[:5])) == 1 and len(set(labels[5:])) == 1 and labels[0] != labels[5]


def keys(n: int) -> TextKeys:
    return TextKeys(np.arange(n), np.arange(n) + 10_000, np.zeros((n, 0), dtype=np.int64), np.zeros(n, dtype=np.int32))


def test_every_batch_comes_from_one_cluster_and_no_pair_is_left_out():
    labels = np.repeat(np.arange(5), [17, 9, 30, 1, 23])  # clusters smaller and larger than a batch
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    labels = labels[order]
    sampler = NoDuplicatesBatchSampler(keys(len(labels)), batch_size=8, seed=0, clusters=labels)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        seen = [i for b in batches for i in b]
        assert sorted(seen) == list(range(len(labels)))  # each pair once per epoch, the lone one too
        # every batch is full: the clusters' own 8 (17 -> 2, 9 -> 1, 30 -> 3, 1 -> 0, 23 -> 2), then
        # their tails (1 + 1 + 6 + 1 + 7 = 16 pairs) packed in cluster order into 2 more
        assert [len(b) for b in batches] == [8] * 10
        single = [b for b in batches if len(set(labels[b])) == 1]
        assert sorted(int(labels[b[0]]) for b in single) == [0, 0, 1, 2, 2, 2, 4, 4]
        mixed = [sorted(set(labels[b].tolist())) for b in batches if len(set(labels[b])) > 1]
        assert sorted(mixed) == [[0, 1, 2], [3, 4]]  # tails in cluster order: 1 + 1 + 6, then 1 + 7


def test_a_run_with_clustered_batches_saves_its_clusters_and_reads_them_back(tmp_path, tiny_model, pairs_file, capsys):
    from trainer.loop import train

    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    recipe.write_text(recipe.read_text().replace("  batch_size: 8\n", "  batch_size: 8\n  clustered_batches: {cluster_size: 8}\n"))
    train(load_recipe(recipe))
    out = capsys.readouterr().out
    assert "clustered batches: 64 pairs in 8 clusters of similar queries" in out
    labels = np.load(tmp_path / "runs" / "r" / "clusters.npy")
    assert labels.shape == (64,) and len(set(labels)) == 8

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train(load_recipe(recipe, ["training.max_steps=6"]), resume=True)
    assert "clustered batches" not in capsys.readouterr().out  # read back, not computed again
    assert np.array_equal(np.load(tmp_path / "runs" / "r" / "clusters.npy"), labels)
