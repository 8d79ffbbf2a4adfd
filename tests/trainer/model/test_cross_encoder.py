"""A frozen cross-encoder teacher inside the step: the scores the loss sees, the candidates, the cache."""

import json

import pytest
import torch

from conftest import write_recipe
from trainer.config import load_recipe
from trainer.losses import LossInput
from trainer.losses.teacher import own_columns
from trainer.loop import train


@pytest.fixture(scope="session")
def cross_encoder(tiny_model, tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("cross-encoder")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    labels = {0: "not_relevant", 1: "relevant"}
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, id2label=labels,
                        label2id={v: k for k, v in labels.items()})
    torch.manual_seed(2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def relevance(folder, queries, documents):
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**tokenizer(queries, documents, padding=True, truncation=True, max_length=64, return_tensors="pt")).logits
    return logits[:, 1] - logits[:, 0]  # the log-odds of "relevant"


def test_own_columns_picks_each_rows_positive_then_negatives():
    scores = torch.arange(2 * 6).reshape(2, 6).float()  # B=2, N=2: columns p0 p1 n00 n01 n10 n11
    assert own_columns(scores, 2).tolist() == [[0, 2, 3], [7, 10, 11]]


@pytest.mark.parametrize("candidates,cached", [("in_batch", False), ("own", True)])
def test_cross_encoder_scores_reach_the_loss(tmp_path, tiny_model, pairs_file, cross_encoder, monkeypatch, candidates, cached):
    from trainer import step

    seen: list[LossInput] = []
    original = step.loss_input
    monkeypatch.setattr(step, "loss_input", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    teacher = f"{{name_or_path: {cross_encoder}, scorer: cross_encoder}}"
    recipe = write_recipe(tmp_path, tiny_model, pairs_file, f"loss: [{{kind: distill_kl, teacher: {teacher}, candidates: {candidates}}}]")
    overrides = ["training.max_steps=1"] + (["training.grad_cache_chunk_size=5"] if cached else [])
    train(load_recipe(recipe, overrides))
    inputs = seen[0]
    (key,) = inputs.frozen_scores
    assert key.endswith(f"|{candidates}")
    scores = inputs.frozen_scores[key]
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    by_query = {r["query"]: r for r in rows}
    # rebuild the batch's texts from the ids the loss saw
    from trainer.data.training_set import text_key

    texts = {text_key(t): t for r in rows for t in [r["query"], r["positive"], *r["negatives"]]}
    queries = [texts[i] for i in inputs.query_ids.tolist()]
    documents = [texts[i] for i in inputs.document_ids.tolist()]
    size = len(queries)
    if candidates == "in_batch":
        assert scores.shape == (size, len(documents))
        pairs = [(q, d) for q in queries for d in documents]
    else:
        assert scores.shape == (size, 2)
        pairs = [(q, d) for q in queries for d in [by_query[q]["positive"], by_query[q]["negatives"][0]]]
    expected = relevance(cross_encoder, [q for q, _ in pairs], [d for _, d in pairs]).reshape(scores.shape)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_cross_encoder_scores_each_pair_once_across_epochs(tmp_path, tiny_model, pairs_file, cross_encoder, monkeypatch):
    from trainer.model.cross_encoder import CrossEncoderScorer

    scored = []
    original = CrossEncoderScorer.score_pairs
    monkeypatch.setattr(CrossEncoderScorer, "score_pairs", lambda self, q, d, c: scored.extend(zip(q, d)) or original(self, q, d, c))
    teacher = f"{{name_or_path: {cross_encoder}, scorer: cross_encoder}}"
    recipe = write_recipe(tmp_path, tiny_model, pairs_file, f"loss: [{{kind: margin_mse, teacher: {teacher}, candidates: own}}]")
    train(load_recipe(recipe, ["training.max_steps=null", "training.epochs=2"]))
    assert len(scored) == len(set(scored)) == 64 * 2  # 64 pairs, positive and one negative each, over two epochs


def test_cross_encoders_cannot_stand_in_for_embeddings(cross_encoder):
    from trainer.losses.embed_distill import EmbedDistillConfig
    from trainer.model.frozen import FrozenModelConfig
    from trainer.schema import FieldError

    with pytest.raises(FieldError, match="needs an embedding model"):
        EmbedDistillConfig(kind="embed_distill", teacher=FrozenModelConfig(name_or_path=str(cross_encoder), scorer="cross_encoder"))
