"""Loss features that reach into the data and the loop: a frozen guide, teacher scores, per-source
in-batch negatives, Matryoshka evaluation."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import make_pairs, write_recipe
from trainer.config import load_recipe
from trainer.data.errors import DataError
from trainer.data.readers import read_training_data
from trainer.loop import train


def write(tmp_path: Path, model: Path, pairs: Path, extra: str) -> Path:
    """The shared tiny recipe, 3 steps, saving only at the end."""
    path = write_recipe(tmp_path, model, pairs, extra)
    text = path.read_text().replace("max_steps: 4", "max_steps: 3").replace("every_steps: 2, keep_last: null", "keep_last: 1")
    path.write_text(text)
    return path


def test_a_guide_model_runs_frozen_inside_the_step(tmp_path, tiny_model, pairs_file, monkeypatch, capsys):
    from trainer import step

    seen = []
    original = step.loss_input

    def spy(batch, query, documents, frozen, *args, **kwargs):
        inputs = original(batch, query, documents, frozen, *args, **kwargs)
        seen.append({k: (e.query.requires_grad, e.query.shape) for k, e in inputs.frozen.items()})
        return inputs

    monkeypatch.setattr(step, "loss_input", spy)
    recipe = write(
        tmp_path, tiny_model, pairs_file,
        f"loss: [{{kind: infonce, directions: [query_to_doc, query_to_query, doc_to_doc], guide: {{name_or_path: {tiny_model}}}}}]",
    )
    train(load_recipe(recipe))
    assert len(seen) == 3 and all(len(s) == 1 for s in seen)
    (requires_grad, shape), = seen[0].values()
    assert not requires_grad and shape == (8, 32)
    step_dir = tmp_path / "runs" / "r" / "step_3" / "accelerate"
    assert not list(step_dir.glob("model_1*")), "the guide is not trained, so nothing of it is checkpointed"
    assert f"step: loss infonce; frozen: {tiny_model}; precision no" in capsys.readouterr().out


def test_teacher_scores_and_in_batch_switch_reach_the_loss_input(tmp_path, tiny_model, monkeypatch):
    from trainer import step

    rows = make_pairs(16)
    for i, row in enumerate(rows):
        row["scores"] = [0.9, 0.1 * (i % 5), 7.0]
    pairs = tmp_path / "scored.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    original = step.loss_input

    def spy(*args, **kwargs):
        inputs = original(*args, **kwargs)
        seen.append(inputs)
        return inputs

    monkeypatch.setattr(step, "loss_input", spy)
    recipe = write(tmp_path, tiny_model, pairs, "")
    overrides = ["data.train.0.teacher_scores_column=scores", "data.train.0.in_batch_negatives=false", "training.max_steps=1"]
    train(load_recipe(recipe, overrides))
    inputs = seen[0]
    assert inputs.teacher_scores.shape == (8, 2)  # the positive's and one negative's; the third is unused
    assert torch.all(inputs.teacher_scores[:, 0] == 0.9)
    assert not inputs.in_batch.any()
    assert inputs.negative_ids.shape == (8, 1) and len(set(inputs.document_ids.tolist())) == 16


@pytest.mark.parametrize(
    "scores,message",
    [("[0.9]", "has 1 scores; the positive and 1 hard negative"), ('"high"', "must be a list of numbers"), ("[0.9, NaN]", None)],
)
def test_bad_teacher_scores_name_the_row(tmp_path, scores, message):
    from trainer.config import PairsSource

    rows = [json.dumps(r) for r in make_pairs(4)]
    rows[2] = rows[2][:-1] + f', "scores": {scores}}}'
    for i in (0, 1, 3):
        rows[i] = rows[i][:-1] + ', "scores": [0.5, 0.1]}'
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(rows) + "\n")
    source = PairsSource(kind="pairs", path=str(path), negatives_column="negatives", teacher_scores_column="scores")
    with pytest.raises(DataError, match=r"row 3") as error:
        read_training_data([source], None)
    if message:
        assert message in str(error.value)


def test_matryoshka_training_evaluates_every_dimension(tmp_path, tiny_model, pairs_file, tiny_beir):
    recipe = write(
        tmp_path, tiny_model, pairs_file,
        f"""loss: [{{kind: matryoshka, dims: [32, 16, 8], terms: [{{kind: infonce}}]}}]
evaluation:
  sets: [{{kind: retrieval, name: tiny, path: {tiny_beir}}}]
  dims: [16, 8]
  metric_for_best: tiny/ndcg@10@dim8""",
    )
    metrics = train(load_recipe(recipe))
    for suffix in ("", "@dim16", "@dim8"):
        assert 0 <= metrics[f"tiny/ndcg@10{suffix}"] <= 1
    state = json.loads((tmp_path / "runs" / "r" / "step_3" / "trainer_state.json").read_text())
    assert state["best_metric"] == metrics["tiny/ndcg@10@dim8"]


@pytest.mark.parametrize("cached", [False, True])
def test_2d_matryoshka_gets_earlier_layers_with_gradient(tmp_path, tiny_model, pairs_file, monkeypatch, cached, capsys):
    from trainer import step

    seen = []
    original = step.loss_input

    def spy(*args, **kwargs):
        inputs = original(*args, **kwargs)
        seen.append({k: (e.query.shape, e.query.requires_grad) for k, e in inputs.layers.items()})
        return inputs

    monkeypatch.setattr(step, "loss_input", spy)
    recipe = write(
        tmp_path, tiny_model, pairs_file,
        "loss: [{kind: adaptive_layers, terms: [{kind: matryoshka, dims: [32, 16], terms: [{kind: infonce}]}]}]",
    )
    overrides = ["training.grad_cache_chunk_size=3"] if cached else []
    before = load_recipe(recipe, overrides)
    train(before)
    assert len(seen) == 3
    assert all(s == {0: ((8, 32), not cached), 1: ((8, 32), not cached)} for s in seen)
    chunks = "; cached loss in chunks of 3" if cached else ""
    assert f"step: loss adaptive_layers[matryoshka[infonce]]{chunks}; precision no" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(line["loss"]) for line in lines if "loss" in line)
