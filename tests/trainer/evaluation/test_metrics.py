import math

import pytest

from trainer.evaluation.metrics import mrr_at_k, ndcg_at_k, recall_at_k, retrieval_metrics


def test_hand_computed_ranking():
    ranked = ["d3", "d1", "d7", "d2"]
    relevant = {"d1": 1, "d2": 2, "d9": 1}
    # DCG = 1/log2(3) + 2/log2(5); ideal gains 2, 1, 1 at ranks 1..3
    dcg = 1 / math.log2(3) + 2 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, relevant, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(ranked, relevant, 1) == 0.0
    assert mrr_at_k(ranked, relevant, 10) == pytest.approx(0.5)
    assert mrr_at_k(ranked, relevant, 1) == 0.0
    assert recall_at_k(ranked, relevant, 10) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, relevant, 2) == pytest.approx(1 / 3)


def test_mean_over_judged_queries_only():
    ranked = {"a": ["x", "y"], "b": ["y", "x"], "c": ["x"]}
    qrels = {"a": {"x": 1}, "b": {"x": 1}, "c": {"x": 0}}
    metrics = retrieval_metrics(ranked, qrels)
    assert metrics["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert metrics["recall@100"] == pytest.approx(1.0)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)


def test_spearman_with_ties():
    from trainer.evaluation.sts import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks with ties averaged: a -> [1, 2.5, 2.5, 4], b -> [1, 2, 3, 4]; Pearson of the ranks
    a, b = [1.0, 2.5, 2.5, 4.0], [1.0, 2.0, 3.0, 4.0]
    ma, mb = sum(a) / 4, sum(b) / 4
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    expected = cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    assert spearman([0.1, 0.5, 0.5, 0.9], [1, 2, 3, 4]) == pytest.approx(expected)


def test_stsb_reader_on_the_bundled_file():
    from pathlib import Path

    from trainer.config import STSEvalConfig
    from trainer.evaluation.sts import read_sts

    path = Path(__file__).resolve().parents[3] / "data" / "stsbenchmark" / "sts-test.csv"
    s1, s2, scores = read_sts(STSEvalConfig(kind="sts", name="stsb", path=str(path)))
    assert len(s1) == len(s2) == len(scores) == 1379
    assert s1[0] == "A girl is styling her hair." and scores[0] == 2.5
    assert all(0 <= s <= 5 for s in scores)
