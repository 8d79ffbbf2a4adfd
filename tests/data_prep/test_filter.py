"""Consistency filtering: a positive's rank against a brute-force ranking, and the tool's files."""

import json

import pytest
import torch

from data_prep.filter import positive_ranks
from trainer.cli import main


def test_positive_ranks_equal_a_brute_force_count_without_the_other_positives():
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(30, 8, generator=generator), dim=-1)
    documents = torch.nn.functional.normalize(torch.randn(500, 8, generator=generator), dim=-1)
    corpus = [f"d{i}" for i in range(500)]
    corpus[499] = corpus[3]  # a copy of query 0's second positive: not counted either
    positives = [[(q * 11) % 500, (q * 11 + 3) % 500] for q in range(30)]
    ranks = positive_ranks(queries, documents, positives, corpus)
    for q, known in enumerate(positives):
        scores = queries[q] @ documents.T
        excluded = {d for d in range(500) if corpus[d] in {corpus[p] for p in known}}
        for positive, rank in zip(known, ranks[q]):
            above = [d for d in range(500) if d not in excluded and scores[d] > scores[positive]]
            assert rank == 1 + len(above)


def test_prep_filter_keeps_the_top_k_and_writes_the_rest_with_their_ranks(tmp_path, tiny_model, capsys):
    rows = [
        {"query": "apple fruit", "positive": "apple fruit orchard", "negatives": ["engine motor"]},
        {"query": "engine motor", "positive": "engine motor piston", "negatives": ["apple fruit"]},
        {"query": "river water", "positive": "engine 12 piston motor", "negatives": ["apple"]},  # a noisy pair
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["river water flows", "water river bank", "apple"]))
    out = tmp_path / "filtered.jsonl"
    args = ["prep", "filter", "--pairs", str(pairs), "--corpus", str(corpus), "--model", str(tiny_model),
            "--top-k", "2", "--negatives-column", "negatives", "--out", str(out)]
    assert main(args) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    rejected = [json.loads(line) for line in out.with_name("filtered.jsonl.rejected.jsonl").read_text().splitlines()] \
        if out.with_name("filtered.jsonl.rejected.jsonl").exists() else []
    assert len(kept) + len(rejected) == 3
    assert all(r["positive_rank"] <= 2 for r in kept) and all(r["positive_rank"] > 2 for r in rejected)
    assert all(r["negatives"] == next(x["negatives"] for x in rows if x["query"] == r["query"]) for r in kept + rejected)
    manifest = json.loads(out.with_name("filtered.jsonl.manifest.json").read_text())
    assert manifest["kept"] == len(kept) and manifest["pairs"] == 3 and manifest["settings"]["top_k"] == 2
    assert f"kept {len(kept)} of 3 pairs" in capsys.readouterr().out
    # all six documents ranked: --top-k 6 keeps everything
    assert main(args[:-1] + [str(tmp_path / "all.jsonl")] + ["--top-k", "6"]) == 0
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 3


def test_prep_filter_on_a_beir_folder_and_its_errors(tmp_path, tiny_model, tiny_beir, capsys):
    out = tmp_path / "f.jsonl"
    assert main(["prep", "filter", "--beir", str(tiny_beir), "--model", str(tiny_model), "--top-k", "40", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 28  # the train split's pairs; every rank is <= the 40 documents
    assert main(["prep", "filter", "--beir", str(tiny_beir), "--model", str(tiny_model), "--top-k", "40", "--out", str(out)]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prep", "filter", "--beir", str(tiny_beir), "--model", str(tiny_model), "--top-k", "1",
                 "--negatives-column", "n", "--out", str(tmp_path / "g.jsonl")]) != 0
    assert "--negatives-column goes with --pairs" in capsys.readouterr().err


@pytest.mark.parametrize("top_k", ["0", "-1"])
def test_prep_filter_wants_a_positive_top_k(tmp_path, tiny_model, pairs_file, top_k, capsys):
    with pytest.raises(SystemExit):
        main(["prep", "filter", "--pairs", str(pairs_file), "--model", str(tiny_model), "--top-k", top_k, "--out", str(tmp_path / "o.jsonl")])
