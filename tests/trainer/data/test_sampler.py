from trainer.data.examples import Example
from trainer.data.sampler import NoDuplicatesBatchSampler


def examples_with_duplicates():
    rows = [Example(f"q{i}", f"p{i}") for i in range(40)]
    rows += [Example("q3", "p-other")]  # the same query with a second positive
    rows += [Example("q-new", "p5")]  # another query with the same positive as q5
    rows += [Example("q-neg", "p-x", ("p7",))]  # a hard negative that is q7's positive
    return rows


def test_no_batch_repeats_a_query_or_a_positive():
    rows = examples_with_duplicates()
    sampler = NoDuplicatesBatchSampler(rows, batch_size=8, seed=1)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        seen = []
        for batch in sampler:
            queries = [rows[i].query for i in batch]
            positives = [rows[i].positive for i in batch]
            negatives = {n for i in batch for n in rows[i].negatives}
            assert len(set(queries)) == len(queries)
            assert len(set(positives)) == len(positives)
            assert not negatives & set(positives)
            seen += batch
        assert len(seen) == len(set(seen))
        assert len(seen) >= len(rows) - 1  # at most a lone leftover waits for the next epoch


def test_order_depends_only_on_seed_and_epoch():
    rows = [Example(f"q{i}", f"p{i}") for i in range(50)]
    a = NoDuplicatesBatchSampler(rows, 8, seed=3)
    b = NoDuplicatesBatchSampler(rows, 8, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_start_batch_skips_and_replicas_split():
    rows = [Example(f"q{i}", f"p{i}") for i in range(64)]
    full = NoDuplicatesBatchSampler(rows, 8, seed=0)
    batches = list(full)
    full.set_epoch(0, start_batch=3)
    assert list(full) == batches[3:]
    assert len(full) == len(batches) - 3
    shards = [list(NoDuplicatesBatchSampler(rows, 8, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    assert shards[0] == batches[0::2] and shards[1] == batches[1::2]
