"""Resumable checkpoints: `<run>/step_<N>/` holds the Accelerate state (model, optimiser,
scheduler, RNG), the position in the data, and the model in Hugging Face format.

A checkpoint is written to a temporary folder and renamed when complete, so a crash while
saving never leaves a half-written `step_<N>` behind.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator

from trainer.model.encoder import Encoder

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def model_dir(path: str | Path) -> Path:
    """The Hugging Face model inside a checkpoint `step_N/` folder, or `path` itself."""
    path = Path(path)
    return path / "model" if (path / STATE_FILE).exists() else path


def step_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = []
    for path in run_dir.glob("step_*"):
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = step_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


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
    if accelerator.is_main_process:
        accelerator.unwrap_model(encoder).save_pretrained(tmp / "model", state_dict=full_state)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        _replace_dir(tmp, final)
        if keep_last is not None:
            for old in step_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, folder: Path) -> TrainState:
    accelerator.load_state(str(folder / "accelerate"))
    return TrainState(**json.loads((folder / STATE_FILE).read_text()))


def save_best(
    encoder: Encoder, full_state: dict, run_dir: Path, metrics: dict[str, float], step: int
) -> None:
    """Main process only: the model in Hugging Face format plus the metrics that made it best."""
    tmp = run_dir / ".tmp_best"
    if tmp.exists():
        shutil.rmtree(tmp)
    encoder.save_pretrained(tmp, state_dict=full_state)
    (tmp / "metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
    _replace_dir(tmp, run_dir / "best")
