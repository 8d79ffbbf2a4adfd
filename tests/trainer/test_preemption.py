"""SIGTERM / SIGUSR1 save a checkpoint and stop; --resume finishes the run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def write_recipe(tmp_path: Path, model: Path, pairs: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""run_name: pre
model: {{name_or_path: {model}, max_seq_length: 16}}
data:
  train: [{{kind: pairs, path: {pairs}}}]
  batch_size: 8
training: {{max_steps: 300}}
logging: {{log_every_steps: 1}}
checkpointing: {{output_dir: {tmp_path / 'runs'}}}
"""
    )
    return recipe


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_and_resume_finishes(tmp_path, tiny_model, pairs_file, sig):
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    metrics = tmp_path / "runs" / "pre" / "metrics.jsonl"
    command = [sys.executable, "-m", "trainer.cli", "train", str(recipe)]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-2000:]
    assert f"stopped by {sig.name} at step" in stderr
    saved = sorted((tmp_path / "runs" / "pre").glob("step_*"))
    assert len(saved) == 1
    stopped_at = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert 3 <= stopped_at < 300
    summary = json.loads((tmp_path / "runs" / "pre" / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["reason"] == sig.name and summary["step"] == stopped_at
    assert summary["checkpoint"] == str(saved[0])

    result = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from" in result.stdout and f"(step {stopped_at}," in result.stdout
    assert json.loads((tmp_path / "runs" / "pre" / "step_300" / "trainer_state.json").read_text())["step"] == 300
    summary = json.loads((tmp_path / "runs" / "pre" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed"] and summary["step"] == 300
