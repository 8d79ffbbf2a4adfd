"""Resumable checkpoints: `<run>/step_<N>/` holds the Accelerate state (model, optimiser, RNG),
the position in the data and the schedule (JSON), and the model in Hugging Face format.

Every save is atomic: it is written to `.tmp_step_<N>/`, every file is synced, and a `COMPLETE`
marker is written last; only then is it renamed into place. Replacing an existing `step_<N>` (a
re-save at the same step) first moves the old one aside to `.old_step_<N>/` and deletes it only
once the new one is in place, so a kill at any moment leaves at least one complete copy, which
`find_resume_point` finds and puts back.

Nothing is unpickled: non-tensor state is JSON, and torch files are read with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from trainer.errors import RunError
from trainer.model.encoder import Encoder

STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE"
"""Written and synced after everything else; a folder without it is not a checkpoint."""
_FOLDER = re.compile(r"^(step|\.tmp_step|\.old_step|\.trash_step)_(\d+)$")
_SAFE_PICKLES = re.compile(r"^random_states_\d+\.pkl$")
"""Accelerate's RNG states: read with weights_only=True (numbers and arrays only)."""


@dataclass
class RunShape:
    """What the position in the data depends on: a resume with other values would replay other pairs."""

    world_size: int
    batch_size: int
    gradient_accumulation_steps: int
    data_fingerprint: str
    """sha256 of the training set's text keys (`TextKeys.fingerprint`)."""

    def differences(self, other: "RunShape") -> list[str]:
        return [
            f"{name}: {getattr(self, name)} in the checkpoint, {getattr(other, name)} now"
            for name in ("world_size", "batch_size", "gradient_accumulation_steps", "data_fingerprint")
            if getattr(self, name) != getattr(other, name)
        ]


@dataclass
class TrainState:
    step: int = 0
    """Optimiser steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    batch_in_epoch: int = 0
    """Batches of this process already consumed in the current epoch."""
    best_metric: float | None = None
    best_step: int | None = None
    nonfinite_steps: int = 0
    """Steps whose update was skipped because the loss or gradient was NaN or infinite."""
    finished: bool = False
    """The final evaluation ran and the final checkpoint holds its result."""
    scheduler: dict = field(default_factory=dict)
    """The learning-rate schedule's state (JSON, instead of a pickle)."""
    shape: dict = field(default_factory=dict)
    """`RunShape` as a mapping."""


def model_dir(path: str | Path) -> Path:
    """The Hugging Face model inside a checkpoint `step_N/` folder, or `path` itself."""
    path = Path(path)
    return path / "model" if (path / STATE_FILE).exists() else path


def saved_step(folder: str | Path) -> int | None:
    """The step a `step_N/` or `best/` folder was saved at (its completion marker), else None."""
    try:
        step = json.loads((Path(folder) / COMPLETE_FILE).read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_FILE).is_file() and (folder / STATE_FILE).is_file()


def _folders(run_dir: Path) -> list[tuple[int, str, Path]]:
    """(step, prefix, path) of every checkpoint-like folder in the run, complete or not."""
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _FOLDER.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(2)), match.group(1), path))
    return sorted(found)


def step_checkpoints(run_dir: Path) -> list[Path]:
    """Complete `step_N` checkpoints, oldest first."""
    return [path for step, prefix, path in _folders(run_dir) if prefix == "step" and is_complete(path)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = step_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def has_progress(run_dir: Path) -> bool:
    """Any complete checkpoint, including one left aside by an interrupted save."""
    return any(is_complete(path) for _, prefix, path in _folders(run_dir) if prefix != ".trash_step")


def legacy_checkpoints(run_dir: Path) -> list[Path]:
    """`step_N` folders without the marker: written by embtrain before saves were atomic (a
    `step_N` of this version always has it, since the folder gets its name only when complete)."""
    return [
        path for _, prefix, path in _folders(run_dir)
        if prefix == "step" and not is_complete(path) and (path / STATE_FILE).is_file()
    ]


def find_resume_point(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint, put back in place as `step_N` if an interrupted save left it
    as `.tmp_step_N` or `.old_step_N`; and a line for each folder passed over. Main process only."""
    notes: list[str] = []
    best: tuple[int, int, Path] | None = None
    rank = {"step": 2, ".tmp_step": 1, ".old_step": 0}  # at the same step: in place, new, old
    folders = _folders(run_dir)
    for step, prefix, path in folders:
        if prefix == ".trash_step":
            continue
        if not is_complete(path):
            notes.append(f"skipped {path.name}: incomplete (no {COMPLETE_FILE} marker; a save was interrupted)")
            continue
        if best is None or (step, rank[prefix]) > best[:2]:
            best = (step, rank[prefix], path)
    if best is None:
        return None, notes
    step, _, path = best
    final = run_dir / f"step_{step}"
    if path != final:
        if final.exists():
            _aside(final)
        path.rename(final)
        _sync_dir(run_dir)
        notes.append(f"recovered {final.name} from {path.name}, left complete by an interrupted save")
    for _, prefix, leftover in folders:  # temporary, set-aside and half-deleted folders of earlier saves
        if prefix != "step" and leftover != path and leftover.exists():
            shutil.rmtree(leftover)
    notes += _recover_best(run_dir)
    return final, notes


def _recover_best(run_dir: Path) -> list[str]:
    """`best/` back in place if a kill came between moving the old one aside and installing the new."""
    best, new, old = run_dir / "best", run_dir / ".tmp_best", run_dir / ".old_best"
    if best.exists():
        return []
    for candidate in (new, old):
        if is_marked(candidate):
            candidate.rename(best)
            return [f"recovered best/ from {candidate.name}, left by an interrupted save"]
    return []


def is_marked(folder: Path) -> bool:
    return (folder / COMPLETE_FILE).is_file()


def _sync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        _sync_dir(path)


def _sync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _aside(final: Path) -> None:
    """Move a checkpoint out of the way (kept until its replacement is in place)."""
    old = final.with_name(f".old_{final.name}")
    if old.exists():
        shutil.rmtree(old)  # a leftover of an earlier interrupted replacement: `final` is newer
    final.rename(old)


def _install(tmp: Path, final: Path) -> None:
    """Put a complete `tmp` in place of `final`, never deleting `final` first."""
    old = final.with_name(f".old_{final.name}")
    if final.exists():
        _aside(final)
    tmp.rename(final)
    _sync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _finish(tmp: Path, final: Path, step: int) -> None:
    _sync_tree(tmp)
    marker = tmp / COMPLETE_FILE
    with marker.open("w") as handle:
        handle.write(json.dumps({"step": step}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    _sync_dir(tmp)
    _install(tmp, final)


def save_checkpoint(
    accelerator: Accelerator, encoder: Encoder, state: TrainState, run_dir: Path, keep_last: int | None
) -> Path:
    final = run_dir / f"step_{state.step}"
    tmp = run_dir / f".tmp_step_{state.step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    full_state = accelerator.get_state_dict(encoder)  # collective when parameters are sharded
    accelerator.wait_for_everyone()  # every process has written its files (RNG states, shards)
    if accelerator.is_main_process:
        accelerator.unwrap_model(encoder).save_pretrained(tmp / "model", state_dict=full_state)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        _finish(tmp, final, state.step)
        if keep_last is not None:
            for old in step_checkpoints(run_dir)[:-keep_last]:
                trash = old.with_name(f".trash_{old.name}")  # renamed first: never a half-deleted step_N
                old.rename(trash)
                shutil.rmtree(trash)
    accelerator.wait_for_everyone()
    return final


def read_state(folder: Path) -> TrainState:
    try:
        data = json.loads((folder / STATE_FILE).read_text())
        return TrainState(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(f"{folder / STATE_FILE}: cannot read the training state: {exc}") from None


def load_checkpoint(accelerator: Accelerator, folder: Path, trainable_only: torch.nn.Module | None = None) -> TrainState:
    """Model, optimiser and RNG states from `folder`; refuses pickles other than the RNG states.
    `trainable_only`: the (prepared) encoder whose saved state is its trainable parameters alone
    (LoRA): the file must hold exactly those, and the frozen ones keep their base values."""
    state = read_state(folder)
    accelerate_dir = folder / "accelerate"
    unexpected = [p.name for p in accelerate_dir.glob("*.pkl") if not _SAFE_PICKLES.match(p.name)]
    if unexpected:
        raise RunError(
            f"{accelerate_dir}: unexpected pickle file(s) {sorted(unexpected)}; embtrain never writes them "
            "and will not load them (they can run code). Remove them if you trust their origin."
        )
    try:
        # Accelerate passes over RNG states it cannot read; a resume without them is not exact
        from accelerate.utils import load as weights_only_load

        for rng_file in accelerate_dir.glob("random_states_*.pkl"):
            weights_only_load(rng_file, weights_only=True)
        partial = {}
        if trainable_only is not None:
            from trainer.model.lora import check_trainable_checkpoint

            check_trainable_checkpoint(accelerate_dir / "model.safetensors", trainable_only)
            partial = {"strict": False}
        accelerator.load_state(str(accelerate_dir), load_kwargs={"weights_only": True}, **partial)
    except RunError:
        raise
    except Exception as exc:  # torch and safetensors raise many kinds for a damaged file
        raise RunError(f"{accelerate_dir}: cannot load the checkpoint: {type(exc).__name__}: {exc}") from None
    return state


LOSS_FILE = "loss.safetensors"
"""The loss's parameters in best/ (step_N folders keep them in accelerate/model_1.safetensors)."""


def save_best(
    encoder: Encoder, full_state: dict, run_dir: Path, metrics: dict[str, float], step: int,
    loss_state: dict | None = None,
) -> None:
    """Main process only: the model in Hugging Face format plus the metrics that made it best, and
    the loss's parameters (`loss.safetensors`: a learned projection, a temperature) when it has any."""
    tmp = run_dir / ".tmp_best"
    if tmp.exists():
        shutil.rmtree(tmp)
    encoder.save_pretrained(tmp, state_dict=full_state)
    if loss_state:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in loss_state.items()}, str(tmp / LOSS_FILE))
    (tmp / "metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
    _finish(tmp, run_dir / "best", step)
