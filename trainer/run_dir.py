"""The run folder: <output_dir>/<run_name>/, checked before anything is read or written."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from trainer.checkpoint import step_checkpoints
from trainer.config import Recipe, recipe_to_yaml
from trainer.errors import RunError


def check_run_dir(recipe: Recipe, resume: bool) -> Path:
    """The run's folder; refuses one that holds checkpoints unless resuming."""
    run_dir = Path(recipe.checkpointing.output_dir) / recipe.run_name
    if step_checkpoints(run_dir) and not resume:
        raise RunError(
            f"{run_dir} already holds checkpoints; pass --resume to continue that run "
            f"or choose another name with run_name=NEW_NAME"
        )
    return run_dir


def create_run_dir(recipe: Recipe, run_dir: Path, accelerator: Accelerator) -> None:
    """Made once the data has been read, so that a data error leaves no folder behind."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
