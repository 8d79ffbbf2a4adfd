"""Relabeling (Gecko): the teacher's ranking of retrieved candidates picks positives and negatives."""

import json
from argparse import Namespace

import pytest
import torch

from data_prep.mine import MiningTask
from data_prep.relabel import candidate_rows, relabel
from trainer.cli import main


def options(**changes) -> Namespace:
    base = {"positive": "teacher", "num_negatives": 1, "negative_ranks": [1, 20], "margin": None, "relative_margin": None}
    return Namespace(**{**base, **changes})


TASK = MiningTask(
    queries=["q0", "q1"],
    corpus=["d0", "d1", "d2", "d3", "d4", "d1"],  # d5 is a copy of d1's text
    positives=[[0], [1, 2]],
)


def test_candidates_are_the_known_positives_then_the_retrieved_others():
    retrieved = [[3, 0, 4], [5, 4, 1, 3]]
    assert candidate_rows(TASK, retrieved) == [[0, 3, 4], [1, 2, 4, 3]]  # d5 is d1 again: left out


def test_a_query_with_too_few_negatives_left_is_rejected():
    candidates = [[0, 3, 4], [1, 2, 4, 3]]
    scores = [[0.5, 0.9, 0.2], [0.7, 0.1, 0.8, 0.3]]
    # after the chosen positive and the labelled ones, each query has one candidate left
    rows, rejected, _ = relabel(TASK, candidates, scores, options(num_negatives=2))
    assert rows == [] and [(r["query"], r["positive"], r["allowed_candidates"]) for r in rejected] == [("q0", "d3", 1), ("q1", "d4", 1)]


def test_teacher_mode_one_row_per_query():
    candidates = [[0, 3, 4], [1, 2, 4, 3]]
    scores = [[0.5, 0.9, 0.2], [0.7, 0.1, 0.8, 0.3]]
    rows, rejected, relabeled = relabel(TASK, candidates, scores, options())
    assert [(r["query"], r["positive"], r["negatives"], r["teacher_scores"], r["relabeled"]) for r in rows] == [
        ("q0", "d3", ["d4"], [0.9, 0.2], True),  # d0, labelled, is never a negative
        ("q1", "d4", ["d3"], [0.8, 0.3], True),
    ]
    assert rejected == [] and relabeled == 2


def test_labelled_mode_keeps_every_labelled_pair_and_takes_the_teachers_negatives():
    candidates = [[0, 3, 4], [1, 2, 4, 3]]
    scores = [[0.95, 0.9, 0.2], [0.7, 0.1, 0.8, 0.3]]
    rows, _, relabeled = relabel(TASK, candidates, scores, options(positive="labelled"))
    assert [(r["query"], r["positive"], r["negatives"], r["relabeled"]) for r in rows] == [
        ("q0", "d0", ["d3"], False),
        ("q1", "d1", ["d4"], False),  # the teacher's hardest, even above the positive: no guard set
        ("q1", "d2", ["d4"], False),
    ]
    assert relabeled == 0


def test_guard_and_ranks_leave_out_likely_false_negatives():
    candidates = [[0, 3, 4]]
    task = MiningTask(queries=["q0"], corpus=TASK.corpus, positives=[[0]])
    scores = [[0.9, 0.89, 0.5]]
    rows, _, _ = relabel(task, candidates, scores, options(positive="labelled", relative_margin=0.05))
    assert rows[0]["negatives"] == ["d4"]  # d3 scores within 5% of the positive
    rows, rejected, _ = relabel(task, candidates, scores, options(positive="labelled", negative_ranks=[3, 5]))
    assert rows == [] and rejected[0]["reason"] == "too_few_negatives"


def test_prep_relabel_with_an_embedding_teacher(tmp_path, tiny_model, tiny_beir, capsys):
    from trainer.model.encoder import Encoder, embedding_config

    out = tmp_path / "relabeled.jsonl"
    args = ["prep", "relabel", "--beir", str(tiny_beir), "--model", str(tiny_model), "--teacher", str(tiny_model),
            "--candidates", "5", "--num-negatives", "2", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    manifest = json.loads(out.with_name("relabeled.jsonl.manifest.json").read_text())
    assert len(rows) + manifest["left_out"]["too_few_negatives"] == 28  # one row per train query
    assert manifest["relabeled_positives"] == sum(r["relabeled"] for r in rows)
    # the teacher's scores are its cosine of query and document, the positive its best candidate
    encoder = Encoder.from_config(embedding_config(str(tiny_model)))
    row = rows[0]
    docs = encoder.encode([row["positive"]] + row["negatives"], is_query=False)
    query = encoder.encode([row["query"]], is_query=True)[0]
    assert row["teacher_scores"] == pytest.approx((docs @ query).tolist(), abs=1e-5)
    assert row["teacher_scores"][0] >= max(row["teacher_scores"][1:])
    assert "queries" in capsys.readouterr().out
    assert main(args) != 0  # the output is there already
    assert "--overwrite" in capsys.readouterr().err


def test_prep_relabel_with_a_cross_encoder(tmp_path, tiny_model, tiny_beir):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    ce_dir = tmp_path / "ce"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(1)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=1)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(ce_dir)
    tokenizer.save_pretrained(ce_dir)
    out = tmp_path / "ce.jsonl"
    assert main(["prep", "relabel", "--beir", str(tiny_beir), "--model", str(tiny_model), "--cross-encoder", str(ce_dir),
                 "--positive", "labelled", "--candidates", "4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 28
    row = rows[3]
    with torch.no_grad():
        features = tokenizer([row["query"]] * 2, [row["positive"], row["negatives"][0]], padding=True, return_tensors="pt")
        expected = model(**features).logits[:, 0]
    assert row["teacher_scores"] == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize("flags,message", [
    (["--negative-ranks", "5", "2"], "--negative-ranks"),
    (["--relative-margin", "1.5"], "--relative-margin"),
])
def test_prep_relabel_checks_its_options(tmp_path, tiny_model, tiny_beir, flags, message, capsys):
    out = tmp_path / "x.jsonl"
    assert main(["prep", "relabel", "--beir", str(tiny_beir), "--model", str(tiny_model), "--teacher", str(tiny_model),
                 "--out", str(out)] + flags) == 2
    assert message in capsys.readouterr().err and not out.exists()
