"""Hard negatives mined again during training: what the training set serves, and resume."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import write_recipe
from trainer import loop
from trainer.config import RefreshNegativesConfig, load_recipe
from trainer.data.readers import read_training_data
from trainer.data.refresh import KEEP, NegativeRefresher
from trainer.data.training_set import text_key
from trainer.errors import Preempted
from trainer.loop import train

REFRESH = "  refresh_negatives: {{every_steps: 2, corpus: {corpus}, ranks: [1, 5], relative_margin: null{extra}}}\n"


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"title": "", "text": f"extra document {i} about the river"}) + "\n" for i in range(20)))
    return path


def refresh_recipe(tmp_path, tiny_model, pairs_file, corpus, extra: str = "", steps: int = 6) -> Path:
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    text = recipe.read_text().replace("  batch_size: 8\n", "  batch_size: 8\n" + REFRESH.format(corpus=corpus, extra=extra))
    recipe.write_text(text.replace("max_steps: 4", f"max_steps: {steps}"))
    return recipe


def test_a_refresh_serves_top_ranked_non_positive_documents_and_restores(tmp_path, tiny_model, pairs_file, corpus):
    from accelerate import Accelerator

    from trainer.config import ModelConfig
    from trainer.model.encoder import Encoder

    recipe = load_recipe(refresh_recipe(tmp_path, tiny_model, pairs_file, corpus))
    examples = read_training_data(recipe.data.train, recipe.data.num_negatives)
    before = [examples[i].negatives for i in range(len(examples))]
    refresher = NegativeRefresher(recipe.data.refresh_negatives, examples, tmp_path / "run", seed=0)
    assert len(refresher.task.corpus) == 64 + 20 and len(refresher.task.queries) == 64
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16))
    line = refresher.refresh(Accelerator(cpu=True), encoder, None, step=2)
    assert "mined new hard negatives for 64 of 64 pairs" in line
    embedded_queries = encoder.encode(refresher.task.queries, is_query=True)
    embedded_docs = encoder.encode(refresher.task.corpus, is_query=False)
    for i in range(len(examples)):
        example = examples[i]
        q = refresher.task.queries.index(example.query)
        order = [d for d in (embedded_queries[q] @ embedded_docs.T).argsort(descending=True).tolist()
                 if refresher.task.corpus[d] != example.positive]
        assert example.negatives == (refresher.task.corpus[order[0]],)  # rank 1, no guard
        assert examples.keys.negatives[i, 0] == text_key(example.negatives[0])
    assert [examples[i].negatives for i in range(len(examples))] != before
    # a new training set and refresher, as in a resumed run, serve the same negatives
    again = read_training_data(recipe.data.train, recipe.data.num_negatives)
    assert NegativeRefresher(recipe.data.refresh_negatives, again, tmp_path / "run", seed=0).restore(5) == 2
    assert [again[i].negatives for i in range(len(again))] == [examples[i].negatives for i in range(len(examples))]
    assert np.array_equal(again.keys.negatives, examples.keys.negatives)


def test_a_row_without_enough_candidates_keeps_its_negatives(tmp_path, tiny_model, pairs_file, corpus):
    recipe = load_recipe(refresh_recipe(tmp_path, tiny_model, pairs_file, corpus))
    examples = read_training_data(recipe.data.train, recipe.data.num_negatives)
    refresher = NegativeRefresher(recipe.data.refresh_negatives, examples, tmp_path / "run", seed=0)
    first = examples[0]
    served = np.full((len(examples), 1), KEEP, dtype=np.int32)
    served[1:, 0] = 70
    refresher.apply(served)
    assert examples[0] == first and examples[1].negatives == (refresher.task.corpus[70],)
    assert examples.keys.negatives[0, 0] == text_key(first.negatives[0])


def test_training_with_refreshes_logs_their_time_and_resumes_exactly(tmp_path, tiny_model, pairs_file, corpus, monkeypatch, capsys):
    (tmp_path / "whole").mkdir()
    recipe = refresh_recipe(tmp_path / "whole", tiny_model, pairs_file, corpus, extra=", at_start: true")
    train(load_recipe(recipe))
    whole = tmp_path / "whole" / "runs" / "r"
    out = capsys.readouterr().out
    assert "mined again every 2 steps and at the start" in out
    assert sorted(p.name for p in (whole / "negatives").iterdir()) == ["step_0.npy", "step_2.npy", "step_4.npy"]  # not after the last
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["time_s"]["mining"] > 0

    # the same run stopped by a signal at step 3 and resumed gives the same weights
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    (tmp_path / "cut").mkdir()
    recipe = refresh_recipe(tmp_path / "cut", tiny_model, pairs_file, corpus, extra=", at_start: true")
    step = loop.train_step
    calls = []

    def signal_at_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", signal_at_three)
    with pytest.raises(Preempted):
        train(load_recipe(recipe))
    monkeypatch.setattr(loop, "train_step", step)
    AcceleratorState._reset_state(reset_partial_state=True)
    train(load_recipe(recipe), resume=True)
    assert "hard negatives: those mined at step 2" in capsys.readouterr().out
    cut = tmp_path / "cut" / "runs" / "r"
    a, b = load_file(whole / "step_6" / "model" / "model.safetensors"), load_file(cut / "step_6" / "model" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_refresh_needs_pairs_with_negatives(tmp_path, tiny_model, pairs_file, corpus):
    from trainer.schema import RecipeError

    recipe = refresh_recipe(tmp_path, tiny_model, pairs_file, corpus)
    recipe.write_text(recipe.read_text().replace(", negatives_column: negatives", ""))
    with pytest.raises(RecipeError, match="refresh_negatives.*negatives_column"):
        load_recipe(recipe)
    with pytest.raises(ValueError, match="ranks.*1 <= first <= last"):
        RefreshNegativesConfig(every_steps=2, ranks=[5, 1])


def test_loader_workers_serve_the_refreshed_negatives_at_once(tmp_path, tiny_model, pairs_file, corpus):
    from accelerate.state import AcceleratorState

    weights = []
    for workers in (0, 1):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        recipe = refresh_recipe(folder, tiny_model, pairs_file, corpus)
        recipe.write_text(recipe.read_text().replace("  batch_size: 8\n", f"  batch_size: 8\n  num_workers: {workers}\n"))
        train(load_recipe(recipe))
        AcceleratorState._reset_state(reset_partial_state=True)
        weights.append(load_file(folder / "runs" / "r" / "step_6" / "model" / "model.safetensors"))
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
