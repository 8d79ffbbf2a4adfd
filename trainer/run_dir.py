"""The run folder `<output_dir>/<run_name>/`: checked before anything is read or written, created
once the data has been read, and compared with the recipe it was started with on `--resume`.

`recipe.yaml` is the recipe the run was started with and is never rewritten; each resume that
changes a setting appends the change to `recipe_changes.jsonl`. Settings that define the run (the
model, the data, the loss, the optimiser, the schedule's shape, ...) cannot change on resume;
those in `CHANGEABLE_ON_RESUME` can.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from trainer.checkpoint import has_progress, legacy_checkpoints
from trainer.config import Recipe, RecipeError, _plain, load_recipe, recipe_to_yaml
from trainer.errors import RunError

RECIPE_FILE = "recipe.yaml"
CHANGES_FILE = "recipe_changes.jsonl"
METRICS_FILE = "metrics.jsonl"

CHANGEABLE_ON_RESUME = (
    "training.max_steps",
    "training.epochs",
    "training.nonfinite",
    "training.nonfinite_max_consecutive",
    "data.num_workers",
    "evaluation.sets",
    "evaluation.every_steps",
    "evaluation.at_start",
    "evaluation.at_end",
    "checkpointing.every_steps",
    "checkpointing.keep_last",
    "checkpointing.save_best",
    "logging",
    "model.gradient_checkpointing",
    "model.recompute_activations",
    "training.grad_cache_chunk_size",
    "training.packing",
    "data.train.*.path",
)
"""Keys (and everything under them; `*` is any list index) that `--resume` may change: how long to
train, how often to evaluate, save and log, and what does not change the result (gradient
checkpointing, recomputed activations, the cached loss, packing, the path to the same data: the checkpoint's data fingerprint
refuses other data). With more steps, the learning-rate schedule is stretched to the new end."""

_LOCATION = ("run_name", "checkpointing.output_dir")
"""Where the run is; the run was found there, so they are not compared."""


def flat_config(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested recipe to dotted keys with scalar values (None kept)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, list):
            if not value:
                flat[name] = []
            for i, item in enumerate(value):
                flat.update(flat_config(item, f"{name}.{i}.") if isinstance(item, dict) else {f"{name}.{i}": item})
        else:
            flat[name] = value
    return flat


def _changeable(key: str) -> bool:
    parts = key.split(".")
    for safe in CHANGEABLE_ON_RESUME:
        pattern = safe.split(".")
        if len(parts) >= len(pattern) and all(p == "*" and k.isdigit() or p == k for p, k in zip(pattern, parts)):
            return True
    return False


def _same_model(before: Any, now: Any) -> bool:
    """`model.name_or_path` spelled differently (relative or absolute) for the same folder."""
    from trainer.model.encoder import resolve_model_path

    try:
        return Path(resolve_model_path(str(before))).resolve() == Path(resolve_model_path(str(now))).resolve()
    except (OSError, RuntimeError):
        return False


@dataclass
class RunFolder:
    path: Path
    resume: bool
    """A complete checkpoint exists and the run continues from it."""
    note: str | None = None
    """A line for the user (printed once, by the main process)."""
    changes: dict[str, list] = field(default_factory=dict)
    """Changed settings on resume: dotted key to [before, now]."""


def _check_writable(path: Path) -> None:
    """The nearest existing folder on the way to `path` must be a folder we can write in."""
    for parent in [path, *path.parents]:
        if parent.exists():
            break
    if not parent.is_dir():
        raise RunError(f"cannot create the run folder {path}: {parent} is a file, not a folder")
    try:
        probe = tempfile.TemporaryFile(dir=parent)
    except OSError as exc:
        raise RunError(f"cannot write the run folder {path}: {parent}: {exc.strerror}") from None
    probe.close()


def effective_recipe(run_dir: Path) -> dict[str, Any]:
    """The flat settings the run has now: `recipe.yaml` with the recorded changes applied."""
    saved = run_dir / RECIPE_FILE
    try:
        original = load_recipe(saved)
    except RecipeError as exc:
        raise RunError(f"--resume: cannot read the run's recipe: {exc}") from None
    settings = flat_config(_plain(original))
    changes_file = run_dir / CHANGES_FILE
    if changes_file.exists():
        for line_no, line in enumerate(changes_file.read_text().splitlines(), start=1):
            try:
                record = json.loads(line)
                for key, (_, now) in record["changes"].items():
                    settings[key] = now
            except (ValueError, KeyError, TypeError):
                raise RunError(f"{changes_file}, line {line_no}: not a change record") from None
    return settings


def recipe_changes(run_dir: Path, recipe: Recipe) -> dict[str, list]:
    """Settings that differ from the run's; a `RunError` listing them if any may not change."""
    before = effective_recipe(run_dir)
    now = flat_config(_plain(recipe))
    changes = {}
    for key in sorted(set(before) | set(now)):
        if key in _LOCATION or before.get(key) == now.get(key):
            continue
        if key == "model.name_or_path" and _same_model(before.get(key), now.get(key)):
            continue
        changes[key] = [before.get(key), now.get(key)]
    refused = [key for key in changes if not _changeable(key)]
    if refused:
        lines = "\n".join(f"  {key}: {changes[key][0]!r} in the run, {changes[key][1]!r} now" for key in refused)
        raise RunError(
            f"--resume: the recipe differs from the one {run_dir} was trained with in settings that define "
            f"the run:\n{lines}\nUse the run's own recipe ({run_dir / RECIPE_FILE}), or start a new run "
            f"(run_name=NEW_NAME). Settings that may change on resume: {', '.join(CHANGEABLE_ON_RESUME)}."
        )
    return changes


def check_run_dir(recipe: Recipe, resume: bool) -> RunFolder:
    """The run's folder. Without --resume it must hold no checkpoint; with --resume its recipe
    must match except for `CHANGEABLE_ON_RESUME`. Nothing is written here."""
    run_dir = Path(recipe.checkpointing.output_dir) / recipe.run_name
    _check_writable(run_dir)
    if not has_progress(run_dir):
        legacy = legacy_checkpoints(run_dir)
        if legacy:
            raise RunError(
                f"{run_dir} holds checkpoints of an earlier embtrain version ({legacy[-1].name}, without the "
                "COMPLETE marker of atomic saves), which cannot be resumed; start a new run with "
                "run_name=NEW_NAME, or move them away"
            )
        note = f"--resume: no complete checkpoint in {run_dir}; starting from step 0" if resume and run_dir.exists() else None
        return RunFolder(run_dir, resume=False, note=note)
    if not resume:
        raise RunError(
            f"{run_dir} already holds checkpoints; pass --resume to continue that run "
            f"or choose another name with run_name=NEW_NAME"
        )
    if not (run_dir / RECIPE_FILE).exists():
        raise RunError(f"--resume: {run_dir} has checkpoints but no {RECIPE_FILE}")
    return RunFolder(run_dir, resume=True, changes=recipe_changes(run_dir, recipe))


def create_run_dir(recipe: Recipe, folder: RunFolder, accelerator: Accelerator) -> None:
    """Made once the data has been read, so that a data error leaves no folder behind. A fresh
    run writes its recipe (and drops metrics of an earlier start that saved nothing); a resumed
    run keeps its recipe."""
    if not accelerator.is_main_process:
        return
    folder.path.mkdir(parents=True, exist_ok=True)
    if not folder.resume:
        write_atomic(folder.path / RECIPE_FILE, recipe_to_yaml(recipe))
        for stale in (CHANGES_FILE, METRICS_FILE):
            (folder.path / stale).unlink(missing_ok=True)


def record_changes(folder: RunFolder, step: int, accelerator: Accelerator) -> None:
    if not (folder.resume and folder.changes):
        return
    for key, (before, now) in folder.changes.items():
        accelerator.print(f"changed on resume at step {step}: {key} {before!r} -> {now!r}")
    if accelerator.is_main_process:
        record = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": folder.changes}
        with (folder.path / CHANGES_FILE).open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The rows of a metrics.jsonl (mappings with an integer step), and how many lines were not
    such rows (a line cut short by a kill, say). OSError and UnicodeDecodeError go to the caller."""
    rows, skipped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after `step`: the steps a resume replays are logged again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    write_atomic(path, "".join(line + "\n" for line in kept))


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` (text or bytes) so that a reader, or a kill, never sees half of it (synced, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
