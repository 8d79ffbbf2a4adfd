"""SIGKILL a CPU training run at random moments (steps, saves, start-up) and resume until done:
the final weights equal an uninterrupted run's, bit for bit. `bench/kill_resume.py` is the long
version (50 kills on MiniLM and SciFact)."""

import importlib.util
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("kill_resume", ROOT / "bench" / "kill_resume.py")
kill_resume = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kill_resume)


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_model, pairs_file):
    recipe = kill_resume.write_recipe(tmp_path, str(tiny_model), str(pairs_file), steps=40, batch_size=8, max_seq_length=16)
    subprocess.run(kill_resume.command(recipe, "run_name=reference"), cwd=ROOT, check=True, capture_output=True, timeout=300)
    counts = kill_resume.kill_until_done(
        recipe, tmp_path / "runs" / "run", kills=4, seed=1, max_delay_s=8.0, save_jitter_s=0.005, log=lambda _: None
    )
    assert counts["kills"] == 4 and counts["inside_save"] >= 1
    result = kill_resume.compare(tmp_path / "runs" / "reference", tmp_path / "runs" / "run")
    assert result["same_state"] and result["bit_identical_weights"], result
