"""Seconds per optimiser step of whole recipes, side by side on one machine.

Each recipe runs through `embtrain train` itself (the real loop, data, loss and optimiser) for
`--steps` steps with evaluation and the best-model copy turned off, in a fresh process, one
after the other, so that the recipes share the machine's state and nothing else runs with them.
The first `--warmup` steps are left out; the step time is read from the run's `metrics.jsonl`
(logged every step). Runs go to a temporary folder that is removed afterwards.

    python bench/recipe_step_time.py recipes/quickstart.yaml recipes/literature/gte/stage2.yaml recipes/literature/gist.yaml
    python bench/recipe_step_time.py recipes/quickstart.yaml --steps 12 --warmup 2 --json

Compare recipes in one call: the same recipe measured on another day, or next to other work,
can differ by more than the recipes do. A recipe may carry its own overrides after `::`, e.g.
`recipes/quickstart_lora.yaml::model.lora.dropout=0.0`. The peak resident memory of each run's
process is reported too (Linux and macOS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_times(metrics_file: Path, batch_size: int, warmup: int) -> list[float]:
    """Seconds of each logged step after the warm-up, from the pairs-per-second the loop logs."""
    times = []
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        if "pairs_per_s" in row and row["step"] > warmup and row["pairs_per_s"] > 0:
            times.append(batch_size / row["pairs_per_s"])
    return times


def measure(entry: str, steps: int, warmup: int, extra: list[str], output_dir: Path, index: int = 0) -> dict:
    sys.path.insert(0, str(ROOT))
    from trainer.config import load_recipe

    recipe, *own = entry.split("::")
    name = f"{index}-{Path(recipe).stem}"
    overrides = [
        f"run_name=bench-{name}",
        f"checkpointing.output_dir={output_dir}",
        "checkpointing.save_best=false",
        "checkpointing.keep_last=1",
        f"training.max_steps={steps + warmup}",
        "evaluation.at_start=false",
        "evaluation.at_end=false",
        "logging.log_every_steps=1",
        "logging.report_to=[]",
        *extra,
        *own,
    ]
    batch_size = load_recipe(recipe, overrides).data.batch_size
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", recipe, *overrides],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        return {"recipe": entry, "error": output.strip().splitlines()[-1] if output.strip() else f"exit {process.returncode}"}
    times = step_times(output_dir / f"bench-{name}" / "metrics.jsonl", batch_size, warmup)
    peak_kb = usage.ru_maxrss // (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux
    return {
        "recipe": entry,
        "peak_rss_gb": round(peak_kb / 1024**2, 2),
        "steps": len(times),
        "s_per_step_median": round(statistics.median(times), 3),
        "s_per_step_min": round(min(times), 3),
        "s_per_step_max": round(max(times), 3),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per recipe")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every recipe")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    with tempfile.TemporaryDirectory(prefix="embtrain-bench-") as tmp:
        results = [measure(recipe, args.steps, args.warmup, args.set, Path(tmp), i) for i, recipe in enumerate(args.recipes)]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'recipe':60} {'s/step (median)':>16} {'min':>8} {'max':>8} {'steps':>6} {'peak RSS GB':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['recipe']:60} error: {r['error']}")
        else:
            print(f"{r['recipe']:60} {r['s_per_step_median']:>16.2f} {r['s_per_step_min']:>8.2f} "
                  f"{r['s_per_step_max']:>8.2f} {r['steps']:>6} {r['peak_rss_gb']:>12.2f}")


if __name__ == "__main__":
    main()
