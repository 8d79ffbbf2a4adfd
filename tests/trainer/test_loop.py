"""Short training runs on a tiny random BERT."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import load_recipe
from trainer.errors import RunError
from trainer.loop import train
from trainer.model.encoder import Encoder


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one global state per process; each run here sets its own precision."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def recipe_file(tmp_path: Path, model: Path, pairs: Path, beir: Path, extra: str = "") -> Path:
    text = f"""\
run_name: tiny
seed: 7
model:
  name_or_path: {model}
  max_seq_length: 16
data:
  train:
    - kind: pairs
      path: {pairs}
      negatives_column: negatives
  batch_size: 8
optimizer:
  lr: 5.0e-3
schedule:
  warmup_steps: 2
training:
  max_steps: 24
logging:
  log_every_steps: 1
evaluation:
  sets:
    - kind: retrieval
      name: tiny
      path: {beir}
  at_start: false
  metric_for_best: tiny/ndcg@10
checkpointing:
  output_dir: {tmp_path / 'runs'}
{extra}"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_training_lowers_the_loss_and_writes_a_checkpoint(tmp_path, tiny_model, pairs_file, tiny_beir):
    recipe = load_recipe(recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir))
    metrics = train(recipe)
    run_dir = tmp_path / "runs" / "tiny"
    values = losses(run_dir)
    assert len(values) == 24
    assert sum(values[-4:]) / 4 < 0.85 * sum(values[:4]) / 4  # chance level is ln(16) = 2.77
    assert 0.0 <= metrics["tiny/ndcg@10"] <= 1.0
    step = run_dir / "step_24"
    assert (step / "model" / "model.safetensors").exists()
    assert (step / "model" / "embtrain_encoder.json").exists()
    assert json.loads((step / "trainer_state.json").read_text())["step"] == 24
    assert (run_dir / "best" / "metrics.json").exists()
    assert "max_steps: 24" in (run_dir / "recipe.yaml").read_text()


def test_resume_matches_an_uninterrupted_run(tmp_path, tiny_model, pairs_file, tiny_beir):
    # 64 pairs / batch 8 = 8 steps per epoch: step 10 is inside the second epoch
    path = recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir)
    overrides = [
        "training.max_steps=12", "evaluation.sets=[]", "evaluation.metric_for_best=null",
        "checkpointing.every_steps=5", "checkpointing.keep_last=null",
    ]
    train(load_recipe(path, overrides))
    run_dir = tmp_path / "runs" / "tiny"
    assert [p.name for p in sorted(run_dir.glob("step_*"))] == ["step_10", "step_12", "step_5"]
    uninterrupted = load_file(run_dir / "step_12" / "model" / "model.safetensors")
    shutil.rmtree(run_dir / "step_12")  # as if the run had died after step 10

    train(load_recipe(path, overrides + ["checkpointing.keep_last=1"]), resume=True)
    resumed = load_file(run_dir / "step_12" / "model" / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert [p.name for p in run_dir.glob("step_*")] == ["step_12"]  # keep_last: 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))  # the replayed steps 11-12 replace the first rows


def test_refuses_to_overwrite_a_run(tmp_path, tiny_model, pairs_file, tiny_beir):
    path = recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir)
    overrides = ["training.max_steps=2", "evaluation.sets=[]", "evaluation.metric_for_best=null"]
    train(load_recipe(path, overrides))
    with pytest.raises(RunError, match="already holds checkpoints; pass --resume"):
        train(load_recipe(path, overrides))


def test_a_data_error_leaves_no_run_folder(tmp_path, tiny_model, pairs_file, tiny_beir):
    from trainer.data.errors import DataError

    path = recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir)
    with pytest.raises(DataError, match="missing column 'hard'"):
        train(load_recipe(path, ["data.train.0.negatives_column=hard"]))
    assert not (tmp_path / "runs" / "tiny").exists()


def test_bf16_autocast_and_gradient_accumulation_run(tmp_path, tiny_model, pairs_file, tiny_beir):
    path = recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir)
    recipe = load_recipe(
        path,
        [
            "training.max_steps=3", "training.mixed_precision=bf16", "training.gradient_accumulation_steps=2",
            "schedule.kind=cosine", "evaluation.at_start=true",
        ],
    )
    metrics = train(recipe)
    run_dir = tmp_path / "runs" / "tiny"
    values = losses(run_dir)
    assert len(values) == 3 and all(0 < v < 10 for v in values)
    state = json.loads((run_dir / "step_3" / "trainer_state.json").read_text())
    assert state["batch_in_epoch"] == 6  # two micro-batches per optimiser step
    assert metrics["tiny/ndcg@10"] > 0


def test_flat_config_for_trackers():
    from trainer.loop import flat_config

    flat = flat_config({"a": {"b": 1, "c": None}, "l": [{"k": "x"}, 2.5]})
    assert flat == {"a.b": 1, "a.c": "null", "l.0.k": "x", "l.1": 2.5}


def test_eval_cache_key_follows_what_changes_embeddings(tiny_model, tiny_beir):
    from trainer.config import ModelConfig, RetrievalEvalConfig
    from trainer.evaluation.cache import cache_key

    eval_set = RetrievalEvalConfig(kind="retrieval", name="t", path=str(tiny_beir))
    base = cache_key(ModelConfig(name_or_path=str(tiny_model)), eval_set)
    assert base is not None
    assert cache_key(ModelConfig(name_or_path=str(tiny_model), gradient_checkpointing=True), eval_set) == base
    assert cache_key(ModelConfig(name_or_path=str(tiny_model), query_prompt="q: "), eval_set) != base
    assert cache_key(ModelConfig(name_or_path=str(tiny_model)), RetrievalEvalConfig(
        kind="retrieval", name="t", path=str(tiny_beir), max_queries=3)) != base
    assert cache_key(ModelConfig(name_or_path="some/hub-model"), eval_set) is None


def test_two_weighted_sources_with_their_own_prompts_train(tmp_path, tiny_model, pairs_file, tiny_beir):
    path = recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir)
    sources = (
        f"[{{kind: pairs, path: {pairs_file}, negatives_column: negatives, weight: 3, query_prompt: 'what '}},"
        f" {{kind: beir, path: {tiny_beir}, split: train, max_examples: 16, weight: 1}}]"
    )
    recipe = load_recipe(path, [
        f"data.train={sources}", "data.num_negatives=0", "training.max_steps=null", "training.epochs=1",
        "evaluation.sets=[]", "evaluation.metric_for_best=null",
    ])
    train(recipe)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    # 80 pairs per epoch: 60 from the first source (batches 7 x 8 + 4), 20 from the second
    # (its 16 pairs, cycled: 8 + 8 + 4), one source per batch
    assert len(rows) == 11 and all(0 < r["loss"] < 10 for r in rows)


def test_accumulation_windows_never_span_two_epochs(tmp_path, tiny_model, pairs_file, tiny_beir, capsys):
    # 64 pairs / batch 8 = 8 batches per epoch; windows of 3 use 6 of them: 2 steps per epoch
    path = recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir)
    train(load_recipe(path, [
        "training.max_steps=3", "training.gradient_accumulation_steps=3", "evaluation.sets=[]",
        "evaluation.metric_for_best=null",
    ]))
    assert "2 steps per epoch" in capsys.readouterr().out
    state = json.loads((tmp_path / "runs" / "tiny" / "step_3" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 3)  # step 3 is the first window of epoch 1


def test_without_a_progress_bar_each_logging_interval_prints_a_line(tmp_path, tiny_model, pairs_file, tiny_beir, capsys, monkeypatch):
    # as with TQDM_DISABLE=1 in a batch job (tqdm reads it when imported, so it is patched here)
    import trainer.loop
    from trainer.progress import progress_bar

    monkeypatch.setattr(trainer.loop, "progress_bar", lambda *a, **k: progress_bar(*a, **{**k, "hide": True}))
    path = recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir)
    train(load_recipe(path, ["training.max_steps=4", "logging.log_every_steps=2", "evaluation.sets=[]",
                             "evaluation.metric_for_best=null"]))
    out = capsys.readouterr().out
    logged = losses(tmp_path / "runs" / "tiny")
    assert len(logged) == 2
    for step, loss in zip((2, 4), logged):
        assert f"step {step}/4: loss {loss:.4f}, lr " in out
    assert "step 1/4" not in out and "step 3/4" not in out
    assert out.count(" pairs/s, padding efficiency 0.") == 2


def test_loader_workers_train_exactly_like_the_main_process(tmp_path, tiny_model, pairs_file, tiny_beir):
    """Tokenising in DataLoader workers changes nothing but where it runs: the same batches, in
    the same order across an epoch boundary, give the same weights."""
    path = recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir)
    weights = {}
    for workers in (0, 2):
        overrides = [
            "training.max_steps=10", "evaluation.sets=[]", "evaluation.metric_for_best=null",
            f"data.num_workers={workers}", f"run_name=w{workers}",
        ]
        train(load_recipe(path, overrides))
        weights[workers] = load_file(tmp_path / "runs" / f"w{workers}" / "step_10" / "model" / "model.safetensors")
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[2][name], tensor, rtol=0, atol=0, msg=name)


def test_loader_workers_default_to_none_on_a_cpu(tmp_path, tiny_model, pairs_file, tiny_beir):
    from accelerate import Accelerator

    from trainer.data.readers import read_training_data
    from trainer.loop import build_collator, build_data

    recipe = load_recipe(recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir), ["evaluation.sets=[]", "evaluation.metric_for_best=null"])
    assert recipe.data.num_workers is None
    encoder = Encoder.from_config(recipe.model)
    data = build_data(recipe, Accelerator(cpu=True), read_training_data(recipe.data.train, None), build_collator(recipe, encoder, {}))
    assert data.loader.num_workers == 0 and not data.loader.pin_memory


def test_packed_training_runs_and_a_model_that_cannot_pack_is_told_at_start(tmp_path, tiny_model, pairs_file, tiny_beir, monkeypatch, capsys):
    path = recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir)
    overrides = ["training.max_steps=3", "evaluation.sets=[]", "evaluation.metric_for_best=null"]
    train(load_recipe(path, overrides + ["training.packing=always"]))
    assert len(losses(tmp_path / "runs" / "tiny")) == 3
    out = capsys.readouterr().out
    assert "packing: every column" in out and "packing: off" not in out

    monkeypatch.setattr("trainer.model.encoder.packing_support", lambda *args: (None, "it does not give the same embeddings"))
    with pytest.raises(RunError, match="training.packing always: .*: it does not give the same embeddings; set training.packing"):
        train(load_recipe(path, overrides + ["training.packing=always", "run_name=always"]))
    train(load_recipe(path, overrides + ["run_name=auto"]))
    assert "packing: off, " in capsys.readouterr().out
