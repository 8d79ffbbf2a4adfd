"""Atomic checkpoint saves and the choice of the checkpoint to resume from, on folders laid out
as a kill at each moment of a save would leave them."""

import json
from pathlib import Path

import pytest

from trainer.checkpoint import (
    COMPLETE_FILE,
    STATE_FILE,
    _finish,
    find_resume_point,
    has_progress,
    latest_checkpoint,
    step_checkpoints,
)


def fake_checkpoint(run_dir: Path, name: str, step: int, complete: bool = True, tag: str = "") -> Path:
    folder = run_dir / name
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights").write_text(tag or name)
    (folder / STATE_FILE).write_text(json.dumps({"step": step}))
    if complete:
        (folder / COMPLETE_FILE).write_text(json.dumps({"step": step}))
    return folder


def tag_of(folder: Path) -> str:
    return (folder / "model" / "weights").read_text()


def test_a_folder_without_the_marker_is_not_a_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, "step_4", 4)
    fake_checkpoint(tmp_path, "step_8", 8, complete=False)  # killed while writing; a missing file inside
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_4"]
    checkpoint, notes = find_resume_point(tmp_path)
    assert checkpoint == tmp_path / "step_4"
    assert notes == ["skipped step_8: incomplete (no COMPLETE marker; a save was interrupted)"]


def test_kill_between_moving_the_old_copy_aside_and_installing_the_new_one(tmp_path):
    # re-save of step 8: the old step_8 was renamed aside, the new one is complete in .tmp_step_8
    fake_checkpoint(tmp_path, "step_4", 4)
    fake_checkpoint(tmp_path, ".old_step_8", 8, tag="old")
    fake_checkpoint(tmp_path, ".tmp_step_8", 8, tag="new")
    assert has_progress(tmp_path)
    checkpoint, notes = find_resume_point(tmp_path)
    assert checkpoint == tmp_path / "step_8" and tag_of(checkpoint) == "new"
    assert notes == ["recovered step_8 from .tmp_step_8, left complete by an interrupted save"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_8"


def test_kill_while_the_replacement_is_still_being_written(tmp_path):
    fake_checkpoint(tmp_path, ".old_step_8", 8, tag="old")  # moved aside ...
    fake_checkpoint(tmp_path, ".tmp_step_8", 8, complete=False)  # ... never: the marker comes first
    checkpoint, notes = find_resume_point(tmp_path)
    assert checkpoint == tmp_path / "step_8" and tag_of(checkpoint) == "old"
    assert "skipped .tmp_step_8: incomplete" in notes[0] and "recovered step_8 from .old_step_8" in notes[1]


def test_only_an_old_copy_left_is_still_found_by_a_fresh_start_check(tmp_path):
    fake_checkpoint(tmp_path, ".old_step_3", 3)
    assert step_checkpoints(tmp_path) == [] and has_progress(tmp_path)


def test_finish_replaces_an_existing_checkpoint_and_leaves_no_leftovers(tmp_path):
    fake_checkpoint(tmp_path, "step_5", 5, tag="first")
    tmp = fake_checkpoint(tmp_path, ".tmp_step_5", 5, complete=False, tag="second")
    _finish(tmp, tmp_path / "step_5", 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_5"]
    assert tag_of(tmp_path / "step_5") == "second"
    assert json.loads((tmp_path / "step_5" / COMPLETE_FILE).read_text()) == {"step": 5}


@pytest.mark.parametrize("name", ["step_x", "step_", "notes", ".tmp_best"])
def test_other_folders_are_ignored(tmp_path, name):
    (tmp_path / name).mkdir()
    assert find_resume_point(tmp_path) == (None, [])


def test_run_shape_names_every_difference():
    from trainer.checkpoint import RunShape

    saved = RunShape(world_size=2, batch_size=32, gradient_accumulation_steps=1, data_fingerprint="a" * 64)
    assert saved.differences(RunShape(2, 32, 1, "a" * 64)) == []
    assert saved.differences(RunShape(4, 32, 2, "a" * 64)) == [
        "world_size: 2 in the checkpoint, 4 now",
        "gradient_accumulation_steps: 1 in the checkpoint, 2 now",
    ]


def test_leftovers_are_cleared_and_best_is_recovered(tmp_path):
    fake_checkpoint(tmp_path, "step_4", 4)
    fake_checkpoint(tmp_path, ".trash_step_2", 2)  # killed while pruning
    fake_checkpoint(tmp_path, ".tmp_step_6", 6, complete=False)
    fake_checkpoint(tmp_path, ".old_step_4", 4, tag="stale")
    fake_checkpoint(tmp_path, ".tmp_best", 4, tag="best")  # killed between moving best aside and installing
    checkpoint, notes = find_resume_point(tmp_path)
    assert checkpoint == tmp_path / "step_4" and tag_of(checkpoint) == "step_4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step_4"]
    assert tag_of(tmp_path / "best") == "best" and notes[-1].startswith("recovered best/ from .tmp_best")


def test_checkpoints_of_an_earlier_version_are_refused_not_overwritten(tmp_path):
    from trainer.config import load_recipe
    from trainer.errors import RunError
    from trainer.run_dir import check_run_dir

    run_dir = tmp_path / "runs" / "old"
    fake_checkpoint(run_dir, "step_50", 50, complete=False)  # trainer_state.json, no COMPLETE
    (run_dir / "metrics.jsonl").write_text('{"step": 50, "loss": 1.0}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"run_name: old\nmodel: {{name_or_path: m}}\ndata: {{train: [{{kind: pairs, path: p.jsonl}}]}}\n"
        f"checkpointing: {{output_dir: {tmp_path / 'runs'}}}\n"
    )
    for resume in (False, True):
        with pytest.raises(RunError, match="checkpoints of an earlier embtrain version \\(step_50"):
            check_run_dir(load_recipe(recipe), resume)
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 50, "loss": 1.0}\n'


@pytest.mark.parametrize(
    "key, changeable",
    [
        ("training.max_steps", True), ("evaluation.sets.1.path", True), ("data.train.0.path", True),
        ("data.train.0.kind", False), ("data.train.x.path", False), ("optimizer.lr", False),
        ("model.gradient_checkpointing", True), ("model.pooling", False), ("logging.log_every_steps", True),
    ],
)
def test_which_settings_may_change_on_resume(key, changeable):
    from trainer.run_dir import _changeable

    assert _changeable(key) is changeable
