"""`embtrain prep ingest` on small real files, malformed ones included."""

import json
from pathlib import Path

import pytest

from data_prep.dedup import Deduplicator
from trainer.cli import main
from trainer.config import PairsSource
from trainer.data.readers import read_examples

ROOT = Path(__file__).resolve().parents[2]
SCIFACT = ROOT / "data" / "scifact"


def scifact_pairs(n: int) -> list[dict]:
    """Real (claim, abstract) pairs from the bundled SciFact train split."""
    queries = {r["_id"]: r["text"] for r in map(json.loads, (SCIFACT / "queries.jsonl").read_text().splitlines())}
    corpus = {}
    for row in map(json.loads, (SCIFACT / "corpus.jsonl").read_text().splitlines()):
        corpus[row["_id"]] = f"{row['title']} {row['text']}".strip()
    pairs = []
    seen = set()
    for line in (SCIFACT / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        query_id, doc_id, _ = line.split("\t")
        if query_id in seen:
            continue
        seen.add(query_id)
        pairs.append({"query": queries[query_id], "positive": corpus[doc_id][:300].strip()})
        if len(pairs) == n:
            break
    return pairs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ingest(*args: str) -> int:
    return main(["prep", "ingest", *args])


@pytest.fixture()
def malformed_jsonl(tmp_path) -> Path:
    pairs = scifact_pairs(8)
    lines = [json.dumps(p) for p in pairs[:2]]
    lines.append('{"query": "unterminated, "positive": "x"}')  # line 3: invalid JSON
    lines.append(json.dumps(pairs[2]))
    lines.append(json.dumps({"query": pairs[3]["query"], "positive": "   "}))  # line 5: empty positive
    lines.append(json.dumps({"query": 42, "positive": pairs[4]["positive"]}))  # line 6: not text
    lines.append("")  # blank lines are skipped, not errors
    lines.append(json.dumps({"question": pairs[5]["query"], "positive": pairs[5]["positive"]}))  # line 8: no 'query'
    lines.append(json.dumps(pairs[6]))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_fail_by_default_naming_file_line_and_column(tmp_path, malformed_jsonl, capsys):
    out = tmp_path / "out.jsonl"
    assert ingest("--input", str(malformed_jsonl), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "4 bad rows" in err
    assert f"{malformed_jsonl}, line 3: invalid JSON" in err
    assert f"{malformed_jsonl}, line 5: column 'positive' is empty" in err
    assert f"{malformed_jsonl}, line 6: column 'query' is not text: int 42" in err
    assert f"{malformed_jsonl}, line 8: no column 'query' (the row has: question, positive)" in err
    assert "nothing was written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [malformed_jsonl]  # no partial output left behind


def test_drop_keeps_good_rows_and_loses_nothing(tmp_path, malformed_jsonl):
    out = tmp_path / "out.jsonl"
    assert ingest("--input", str(malformed_jsonl), "--out", str(out), "--on-error", "drop") == 0
    pairs = scifact_pairs(8)
    assert read_jsonl(out) == [pairs[0], pairs[1], pairs[2], pairs[6]]
    rejected = read_jsonl(tmp_path / "out.jsonl.rejected.jsonl")
    assert [(r["location"], r["reason"]) for r in rejected] == [
        ("line 3", "invalid_json"), ("line 5", "empty_text"), ("line 6", "not_text"), ("line 8", "missing_column"),
    ]
    assert rejected[0]["row"] == '{"query": "unterminated, "positive": "x"}'  # the raw line, kept
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert manifest["rows_in"] == 8 and manifest["rows"] == 4
    assert manifest["removed"] == {"empty_text": 1, "invalid_json": 1, "missing_column": 1, "not_text": 1}
    import hashlib

    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert manifest["input"]["sha256"][str(malformed_jsonl)] == hashlib.sha256(malformed_jsonl.read_bytes()).hexdigest()
    assert manifest["lengths"]["query"]["characters"]["count"] == 4


def test_tsv_with_bom_crlf_quotes_and_a_stray_tab(tmp_path):
    pairs = scifact_pairs(4)
    pairs[1]["query"] = '"Quoted" claims keep their quotes'
    lines = ["question\tanswer\tlabel"] + [f"{p['query']}\t{p['positive']}\t1" for p in pairs]
    lines.insert(3, f"{pairs[2]['query']}\tstray\ttab\t1")  # line 4: four fields
    path = tmp_path / "qa.tsv"
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    out = tmp_path / "qa.jsonl"
    code = ingest("--input", str(path), "--query-column", "question", "--positive-column", "answer",
                  "--out", str(out), "--on-error", "drop")
    assert code == 0
    rows = read_jsonl(out)
    assert rows == [pairs[0], pairs[1], pairs[2], pairs[3]]
    rejected = read_jsonl(tmp_path / "qa.jsonl.rejected.jsonl")
    assert [(r["location"], r["reason"]) for r in rejected] == [("line 4", "wrong_field_count")]


def test_csv_triplets_with_one_negative_column_and_quoted_newlines(tmp_path):
    import csv

    pairs = scifact_pairs(6)
    path = tmp_path / "triplets.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["anchor", "positive", "negative"])
        for i in range(5):
            writer.writerow([pairs[i]["query"], pairs[i]["positive"] + "\nsecond line", pairs[i + 1]["positive"]])
    out = tmp_path / "out.jsonl"
    assert ingest("--input", str(path), "--query-column", "anchor", "--negatives-column", "negative",
                  "--out", str(out)) == 0
    rows = read_jsonl(out)
    assert len(rows) == 5
    assert rows[0]["positive"].endswith("\nsecond line")
    assert rows[0]["negatives"] == [pairs[1]["positive"]]
    examples = read_examples(PairsSource(kind="pairs", path=str(out), negatives_column="negatives"))
    assert examples[4].negatives == (pairs[5]["positive"],)


def test_parquet_datasets_folder_and_beir_give_the_same_schema(tmp_path):
    import datasets

    pairs = scifact_pairs(5)
    table = datasets.Dataset.from_list([{"q": p["query"], "doc": p["positive"], "negs": [pairs[0]["positive"]]}
                                        for p in pairs[1:]])
    table.to_parquet(str(tmp_path / "t.parquet"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    outputs = []
    for name in ("t.parquet", "saved"):
        out = tmp_path / f"{name}.jsonl"
        assert ingest("--input", str(tmp_path / name), "--query-column", "q", "--positive-column", "doc",
                      "--negatives-column", "negs", "--out", str(out)) == 0
        outputs.append(read_jsonl(out))
    assert outputs[0] == outputs[1] == [{**p, "negatives": [pairs[0]["positive"]]} for p in pairs[1:]]
    out = tmp_path / "beir.jsonl"
    assert ingest("--input", str(SCIFACT), "--split", "train", "--out", str(out), "--dedup", "exact") == 0
    manifest = json.loads((tmp_path / "beir.jsonl.manifest.json").read_text())
    assert manifest["input"]["format"] == "beir" and manifest["rows_in"] == 919
    # SciFact train repeats two claims under other ids (85/86, 89/90): 3 pairs are exact duplicates
    assert manifest["removed"] == {"exact_duplicate": 3} and manifest["rows"] == 916


def test_bad_beir_folder_and_wrong_split_fail_clearly(tmp_path, capsys):
    assert ingest("--input", str(SCIFACT), "--split", "dev", "--out", str(tmp_path / "o.jsonl")) == 2
    assert "no qrels for split 'dev'" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert ingest("--input", str(tmp_path / "folder"), "--out", str(tmp_path / "o.jsonl")) == 2
    assert "neither a BEIR folder" in capsys.readouterr().err


def test_exact_and_near_duplicates_are_removed_shared_positives_are_not(tmp_path):
    pairs = scifact_pairs(4)
    first = pairs[0]
    rows = [
        first,
        dict(first),  # exact
        {"query": first["query"].upper() + " !", "positive": first["positive"]},  # same after normalising
        {"query": first["query"].replace("e", "a", 1), "positive": first["positive"]},  # one-letter typo
        {"query": pairs[1]["query"], "positive": first["positive"]},  # another claim, same abstract: kept
        {"query": first["query"], "positive": pairs[2]["positive"]},  # same claim, another abstract: kept
        pairs[3],
    ]
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert ingest("--input", str(path), "--out", str(out)) == 0
    assert read_jsonl(out) == [rows[0], rows[4], rows[5], rows[6]]
    rejected = read_jsonl(tmp_path / "out.jsonl.rejected.jsonl")
    assert [(r["location"], r["reason"]) for r in rejected] == [
        ("line 2", "exact_duplicate"), ("line 3", "near_duplicate"), ("line 4", "near_duplicate"),
    ]
    assert all(r["message"].endswith("of the pair at line 1") for r in rejected)
    out2 = tmp_path / "exact.jsonl"
    assert ingest("--input", str(path), "--out", str(out2), "--dedup", "exact") == 0
    assert len(read_jsonl(out2)) == 6


def test_near_duplicate_threshold():
    strict = Deduplicator("near", threshold=0.99)
    loose = Deduplicator("near", threshold=0.5)
    for dedup in (strict, loose):
        assert dedup.check("how do i reset my password on the website", "doc") is None
    assert strict.check("how can i reset my password on the website", "doc") is None
    assert loose.check("how can i reset my password on the website", "doc", "line 9") == ("near_duplicate", "")


def test_leaked_queries_and_false_negatives_are_removed(tmp_path):
    test_queries = {r["_id"]: r["text"] for r in map(json.loads, (SCIFACT / "queries.jsonl").read_text().splitlines())}
    judged = (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1].split("\t")[0]
    pairs = scifact_pairs(3)
    rows = [
        {**pairs[0], "negatives": [pairs[1]["positive"]]},
        {"query": test_queries[judged].lower(), "positive": pairs[1]["positive"], "negatives": [pairs[2]["positive"]]},
        {**pairs[2], "negatives": [pairs[2]["positive"].upper()]},  # the positive again, as a negative
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert ingest("--input", str(path), "--negatives-column", "negatives", "--eval-beir", str(SCIFACT),
                  "--out", str(out), "--on-error", "drop") == 0
    assert read_jsonl(out) == [rows[0]]
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert manifest["removed"] == {"negative_equals_positive": 1, "query_in_evaluation": 1}
    leak = read_jsonl(tmp_path / "out.jsonl.rejected.jsonl")[0]
    assert leak["location"] == "line 2" and leak["message"].endswith(f"({SCIFACT} test query {judged})")


def test_where_filter_and_token_lengths(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    path = tmp_path / "pairs.csv"
    path.write_text(
        "label,query,positive\n1,what apple,the apple story\n0,what river,the river\n1,what tiger is,the tiger of the river 12\n"
    )
    out = tmp_path / "out.jsonl"
    assert ingest("--input", str(path), "--where", "label=1", "--tokenizer", str(tiny_model),
                  "--max-seq-length", "6", "--out", str(out)) == 0
    assert [r["query"] for r in read_jsonl(out)] == ["what apple", "what tiger is"]
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert manifest["removed"] == {"filtered_by_where": 1} and manifest["rejected_file"] is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    expected = [len(tokenizer(t)["input_ids"]) for t in ("the apple story", "the tiger of the river 12")]
    tokens = manifest["lengths"]["positive"]["tokens"]
    assert (tokens["min"], tokens["max"], tokens["over_6"]) == (min(expected), max(expected), 1)
    assert ingest("--input", str(path), "--where", "label", "--out", str(tmp_path / "x.jsonl")) == 2


def test_a_misspelt_column_is_one_error_with_a_suggestion(tmp_path, capsys):
    path = tmp_path / "qa.tsv"
    path.write_text("Quality\t#1 String\t#2 String\n1\ta b c\td e f\n" * 1)
    out = tmp_path / "out.jsonl"
    assert ingest("--input", str(path), "--query-column", "#1 string", "--positive-column", "#2 String",
                  "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("no column") == 1 and "no column '#1 string' (did you mean '#1 String'?)" in err
    assert ingest("--input", str(path), "--query-column", "#1 String", "--positive-column", "#2 String",
                  "--where", "quality=1", "--out", str(out)) == 2
    assert "no column 'quality' (did you mean 'Quality'?)" in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_is_refused(tmp_path, pairs_file, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    assert ingest("--input", str(pairs_file), "--out", str(out), "--negatives-column", "negatives") == 2
    assert "pass --overwrite" in capsys.readouterr().err and out.read_text() == "keep me\n"
