"""The sampler on the bundled SciFact train set (919 pairs, many claims sharing an abstract), as
2 and 4 processes with cross-device negatives see it: each step's batches of all ranks together."""

from pathlib import Path

import pytest

from trainer.config import BeirSource
from trainer.data.readers import read_training_data
from trainer.data.sampler import NoDuplicatesBatchSampler
from trainer.data.training_set import TextKeys

SCIFACT = Path(__file__).resolve().parents[3] / "data" / "scifact"


@pytest.fixture(scope="module")
def keys() -> TextKeys:
    return read_training_data([BeirSource(kind="beir", path=str(SCIFACT), split="train")], None).keys


@pytest.fixture(scope="module")
def two_source_keys() -> TextKeys:
    """SciFact twice, as two sources: every pair has an exact copy in the other source."""
    source = BeirSource(kind="beir", path=str(SCIFACT), split="train", weight=1.0)
    return read_training_data([source, source], None).keys


def global_steps(keys: TextKeys, num_replicas: int, epoch: int, **options) -> list[list[int]]:
    """Each rank's sampler on its own; returns, per step, the ranks' batches joined in rank order,
    after checking that every rank has as many batches, all of 32 pairs."""
    samplers = [NoDuplicatesBatchSampler(keys, 32, seed=42, num_replicas=num_replicas, rank=r, **options)
                for r in range(num_replicas)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    per_rank = [sampler.batches() for sampler in samplers]
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(len(batch) == 32 for batches in per_rank for batch in batches)
    return [[i for batch in step for i in batch] for step in zip(*per_rank)]


def repeats_a_text(keys: TextKeys, batch: list[int]) -> bool:
    queries, positives = keys.query[batch].tolist(), keys.positive[batch].tolist()
    negatives = set(keys.negatives[batch].ravel().tolist())
    return len(set(queries)) < len(queries) or len(set(positives)) < len(positives) or bool(negatives & set(positives))


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_no_global_batch_repeats_a_query_or_a_positive(keys, num_replicas):
    assert len(keys) == 919 and len(set(keys.positive.tolist())) == 565  # the data the test is about
    for epoch in range(3):
        steps = global_steps(keys, num_replicas, epoch)
        assert not [step for step in steps if repeats_a_text(keys, step)]
        # deferring a pair costs no global batch: all full ones that 919 pairs make
        assert len(steps) == len(keys) // (32 * num_replicas)
        used = [i for step in steps for i in step]
        assert len(used) == len(set(used))


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_homogeneous_global_batches_with_two_sources(two_source_keys, num_replicas):
    keys = two_source_keys
    for epoch in range(3):
        steps = global_steps(keys, num_replicas, epoch, weights=[1.0, 1.0], accumulation_steps=3)
        # every full global batch of each source, then whole windows of 3 only
        assert len(steps) == 2 * (919 // (32 * num_replicas)) // 3 * 3
        sources = [set(keys.source[step].tolist()) for step in steps]
        assert all(len(s) == 1 for s in sources)
        assert {s.pop() for s in sources} == {0, 1}
        assert not [step for step in steps if repeats_a_text(keys, step)]
