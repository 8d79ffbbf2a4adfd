"""Teacher scores: the embedding teacher's dot products and a cross-encoder's relevance score, per document."""

import json

import pytest
import torch

from trainer.cli import main
from trainer.config import ModelConfig
from trainer.model.encoder import Encoder


def rows_file(tmp_path, pairs_file):
    rows = [json.loads(l) for l in pairs_file.read_text().splitlines()][:6]
    for row in rows:
        row["negatives"] = row["negatives"] + ["the zebra note"]  # two negatives per row
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_embedding_teacher_scores_positive_then_negatives(tmp_path, tiny_model, pairs_file, capsys):
    path, rows = rows_file(tmp_path, pairs_file)
    out = tmp_path / "scored.jsonl"
    assert main(["prep", "score", "--train", str(path), "--teacher", str(tiny_model), "--out", str(out)]) == 0
    scored = [json.loads(l) for l in out.read_text().splitlines()]
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=64))  # its positions
    for row, got in zip(rows, scored):
        q = encoder.encode([row["query"]], is_query=True)[0]
        docs = encoder.encode([row["positive"]] + row["negatives"], is_query=False)
        assert got["teacher_scores"] == pytest.approx((docs @ q).tolist(), abs=1e-5)
        assert {k: v for k, v in got.items() if k != "teacher_scores"} == row
    manifest = json.loads((tmp_path / "scored.jsonl.manifest.json").read_text())
    assert manifest["rows"] == 6 and "scored 6 rows" in capsys.readouterr().out


@pytest.mark.parametrize(
    "labels,relevant",
    [
        (None, None),  # one logit: the score itself
        ({0: "not_relevant", 1: "relevant"}, 1),
        ({0: "LABEL_0", 1: "LABEL_1"}, 1),  # unnamed two-label models: label 1 is relevant
        ({0: "entailment", 1: "neutral", 2: "contradiction"}, 0),  # NLI
    ],
)
def test_cross_encoder_scores_are_its_relevance_score(tmp_path, tiny_model, pairs_file, labels, relevant):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    ce_dir = tmp_path / "ce"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(1)
    extra = {"num_labels": 1} if labels is None else {"id2label": labels, "label2id": {v: k for k, v in labels.items()}}
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, **extra)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(ce_dir)
    tokenizer.save_pretrained(ce_dir)
    path, rows = rows_file(tmp_path, pairs_file)
    out = tmp_path / "ce.jsonl"
    assert main(["prep", "score", "--train", str(path), "--cross-encoder", str(ce_dir), "--out", str(out)]) == 0
    scored = [json.loads(l) for l in out.read_text().splitlines()]
    row = rows[2]
    docs = [row["positive"]] + row["negatives"]
    with torch.no_grad():
        features = tokenizer([row["query"]] * 3, docs, padding=True, return_tensors="pt")
        logits = model(**features).logits
    if relevant is None:
        expected = logits[:, 0]
    else:  # log-odds of the relevant label: log p / (1 - p)
        p = logits.softmax(-1)[:, relevant]
        expected = torch.log(p / (1 - p))
    assert scored[2]["teacher_scores"] == pytest.approx(expected.tolist(), abs=1e-5)


def test_cross_encoder_without_a_relevant_label_asks_for_one(tmp_path, tiny_model, pairs_file, capsys):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    ce_dir = tmp_path / "ce"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    labels = {0: "sports", 1: "science", 2: "arts"}
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, id2label=labels,
                        label2id={v: k for k, v in labels.items()})
    BertForSequenceClassification(config).save_pretrained(ce_dir)
    tokenizer.save_pretrained(ce_dir)
    path, _ = rows_file(tmp_path, pairs_file)
    args = ["prep", "score", "--train", str(path), "--cross-encoder", str(ce_dir), "--out", str(tmp_path / "o.jsonl")]
    assert main(args) == 2
    assert "name it with --label" in capsys.readouterr().err
    assert main(args + ["--label", "science"]) == 0


def test_missing_column_is_named(tmp_path, tiny_model, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "positive": "p"}\n')
    code = main(["prep", "score", "--train", str(path), "--teacher", str(tiny_model), "--negatives-column", "",
                 "--out", str(tmp_path / "o.jsonl")])
    assert code == 2
    assert "bad.jsonl: missing column 'query'" in capsys.readouterr().err
