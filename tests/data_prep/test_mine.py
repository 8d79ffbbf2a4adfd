"""Hard-negative mining against a brute-force ranking."""

import json

import pytest
import torch

from data_prep.mine import MiningSettings, MiningTask, select_negatives, task_from_beir, task_from_pairs
from trainer.cli import main
from trainer.config import PairsSource


def random_task(num_queries=40, num_docs=600, dim=16, positives_per_query=2, seed=0):
    """Random unit embeddings (no ties) for queries and a corpus with distinct texts."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(num_queries, dim, generator=generator), dim=-1)
    documents = torch.nn.functional.normalize(torch.randn(num_docs, dim, generator=generator), dim=-1)
    positives = [[(q * 7 + i * 13) % num_docs for i in range(positives_per_query)] for q in range(num_queries)]
    task = MiningTask([f"q{i}" for i in range(num_queries)], [f"d{i}" for i in range(num_docs)], positives)
    return task, queries, documents


def brute_force_order(task, queries, documents, q):
    scores = queries[q] @ documents.T
    return [d for d in scores.argsort(descending=True).tolist() if d not in task.positives[q]], scores


def test_top_negatives_equal_brute_force_ranking_without_positives():
    task, queries, documents = random_task()
    rows, report = select_negatives(task, queries, documents, MiningSettings(num_negatives=4, rank_min=3, rank_max=30))
    assert report.rows == len(rows) == sum(len(p) for p in task.positives)  # one row per pair
    for row in rows:
        q = int(row["query"][1:])
        order, scores = brute_force_order(task, queries, documents, q)
        assert row["negatives"] == [task.corpus[d] for d in order[2:6]]  # ranks 3..6
        assert row["negative_scores"] == pytest.approx([scores[d].item() for d in order[2:6]], abs=1e-5)
        assert row["positive_score"] == pytest.approx(scores[task.corpus.index(row["positive"])].item(), abs=1e-5)


def test_faiss_search_gives_the_exact_search_rows():
    pytest.importorskip("faiss")
    task, queries, documents = random_task(seed=3)
    settings = dict(num_negatives=4, rank_min=2, rank_max=40, relative_margin=0.02)
    exact, _ = select_negatives(task, queries, documents, MiningSettings(**settings))
    with_faiss, _ = select_negatives(task, queries, documents, MiningSettings(**settings, search="faiss"))
    assert [r["negatives"] for r in with_faiss] == [r["negatives"] for r in exact]
    for a, b in zip(with_faiss, exact):
        assert a["negative_scores"] == pytest.approx(b["negative_scores"], abs=1e-5)


def test_known_positives_and_their_duplicates_are_never_negatives():
    task, queries, documents = random_task(num_queries=5, num_docs=50)
    # document 49 is a copy of query 0's first positive: same text, other row
    task.corpus[49] = task.corpus[task.positives[0][0]]
    documents[49] = queries[0]  # and it would rank first
    rows, _ = select_negatives(task, queries, documents, MiningSettings(num_negatives=5, rank_max=20))
    known = {task.corpus[p] for q in range(5) for p in task.positives[q]}
    for row in rows:
        q = int(row["query"][1:])
        assert not {task.corpus[p] for p in task.positives[q]} & set(row["negatives"])
    assert all(task.corpus[49] not in r["negatives"] for r in rows if r["query"] == "q0")
    assert known  # sanity


def test_false_negative_guards_and_short_rows():
    task, queries, documents = random_task()
    settings = MiningSettings(num_negatives=3, rank_max=40, margin=0.05)
    rows, report = select_negatives(task, queries, documents, settings)
    assert all(s < r["positive_score"] - 0.05 for r in rows for s in r["negative_scores"])
    assert report.guarded > 0 and report.rows + report.too_few_negatives == 80
    relative = MiningSettings(num_negatives=3, rank_max=40, relative_margin=0.1)
    rows, _ = select_negatives(task, queries, documents, relative)
    assert all(s < r["positive_score"] * 0.9 for r in rows for s in r["negative_scores"])
    impossible = MiningSettings(num_negatives=3, rank_max=40, margin=5.0)  # cosine gaps are at most 2
    rows, report = select_negatives(task, queries, documents, impossible)
    assert rows == [] and report.too_few_negatives == len(report.dropped) == 80
    assert report.dropped[0]["reason"] == "too_few_negatives" and report.dropped[0]["query"] == "q0"


def test_random_sampling_is_seeded_and_stays_in_the_rank_range():
    task, queries, documents = random_task()
    settings = MiningSettings(num_negatives=3, rank_min=5, rank_max=25, sampling="random", seed=5)
    first, _ = select_negatives(task, queries, documents, settings)
    again, _ = select_negatives(task, queries, documents, settings)
    assert first == again
    settings.seed = 6
    other, _ = select_negatives(task, queries, documents, settings)
    assert other != first
    for row in first:
        order, _ = brute_force_order(task, queries, documents, int(row["query"][1:]))
        window = [task.corpus[d] for d in order[4:25]]
        assert all(n in window for n in row["negatives"])
        assert [window.index(n) for n in row["negatives"]] == sorted(window.index(n) for n in row["negatives"])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="ranks"):
        MiningSettings(rank_min=10, rank_max=5)
    with pytest.raises(ValueError, match="sampling"):
        MiningSettings(sampling="best")


def test_pairs_input_groups_positives_by_query(tmp_path, pairs_file):
    task = task_from_pairs(PairsSource(kind="pairs", path=str(pairs_file)))
    assert len(task.queries) == 64 and len(task.corpus) == 64
    extra = tmp_path / "docs.jsonl"
    extra.write_text('{"title": "t", "text": "an extra document"}\n')
    assert len(task_from_pairs(PairsSource(kind="pairs", path=str(pairs_file)), str(extra)).corpus) == 65


def test_beir_task_maps_qrels_to_corpus_rows(tiny_beir):
    task = task_from_beir(str(tiny_beir), "train")
    assert len(task.queries) == 28 and len(task.corpus) == 40
    assert task.corpus[task.positives[0][0]].startswith("the")


def test_cli_writes_rows_and_manifest_that_train_reads(tmp_path, tiny_model, tiny_beir, capsys):
    out = tmp_path / "mined.jsonl"
    args = ["prep", "mine", "--beir", str(tiny_beir), "--model", str(tiny_model), "--out", str(out),
            "--num-negatives", "2", "--ranks", "1", "10"]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    manifest = json.loads((tmp_path / "mined.jsonl.manifest.json").read_text())
    assert manifest["rows"] == len(rows) == 28 and manifest["settings"]["num_negatives"] == 2
    assert manifest["settings"]["max_seq_length"] == 64  # the default 256, capped at the tiny model's 64 positions
    assert "wrote 28 rows" in capsys.readouterr().out
    assert main(args) == 2  # never overwrites without --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
    strict = tmp_path / "strict.jsonl"
    assert main([*args[:-7], "--out", str(strict), "--num-negatives", "2", "--ranks", "1", "10", "--margin", "1.5"]) == 0
    assert "pairs left out (too_few_negatives): in ranks 1-10, fewer candidates than --num-negatives 2 passed" in capsys.readouterr().out
    dropped = [json.loads(line) for line in (tmp_path / "strict.jsonl.rejected.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for line in strict.read_text().splitlines()]
    assert dropped and len(dropped) + len(kept) == 28
    strict_manifest = json.loads((tmp_path / "strict.jsonl.manifest.json").read_text())
    assert strict_manifest["left_out"] == {"too_few_negatives": len(dropped)} and strict_manifest["pairs"] == 28
    assert {row["reason"] for row in dropped} == {"too_few_negatives"}
    from trainer.data.readers import read_examples

    examples = read_examples(PairsSource(kind="pairs", path=str(out), negatives_column="negatives"))
    assert len(examples) == 28 and all(len(e.negatives) == 2 for e in examples)


def test_auto_precision_says_what_it_resolved_to_on_stderr(tmp_path, tiny_model, tiny_beir, capsys):
    from trainer import precision
    from trainer.cli import main

    out = tmp_path / "m.jsonl"
    assert main(["prep", "mine", "--beir", str(tiny_beir), "--model", str(tiny_model), "--num-negatives", "1",
                 "--mixed-precision", "auto", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    expected = "bf16" if precision.cpu_has_native_bf16() else "float32"
    assert f"precision {expected} (auto, cpu)" in captured.err and "(auto" not in captured.out
    manifest = json.loads(out.with_name("m.jsonl.manifest.json").read_text())
    assert manifest["settings"]["mixed_precision"] == ("bf16" if expected == "bf16" else "no")
