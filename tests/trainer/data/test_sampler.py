import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.data.examples import Example
from trainer.data.sampler import NoDuplicatesBatchSampler
from trainer.data.training_set import TextKeys


def examples_with_duplicates():
    rows = [Example(f"q{i}", f"p{i}") for i in range(40)]
    rows += [Example("q3", "p-other")]  # the same query with a second positive
    rows += [Example("q-new", "p5")]  # another query with the same positive as q5
    rows += [Example("q-neg", "p-x", ("p7",))]  # a hard negative that is q7's positive
    return rows


def duplicate_heavy(n=400, seed=0):
    """Queries with several positives, positives shared by several queries, and hard negatives
    that are other pairs' positives."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = rng.randrange(n // 3)
        negative = (positive + 1 + rng.randrange(n // 3 - 1)) % (n // 3)
        rows.append(Example(f"q{rng.randrange(n // 2)}", f"p{positive}", (f"p{negative}",)))
    return rows


def check_global_batches(rows, samplers, batch_size):
    """The ranks' batches of each step, joined: no query or positive twice, no positive among
    the hard negatives; every rank has as many batches, all of `batch_size` with several ranks."""
    per_rank = [s.batches() for s in samplers]
    assert len({len(b) for b in per_rank}) == 1
    if len(samplers) > 1:
        assert all(len(b) == batch_size for batches in per_rank for b in batches)
    for step in zip(*per_rank):
        batch = [i for b in step for i in b]
        assert_no_repeats(rows, batch)
    return [list(step) for step in zip(*per_rank)]


def assert_no_repeats(rows, batch: list[int]) -> None:
    """No query twice, no positive twice, no positive among the batch's hard negatives."""
    queries = [rows[i].query for i in batch]
    positives = [rows[i].positive for i in batch]
    negatives = {n for i in batch for n in rows[i].negatives}
    assert len(set(queries)) == len(queries)
    assert len(set(positives)) == len(positives)
    assert not negatives & set(positives)


def test_no_batch_repeats_a_query_or_a_positive():
    rows = examples_with_duplicates()
    sampler = NoDuplicatesBatchSampler(TextKeys.from_examples(rows), batch_size=8, seed=1)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        seen = []
        for batch in sampler:
            assert_no_repeats(rows, batch)
            seen += batch
        assert len(seen) == len(set(seen))
        assert len(seen) >= len(rows) - 1  # at most a lone leftover waits for the next epoch


def test_order_depends_only_on_seed_and_epoch():
    rows = [Example(f"q{i}", f"p{i}") for i in range(50)]
    a = NoDuplicatesBatchSampler(TextKeys.from_examples(rows), 8, seed=3)
    b = NoDuplicatesBatchSampler(TextKeys.from_examples(rows), 8, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_start_batch_skips():
    rows = [Example(f"q{i}", f"p{i}") for i in range(64)]
    full = NoDuplicatesBatchSampler(TextKeys.from_examples(rows), 8, seed=0)
    batches = list(full)
    full.set_epoch(0, start_batch=3)
    assert list(full) == batches[3:]
    assert len(full) == len(batches) - 3


def test_ranks_take_slices_of_the_global_batches():
    """Rank r's batch i is the r-th slice of global batch i, packed as one process would pack
    batches of num_replicas x batch_size."""
    keys = TextKeys.from_examples(duplicate_heavy())
    single = [b for b in NoDuplicatesBatchSampler(keys, 32, seed=0) if len(b) == 32]
    shards = [list(NoDuplicatesBatchSampler(keys, 8, seed=0, num_replicas=4, rank=r)) for r in range(4)]
    assert len(single) >= 5 and all(len(s) == len(single) for s in shards)
    for step, batch in enumerate(single):
        assert [shards[r][step] for r in range(4)] == [batch[8 * r : 8 * (r + 1)] for r in range(4)]
    resumed = NoDuplicatesBatchSampler(keys, 8, seed=0, num_replicas=4, rank=2)
    resumed.set_epoch(0, start_batch=3)
    assert list(resumed) == shards[2][3:] and len(resumed) == len(shards[2]) - 3


def two_sources(big=40, small=10):
    return [Example(f"a{i}", f"pa{i}", (), 0) for i in range(big)] + [Example(f"b{i}", f"pb{i}", (), 1) for i in range(small)]


def test_homogeneous_batches_come_from_one_source_and_use_every_pair_once():
    rows = two_sources()
    sampler = NoDuplicatesBatchSampler(TextKeys.from_examples(rows), batch_size=5, seed=0)
    batches = list(sampler)
    assert all(len({rows[i].source for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert {rows[b[0]].source for b in batches} == {0, 1}


def test_weights_set_pairs_per_source_and_cycle_small_sources():
    rows = two_sources()
    sampler = NoDuplicatesBatchSampler(TextKeys.from_examples(rows), batch_size=5, seed=0, weights=[1.0, 1.0])
    assert sampler.counts == [25, 25]
    drawn = [i for b in sampler for i in b]
    assert sum(rows[i].source == 0 for i in drawn) == 25 and sum(rows[i].source == 1 for i in drawn) == 25
    assert set(i for i in drawn if rows[i].source == 1) == set(range(40, 50))  # every small-source pair, repeated
    for batch in sampler:
        assert len(set(batch)) == len(batch)  # a repeated pair never twice in one batch


def test_mixed_batching_mixes_sources():
    rows = two_sources()
    batches = list(NoDuplicatesBatchSampler(TextKeys.from_examples(rows), batch_size=10, seed=0, homogeneous=False))
    assert any(len({rows[i].source for i in b}) == 2 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(50))


@pytest.mark.parametrize("num_replicas", [1, 2, 4])
def test_no_global_batch_repeats_a_text_across_ranks(num_replicas):
    rows = duplicate_heavy()
    keys = TextKeys.from_examples(rows)
    for epoch in range(3):
        samplers = [NoDuplicatesBatchSampler(keys, 8, seed=5, num_replicas=num_replicas, rank=r) for r in range(num_replicas)]
        for s in samplers:
            s.set_epoch(epoch)
        steps = check_global_batches(rows, samplers, 8)
        used = [i for step in steps for b in step for i in b]
        assert len(used) == len(set(used))  # each pair at most once per epoch
        # deferred pairs are placed later, not lost: at most the tail (under two global batches) waits
        assert len(used) > len(rows) - 2 * 8 * num_replicas


def test_homogeneous_global_batches_come_from_one_source():
    rows = two_sources(big=200, small=80)
    keys = TextKeys.from_examples(rows)
    samplers = [NoDuplicatesBatchSampler(keys, 5, seed=0, num_replicas=2, rank=r) for r in range(2)]
    steps = check_global_batches(rows, samplers, 5)
    sources = [{rows[i].source for b in step for i in b} for step in steps]
    assert all(len(s) == 1 for s in sources)
    assert {s.pop() for s in sources} == {0, 1}
    assert len(steps) == 200 // 10 + 80 // 10


@pytest.mark.parametrize("num_replicas", [1, 2])
@pytest.mark.parametrize("homogeneous", [True, False])
def test_accumulation_steps_keep_whole_windows(num_replicas, homogeneous):
    rows = [Example(e.query, e.positive, e.negatives, i % 2) for i, e in enumerate(duplicate_heavy())]
    keys = TextKeys.from_examples(rows)
    common = dict(seed=1, num_replicas=num_replicas, rank=num_replicas - 1, homogeneous=homogeneous)
    plain = NoDuplicatesBatchSampler(keys, 7, **common)
    trimmed = NoDuplicatesBatchSampler(keys, 7, **common, accumulation_steps=4)
    assert len(plain) % 4 != 0  # else the test proves nothing
    assert len(trimmed) == len(plain) // 4 * 4
    assert list(trimmed) == list(plain)[: len(trimmed)]
    trimmed.set_epoch(0, start_batch=2)
    assert len(trimmed) == len(plain) // 4 * 4 - 2


def test_order_is_the_same_on_every_rank_and_depends_on_seed_and_epoch():
    """Every rank packs the same global batches on its own, in its own process (hash salts differ)."""
    rows = duplicate_heavy()
    keys = TextKeys.from_examples(rows)
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from tests.trainer.data.test_sampler import duplicate_heavy;"
        "from trainer.data.sampler import NoDuplicatesBatchSampler; from trainer.data.training_set import TextKeys;"
        "keys = TextKeys.from_examples(duplicate_heavy());"
        "samplers = [NoDuplicatesBatchSampler(keys, 8, seed=7, num_replicas=4, rank=r) for r in range(4)];"
        "[s.set_epoch(2) for s in samplers]; print(json.dumps([s.batches() for s in samplers]))"
    )
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "1"})

    def global_batches(seed, epoch):
        samplers = [NoDuplicatesBatchSampler(keys, 8, seed=seed, num_replicas=4, rank=r) for r in range(4)]
        for s in samplers:
            s.set_epoch(epoch)
        return check_global_batches(rows, samplers, 8)

    assert json.loads(out.stdout) == [list(rank) for rank in zip(*global_batches(7, 2))]
    assert global_batches(7, 2) != global_batches(7, 1)
    assert global_batches(7, 2) != global_batches(8, 2)


def test_bad_rank_or_accumulation_steps_is_an_error():
    keys = TextKeys.from_examples(duplicate_heavy(30))
    with pytest.raises(ValueError, match="rank 2"):
        NoDuplicatesBatchSampler(keys, 4, seed=0, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="accumulation_steps"):
        NoDuplicatesBatchSampler(keys, 4, seed=0, accumulation_steps=0)
