"""Runs that cannot be lost: what --resume accepts and refuses, signals at every stage of a run,
non-finite steps, and checkpoints that never unpickle."""

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_recipe
from trainer import loop
from trainer.cli import main
from trainer.config import load_recipe
from trainer.errors import Preempted, RunError
from trainer.loop import train


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_of_a_finished_run_says_so_and_exits_0(tmp_path, tiny_model, pairs_file, capsys):
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    assert main(["train", str(recipe)]) == 0
    run_dir = tmp_path / "runs" / "r"
    before = (run_dir / "step_4" / "model" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert main(["train", str(recipe), "--resume", "logging.log_every_steps=2"]) == 0
    assert "is already finished at step 4 of 4; nothing to do" in capsys.readouterr().out
    assert (run_dir / "step_4" / "model" / "model.safetensors").stat().st_mtime_ns == before
    assert not (run_dir / "recipe_changes.jsonl").exists()  # no step ran under the changed setting
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_resume_refuses_run_defining_changes_and_records_allowed_ones(tmp_path, tiny_model, pairs_file, capsys):
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    train(load_recipe(recipe))
    run_dir = tmp_path / "runs" / "r"
    original = (run_dir / "recipe.yaml").read_text()

    assert main(["train", str(recipe), "--resume", "optimizer.lr=0.1", "model.pooling=cls", "training.max_steps=6"]) == 2
    error = capsys.readouterr().err
    assert "settings that define the run" in error
    assert "optimizer.lr: 0.001 in the run, 0.1 now" in error and "model.pooling: 'mean' in the run, 'cls' now" in error
    assert "training.max_steps" not in error.split("Settings that may change")[0]
    assert (run_dir / "recipe.yaml").read_text() == original and not (run_dir / "step_6").exists()

    assert main(["train", str(recipe), "--resume", "training.max_steps=6"]) == 0
    assert "changed on resume at step 4: training.max_steps 4 -> 6" in capsys.readouterr().out
    assert (run_dir / "recipe.yaml").read_text() == original  # the original, with the change recorded
    (change,) = [json.loads(line) for line in (run_dir / "recipe_changes.jsonl").read_text().splitlines()]
    assert change["step"] == 4 and change["changes"] == {"training.max_steps": [4, 6]}
    assert json.loads((run_dir / "step_6" / "trainer_state.json").read_text())["step"] == 6
    # the changed value is now the run's own: resuming with it again is no change
    assert main(["train", str(recipe), "--resume", "training.max_steps=6"]) == 0
    assert len((run_dir / "recipe_changes.jsonl").read_text().splitlines()) == 1
    steps = [r["step"] for r in rows(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_changed_data(tmp_path, tiny_model, pairs_file):
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    train(load_recipe(recipe, ["training.max_steps=6", "checkpointing.every_steps=2"]), resume=False)
    (tmp_path / "runs" / "r" / "step_6").rename(tmp_path / "runs" / "r" / "gone")  # as if killed after step 4
    lines = pairs_file.read_text().splitlines()
    pairs_file.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same pairs, other order
    with pytest.raises(RunError, match="data_fingerprint: [0-9a-f]{64} in the checkpoint, [0-9a-f]{64} now"):
        train(load_recipe(recipe, ["training.max_steps=6"]), resume=True)


def test_metrics_of_replayed_steps_are_not_duplicated(tmp_path, tiny_model, pairs_file):
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    train(load_recipe(recipe, ["training.max_steps=6"]))
    run_dir = tmp_path / "runs" / "r"
    uninterrupted = rows(run_dir)
    (run_dir / "step_6").rename(run_dir / "gone")  # killed after logging steps 5 and 6
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 7, "lo')  # and a line cut short
    train(load_recipe(recipe, ["training.max_steps=6"]), resume=True)
    resumed = rows(run_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, uninterrupted):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, tiny_model, pairs_file, capsys):
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    assert main(["train", str(recipe), "--resume", "training.max_steps=2"]) == 0
    assert (tmp_path / "runs" / "r" / "step_2").is_dir()


# ----------------------------------------------------------------------------- signals


def send_self(sig=signal.SIGTERM):
    os.kill(os.getpid(), sig)


def test_signal_before_the_first_step_saves_nothing(tmp_path, tiny_model, pairs_file, monkeypatch, capsys):
    read = loop.read_training_data

    def read_then_signal(*args):
        data = read(*args)
        send_self()
        return data

    monkeypatch.setattr(loop, "read_training_data", read_then_signal)
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    assert main(["train", str(recipe)]) == 75
    assert "stopped by SIGTERM before training started; nothing new to save" in capsys.readouterr().err
    assert not list((tmp_path / "runs").glob("r/step_*"))


@pytest.mark.parametrize("during", ["start", "middle", "end"])
def test_signal_during_an_evaluation_saves_and_resume_finishes(tmp_path, tiny_model, pairs_file, tiny_beir, monkeypatch, during):
    evaluation = f"""evaluation:
  sets: [{{kind: retrieval, name: t, path: {tiny_beir}}}]
  every_steps: 3
  at_start: {str(during == 'start').lower()}
"""
    recipe = write_recipe(tmp_path, tiny_model, pairs_file, evaluation)
    run = loop.EvalRunner.run
    calls = []

    def run_then_signal(self, *args, **kwargs):
        calls.append(1)
        metrics = run(self, *args, **kwargs)
        if len(calls) == 1:
            send_self(signal.SIGUSR1)
        return metrics

    monkeypatch.setattr(loop.EvalRunner, "run", run_then_signal)
    if during == "end":
        overrides = ["evaluation.every_steps=null"]
    else:
        overrides = []
    with pytest.raises(Preempted) as stopped:
        train(load_recipe(recipe, overrides))
    run_dir = tmp_path / "runs" / "r"
    if during == "start":
        assert "before training started" in str(stopped.value)
        assert not list(run_dir.glob("step_*"))
    else:
        step = 3 if during == "middle" else 4
        assert f"stopped by {'SIGUSR1'} at step {step} after saving {run_dir / f'step_{step}'}" in str(stopped.value)
        state = json.loads((run_dir / f"step_{step}" / "trainer_state.json").read_text())
        assert state["step"] == step and state["finished"] == (during == "end")
    monkeypatch.undo()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train(load_recipe(recipe, overrides), resume=True)
    assert json.loads((run_dir / "step_4" / "trainer_state.json").read_text())["finished"] is True


def test_signal_during_a_save_stops_after_it_without_saving_twice(tmp_path, tiny_model, pairs_file, monkeypatch):
    save = loop.save_checkpoint
    saved = []

    def save_with_signal(accelerator, encoder, state, *args):
        if not saved:
            send_self()
        saved.append(state.step)
        return save(accelerator, encoder, state, *args)

    monkeypatch.setattr(loop, "save_checkpoint", save_with_signal)
    with pytest.raises(Preempted, match="at step 2 after saving"):
        train(load_recipe(write_recipe(tmp_path, tiny_model, pairs_file)))
    assert saved == [2]


# ----------------------------------------------------------------------------- numerics


def nan_at(monkeypatch, steps: set[int]):
    """The loss (and so every gradient) of the given optimiser steps is NaN."""
    plain = loop.plain_step
    calls = []

    def step(encoder, loss_fn, *args, **options):
        calls.append(1)

        def poisoned(*inputs):
            total, parts = loss_fn(*inputs)
            return (total * float("nan"), parts) if len(calls) in steps else (total, parts)

        return plain(encoder, poisoned, *args, **options)

    monkeypatch.setattr(loop, "plain_step", step)


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path, tiny_model, pairs_file, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    train(load_recipe(recipe, ["checkpointing.every_steps=null", "run_name=clean"]))
    clean = tmp_path / "runs" / "clean" / "step_4"

    nan_at(monkeypatch, {4})
    train(load_recipe(recipe, ["checkpointing.every_steps=3"]))
    run_dir = tmp_path / "runs" / "r"
    assert json.loads((run_dir / "step_4" / "trainer_state.json").read_text())["nonfinite_steps"] == 1
    after_three = load_file(run_dir / "step_3" / "model" / "model.safetensors")
    after_four = load_file(run_dir / "step_4" / "model" / "model.safetensors")
    for name, tensor in after_three.items():  # the update of step 4 was skipped: weights unchanged
        assert torch.equal(after_four[name], tensor), name
    assert all(torch.isfinite(t).all() for t in after_four.values())
    assert rows(run_dir)[-1]["nonfinite_steps"] == 1
    assert not torch.equal(load_file(clean / "model" / "model.safetensors")["embeddings.word_embeddings.weight"],
                           after_four["embeddings.word_embeddings.weight"])


def test_nonfinite_stop_names_the_step_and_the_rows(tmp_path, tiny_model, pairs_file, monkeypatch, capsys):
    nan_at(monkeypatch, {3})
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    assert main(["train", str(recipe), "training.nonfinite=stop"]) == 2
    error = capsys.readouterr().err
    assert "a NaN or infinite loss or gradient at step 3 (epoch 0)" in error
    assert f"{pairs_file} row " in error and error.count(" row ") == 8  # the batch's 8 pairs


def test_skip_stops_after_too_many_nonfinite_steps_in_a_row(tmp_path, tiny_model, pairs_file, monkeypatch):
    nan_at(monkeypatch, {2, 3, 4, 5})
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    with pytest.raises(RunError, match="3 steps in a row with a NaN or infinite loss or gradient at step 4"):
        train(load_recipe(recipe, ["training.nonfinite_max_consecutive=3", "training.max_steps=8"]))


def test_logged_loss_parts_are_interval_means(tmp_path, tiny_model, pairs_file):
    recipe = write_recipe(
        tmp_path, tiny_model, pairs_file,
        "loss: [{kind: infonce, temperature: 0.05}, {kind: infonce, temperature: 0.1, weight: 0.5}]\n",
    )
    train(load_recipe(recipe, ["logging.log_every_steps=2", "training.gradient_accumulation_steps=2"]))
    logged = [r for r in rows(tmp_path / "runs" / "r") if "loss" in r]
    assert len(logged) == 2
    for row in logged:  # the total is the weighted sum of the parts only if both are means of the interval
        assert row["loss"] == pytest.approx(row["loss/infonce_0"] + 0.5 * row["loss/infonce_1"], rel=1e-5)


# ----------------------------------------------------------------------------- safety


def test_a_planted_pickle_in_a_checkpoint_is_never_loaded(tmp_path, tiny_model, pairs_file, capsys):
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    train(load_recipe(recipe, ["training.max_steps=2"]))
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    accelerate_dir = tmp_path / "runs" / "r" / "step_2" / "accelerate"
    torch.save({"x": Payload()}, accelerate_dir / "custom_checkpoint_0.pkl")
    assert main(["train", str(recipe), "--resume", "training.max_steps=4"]) == 2
    assert "unexpected pickle file(s) ['custom_checkpoint_0.pkl']" in capsys.readouterr().err
    (accelerate_dir / "custom_checkpoint_0.pkl").unlink()
    for rng_file in accelerate_dir.glob("random_states_*.pkl"):  # read with weights_only=True
        torch.save({"random_state": Payload()}, rng_file)
    with pytest.raises(RunError, match="cannot load the checkpoint: UnpicklingError"):
        train(load_recipe(recipe, ["training.max_steps=4"]), resume=True)
    assert not marker.exists()


def test_signal_during_the_last_step_saves_before_the_final_evaluation(tmp_path, tiny_model, pairs_file, tiny_beir, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_model, pairs_file, f"evaluation: {{sets: [{{kind: retrieval, name: t, path: {tiny_beir}}}], at_start: false}}\n")
    plain = loop.plain_step
    calls = []

    def step(*args, **options):
        calls.append(1)
        if len(calls) == 4:
            send_self()
        return plain(*args, **options)

    monkeypatch.setattr(loop, "plain_step", step)
    evaluated = []
    run = loop.EvalRunner.run
    monkeypatch.setattr(loop.EvalRunner, "run", lambda self, *a, **k: evaluated.append(1) or run(self, *a, **k))
    with pytest.raises(Preempted, match="at step 4 after saving"):
        train(load_recipe(recipe, ["checkpointing.every_steps=null"]))
    assert evaluated == []  # stopped before the final evaluation
    run_dir = tmp_path / "runs" / "r"
    assert json.loads((run_dir / "step_4" / "trainer_state.json").read_text())["finished"] is False
    monkeypatch.undo()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    metrics = train(load_recipe(recipe, ["checkpointing.every_steps=null"]), resume=True)  # only the final evaluation
    assert "t/ndcg@10" in metrics
    assert json.loads((run_dir / "step_4" / "trainer_state.json").read_text())["finished"] is True
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith((".", "step_"))) == ["step_4"]


def test_the_guard_leaves_loss_scaler_overflows_to_the_scaler_and_is_off_under_deepspeed():
    from types import SimpleNamespace

    from trainer.checkpoint import TrainState
    from trainer.loop import NonFiniteGuard

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], fused=True)
    scaler = SimpleNamespace(_scale=torch.tensor(65536.0))
    fp16 = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), scaler=scaler)
    guard = NonFiniteGuard("stop", 10, optimizer, TrainState(), fp16)
    guard.before_step(torch.tensor(float("inf")), 1, 0, 1)  # a routine overflow while calibrating
    assert guard.settle() == [] and not hasattr(optimizer, "found_inf")  # the scaler sets its own
    scaler._scale = torch.tensor(0.5)  # the scale collapsed: the gradients are broken
    guard.before_step(torch.tensor(float("inf")), 2, 0, 2)
    assert guard.settle() == [(2, 0, 2)]

    deepspeed = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=object()), scaler=None)
    guard = NonFiniteGuard("stop", 10, optimizer, TrainState(), deepspeed)
    guard.before_step(float("nan"), 1, 0, 1)  # the engine returns a float norm
    assert guard.settle() == []


LEARNED = "loss: [{kind: infonce, learn_temperature: true, temperature: 0.05}]"


def learned_logit(checkpoint: Path) -> float:
    return load_file(str(checkpoint / "accelerate" / "model_1.safetensors"))["terms.0.temperature_logit"].item()


def test_loss_parameters_learn_are_checkpointed_and_resume_exactly(tmp_path, tiny_model, pairs_file):
    recipe = write_recipe(tmp_path, tiny_model, pairs_file, LEARNED)
    train(load_recipe(recipe, ["run_name=full", "checkpointing.every_steps=null"]))
    full = tmp_path / "runs" / "full" / "step_4"
    start = math.log((0.05 - 0.01) / (0.2 - 0.05))  # the logit of 0.05 within [0.01, 0.2]
    assert abs(learned_logit(full) - start) > 1e-4, "the temperature did not move"
    logged = [r for r in rows(tmp_path / "runs" / "full") if "temperature/infonce" in r]
    assert len(logged) == 4 and len({r["temperature/infonce"] for r in logged}) == 4

    train(load_recipe(recipe))
    run_dir = tmp_path / "runs" / "r"
    shutil.rmtree(run_dir / "step_4")
    train(load_recipe(recipe), resume=True)
    assert learned_logit(run_dir / "step_4") == learned_logit(full)
    a, b = (load_file(str(p / "model" / "model.safetensors")) for p in (full, run_dir / "step_4"))
    assert all(torch.equal(a[k], b[k]) for k in a)
