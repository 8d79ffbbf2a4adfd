import json

import pytest

from trainer.config import BeirSource, PairsSource
from trainer.data.errors import DataError
from trainer.data.readers import read_examples, read_training_data
from trainer.data.examples import Example
from trainer.data.training_set import text_key


def pairs(path, **kw):
    return PairsSource(kind="pairs", path=str(path), **kw)


def test_jsonl_with_negatives(pairs_file):
    examples = read_examples(pairs(pairs_file, negatives_column="negatives"))
    assert len(examples) == 64
    assert examples[0].query.startswith("what apple")
    assert len(examples[0].negatives) == 1


def test_csv_with_column_mapping(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\n"How tall, exactly?",Very tall.\nWhy?,Because.\n')
    examples = read_examples(pairs(path, query_column="question", positive_column="answer"))
    assert examples == [Example("How tall, exactly?", "Very tall."), Example("Why?", "Because.")]


def test_tsv_and_parquet(tmp_path):
    import pandas as pd

    tsv = tmp_path / "qa.tsv"
    tsv.write_text("query\tpositive\nq1\tp1\nq2\tp2\n")
    assert [e.query for e in read_examples(pairs(tsv))] == ["q1", "q2"]
    parquet = tmp_path / "qa.parquet"
    pd.DataFrame({"query": ["a", "b"], "positive": ["x", "y"], "negs": [["n1", "n2"], ["n3", "n4"]]}).to_parquet(parquet)
    examples = read_examples(pairs(parquet, negatives_column="negs"))
    assert examples[1] == Example("b", "y", ("n3", "n4"))


def test_missing_column_lists_the_columns(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(DataError, match=r"qa.csv: missing column 'query' \(columns: \['question', 'answer'\]\)"):
        read_examples(pairs(path))


def test_empty_text_names_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q1", "positive": "p1"}\n{"query": "q2", "positive": "  "}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, row 2: column 'positive' is empty"):
        read_examples(pairs(path))


def test_null_value_names_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q1", "positive": "p1"}\n{"query": null, "positive": "p"}\n')
    with pytest.raises(DataError, match=r"row 2: column 'query' is missing"):
        read_examples(pairs(path))


def test_malformed_json_is_reported_with_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"query": "q1", "positive": "p1"}\n{"query": "q2", "positive": \n')
    with pytest.raises(DataError, match=r"broken.jsonl, line 2: invalid JSON"):
        read_examples(pairs(path))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_examples(pairs(tmp_path / "nope.jsonl"))
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        read_examples(pairs(odd))


def test_negatives_must_be_a_list(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"query": "q", "positive": "p", "neg": "just one"}\n')
    with pytest.raises(DataError, match="row 1: column 'neg' must be a list"):
        read_examples(pairs(path, negatives_column="neg"))


def test_num_negatives_selects_and_checks(tmp_path):
    path = tmp_path / "n.jsonl"
    rows = [{"query": "q1", "positive": "p1", "negs": ["a", "b", "c"]}, {"query": "q2", "positive": "p2", "negs": ["d"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = pairs(path, negatives_column="negs", max_examples=1)
    assert read_training_data([source], 2)[0].negatives == ("a", "b")
    with pytest.raises(DataError, match="n.jsonl, row 2: has 1 hard negatives, data.num_negatives is 2"):
        read_training_data([pairs(path, negatives_column="negs")], 2)
    with pytest.raises(DataError, match="different numbers of hard negatives"):
        read_training_data([pairs(path, negatives_column="negs")], None)


def test_training_set_reads_rows_lazily_from_a_memory_mapped_table(tmp_path, pairs_file):
    data = read_training_data([pairs(pairs_file, negatives_column="negatives"), pairs(pairs_file)], 0)
    assert len(data) == 128 and data.num_negatives == 0
    assert all(t.cache_files for t in data.tables)  # Arrow files on disk, memory-mapped
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert data[70] == Example(rows[6]["query"], rows[6]["positive"], (), 1)
    assert data.keys.query[70] == data.keys.query[6] == text_key(rows[6]["query"])
    swapped = read_examples(pairs(pairs_file, query_column="positive", positive_column="query"))
    assert swapped[0] == Example(rows[0]["positive"], rows[0]["query"])


def test_beir_source_gives_one_pair_per_relevant_qrel(tiny_beir):
    examples = read_examples(BeirSource(kind="beir", path=str(tiny_beir), split="train"))
    assert len(examples) == 28
    assert examples[0].query.startswith("what")
    assert examples[0].negatives == ()


def test_beir_errors(tiny_beir):
    with pytest.raises(DataError, match="no qrels for split 'dev'"):
        read_examples(BeirSource(kind="beir", path=str(tiny_beir), split="dev"))
    (tiny_beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tmissing-doc\t1\n")
    with pytest.raises(DataError, match="corpus id 'missing-doc'"):
        read_examples(BeirSource(kind="beir", path=str(tiny_beir), split="train"))
    (tiny_beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "fine"}\n{"_id": "d2", "text": \n')
    with pytest.raises(DataError, match=r"corpus.jsonl, line 2: invalid JSON"):
        read_examples(BeirSource(kind="beir", path=str(tiny_beir), split="train"))


def test_sources_are_concatenated(pairs_file, tiny_beir):
    examples = read_training_data(
        [pairs(pairs_file, max_examples=10), BeirSource(kind="beir", path=str(tiny_beir))], num_negatives=0
    )
    assert len(examples) == 38


def test_collator_uses_each_sources_prompts():
    import torch

    from trainer.data.collate import Collator

    class Recorder:
        def __init__(self):
            self.calls = []

        def __call__(self, texts, **kwargs):
            self.calls.append(texts)
            return {"input_ids": torch.zeros(len(texts), 2, dtype=torch.long)}

    tokenizer = Recorder()
    collator = Collator(tokenizer, 8, [("q0: ", "d0: "), ("q1: ", "d1: ")])
    collator([Example("x", "y", ("n",), 0), Example("u", "v", ("m",), 1)])
    assert tokenizer.calls[0] == ["q0: x", "q1: u"]
    assert tokenizer.calls[1] == ["d0: y", "d1: v", "d0: n", "d1: m"]
