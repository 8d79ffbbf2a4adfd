"""The benchmarks run (tiny settings): a bench that no longer runs is found here, not when numbers are due."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*command: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_peers_steps_every_kind_of_contestant_on_short_texts(tmp_path):
    out = tmp_path / "peers.json"
    run("bench/peers.py", "--data", "snli", "--batch-size", "8", "--max-seq-length", "32", "--steps", "1", "--warmup", "0",
        "--memory-steps", "1", "--chunk-size", "4", "--json", str(out), "--peak-tflops-fp32", "0.5",
        "--measure-peak", "--contestants", "embtrain", "embtrain-dropout", "embtrain-nopack", "embtrain-cached", "st-mnrl", "bare")
    report = json.loads(out.read_text())
    results = report["results"]["snli"]
    assert set(results) == {"embtrain", "embtrain-dropout", "embtrain-nopack", "embtrain-cached", "st-mnrl", "bare"}
    bf16_peak = float(report["settings"].split("bf16 ")[-1])  # measured: no bf16 peak was given
    assert "(bf16 measured" in report["settings"] and "fp32 0.5," in report["settings"] and bf16_peak > 0
    for name, result in results.items():
        assert result["seconds_per_step"] > 0 and result["peak_rss_mib"] > 0 and result["tokens_per_s"] > 0, name
        assert result["mfu"] == result["model_tflops_per_s"] / 0.5  # --peak-tflops-fp32 0.5
    flops = {name: r["model_tflops_per_s"] * r["seconds_per_step"] for name, r in results.items()}
    assert max(flops.values()) < 1.0001 * min(flops.values())  # the same texts: the same model FLOPs
    assert results["embtrain"]["padding_efficiency"] > results["embtrain-nopack"]["padding_efficiency"]  # packed


def test_gradcache_memory_runs_plain_and_cached_steps():
    done = run("bench/gradcache_memory.py", "--batch-sizes", "8", "--modes", "plain", "cached", "--chunk-size", "4",
               "--max-seq-length", "16")
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 8 |")]
    assert len(rows) == 2 and all("MiB" not in r and r.count("|") == 5 for r in rows), done.stdout
