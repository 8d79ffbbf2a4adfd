"""An evaluation set's own instruction replaces the model's prompts for that set only."""

import dataclasses

import pytest

from test_eval_distributed import write_sts
from trainer.config import ModelConfig, RetrievalEvalConfig, STSEvalConfig
from trainer.evaluation import build_evaluator, evaluate
from trainer.model.encoder import Encoder


@pytest.fixture(scope="module")
def plain(tiny_model):
    return Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=32))


def with_prompts(encoder: Encoder, query: str, document: str) -> Encoder:
    config = dataclasses.replace(encoder.config, query_prompt=query, document_prompt=document)
    return Encoder(encoder.backbone, encoder.tokenizer, config)


def test_a_sets_prompts_give_the_metrics_of_a_model_with_those_prompts(plain, tiny_beir, tmp_path):
    sts = write_sts(tmp_path)
    prompted = {
        "beir": build_evaluator(RetrievalEvalConfig(kind="retrieval", name="beir", path=str(tiny_beir), query_prompt="topic 3 ", document_prompt="7 ")),
        "sts": build_evaluator(STSEvalConfig(kind="sts", name="sts", path=str(sts), format="jsonl", query_prompt="topic 3 ")),
    }
    bare = {
        "beir": build_evaluator(RetrievalEvalConfig(kind="retrieval", name="beir", path=str(tiny_beir))),
        "sts": build_evaluator(STSEvalConfig(kind="sts", name="sts", path=str(sts), format="jsonl")),
    }
    expected = evaluate(bare, with_prompts(plain, "topic 3 ", "7 "))
    got = evaluate(prompted, with_prompts(plain, "ignored ", "ignored "))
    assert got == pytest.approx(expected, abs=1e-6)
    assert evaluate(bare, plain) != pytest.approx(expected, abs=1e-6)  # the prompts change the numbers


def test_an_empty_prompt_is_a_prompt_and_null_is_the_models(plain, tiny_beir):
    model = with_prompts(plain, "topic 3 ", "7 ")
    no_prompt = build_evaluator(RetrievalEvalConfig(kind="retrieval", name="b", path=str(tiny_beir), query_prompt="", document_prompt=""))
    assert evaluate({"b": no_prompt}, model) == pytest.approx(evaluate({"b": no_prompt}, plain), abs=1e-6)
    models_own = build_evaluator(RetrievalEvalConfig(kind="retrieval", name="b", path=str(tiny_beir)))
    assert evaluate({"b": models_own}, model) != pytest.approx(evaluate({"b": models_own}, plain), abs=1e-6)
