from trainer.data.examples import Example
from trainer.data.sampler import NoDuplicatesBatchSampler
from trainer.data.training_set import TextKeys


def examples_with_duplicates():
    rows = [Example(f"q{i}", f"p{i}") for i in range(40)]
    rows += [Example("q3", "p-other")]  # the same query with a second positive
    rows += [Example("q-new", "p5")]  # another query with the same positive as q5
    rows += [Example("q-neg", "p-x", ("p7",))]  # a hard negative that is q7's positive
    return rows


def test_no_batch_repeats_a_query_or_a_positive():
    rows = examples_with_duplicates()
    sampler = NoDuplicatesBatchSampler(TextKeys.from_examples(rows), batch_size=8, seed=1)
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
    a = NoDuplicatesBatchSampler(TextKeys.from_examples(rows), 8, seed=3)
    b = NoDuplicatesBatchSampler(TextKeys.from_examples(rows), 8, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_start_batch_skips_and_replicas_split():
    rows = [Example(f"q{i}", f"p{i}") for i in range(64)]
    full = NoDuplicatesBatchSampler(TextKeys.from_examples(rows), 8, seed=0)
    batches = list(full)
    full.set_epoch(0, start_batch=3)
    assert list(full) == batches[3:]
    assert len(full) == len(batches) - 3
    shards = [list(NoDuplicatesBatchSampler(TextKeys.from_examples(rows), 8, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    assert shards[0] == batches[0::2] and shards[1] == batches[1::2]


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
