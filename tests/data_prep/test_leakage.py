"""The leakage check finds planted overlaps with real SciFact test queries and STS sentences."""

import json
from pathlib import Path

from data_prep.leakage import beir_eval_queries, normalise
from trainer.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCIFACT = ROOT / "data" / "scifact"
STSB = ROOT / "data" / "stsbenchmark" / "sts-test.csv"


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise("  What is  X? ") == normalise("what is x") == "what is x"
    assert normalise("Ａｐｐｌｅ") == "apple"  # NFKC folds full-width letters


def test_planted_overlaps_are_removed(tmp_path, pairs_file, capsys):
    test_queries = [json.loads(l) for l in (SCIFACT / "queries.jsonl").read_text().splitlines()]
    judged = {line.split("\t")[0] for line in (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    planted = [q["text"] for q in test_queries if q["_id"] in judged][:3]
    assert len(planted) == 3 and normalise(planted[0]) in beir_eval_queries(str(SCIFACT), "test")
    sts_sentence = STSB.read_text().splitlines()[0].split("\t")[5]
    rows = [json.loads(l) for l in pairs_file.read_text().splitlines()]
    rows.insert(5, {"query": planted[0].upper(), "positive": "p", "negatives": []})
    rows.insert(20, {"query": planted[1] + "  ", "positive": "p", "negatives": []})
    rows.insert(40, {"query": planted[2].rstrip(".") + " !", "positive": "p", "negatives": []})
    rows.insert(50, {"query": sts_sentence, "positive": "p", "negatives": []})
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clean.jsonl"
    code = main(["prep", "leakage", "--train", str(train), "--eval-beir", str(SCIFACT), "--eval-sts", str(STSB),
                 "--out", str(out)])
    assert code == 0
    assert "removed 4 of 68 rows" in capsys.readouterr().out
    kept = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(kept) == 64 and kept == [json.loads(l) for l in pairs_file.read_text().splitlines()]
    manifest = json.loads((tmp_path / "clean.jsonl.manifest.json").read_text())
    assert manifest["removed_rows"] == [6, 21, 41, 51]


def test_finds_the_two_scifact_train_claims_that_repeat_test_claims(tmp_path, capsys):
    """SciFact's splits share no query id, but two train claims are word for word test claims."""
    queries = {json.loads(l)["_id"]: json.loads(l)["text"] for l in (SCIFACT / "queries.jsonl").read_text().splitlines()}
    train_ids = {line.split("\t")[0] for line in (SCIFACT / "qrels" / "train.tsv").read_text().splitlines()[1:]}
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": queries[q]}) + "\n" for q in sorted(train_ids)))
    out = tmp_path / "o.jsonl"
    assert main(["prep", "leakage", "--train", str(train), "--eval-beir", str(SCIFACT), "--out", str(out)]) == 0
    assert f"removed 2 of {len(train_ids)} rows" in capsys.readouterr().out
    kept = {json.loads(l)["query"] for l in out.read_text().splitlines()}
    assert "Obesity decreases life quality." not in kept
    assert "There is no association between HNF4A mutations and diabetes risks." not in kept


def test_standalone_entry_point_reports_errors_cleanly(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "data_prep.leakage", "--train", str(tmp_path / "missing.jsonl"),
         "--eval-beir", str(SCIFACT), "--out", str(tmp_path / "o.jsonl")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "missing.jsonl: file not found" in result.stderr and "Traceback" not in result.stderr
