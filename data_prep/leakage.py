"""Remove training rows whose query also occurs in an evaluation set (test-set leakage).

    embtrain prep leakage --train data/pairs.jsonl --eval-beir data/scifact --split test \\
        --out data/pairs.clean.jsonl

Queries are compared after normalisation (Unicode NFKC, case folding, punctuation removed,
whitespace collapsed), so "What is X?" and "what is x" count as the same query. Writes the
kept rows (all columns) as jsonl, and `<out>.manifest.json` with the removed rows' line numbers.
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path

from data_prep.output import check_output, tool_main, write_jsonl
from trainer.config import STSEvalConfig
from trainer.data.beir import read_queries, read_qrels
from trainer.data.errors import DataError
from trainer.data.readers import load_table

_PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)
_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACES.sub(" ", _PUNCTUATION.sub(" ", text)).strip()


def beir_eval_queries(folder: str, split: str) -> dict[str, str]:
    """The normalised texts of the queries judged in qrels/<split>.tsv, each with where it is."""
    root = Path(folder)
    queries = read_queries(root / "queries.jsonl")
    judged = read_qrels(root / "qrels" / f"{split}.tsv")
    missing = [q for q in judged if q not in queries]
    if missing:
        raise DataError(f"{root}: qrels/{split}.tsv names queries not in queries.jsonl, e.g. {missing[0]!r}")
    return {normalise(queries[q]): f"{folder} {split} query {q}" for q in judged}


def sts_eval_sentences(path: str) -> dict[str, str]:
    """The normalised sentences of an STS file, each with where it is."""
    from trainer.evaluation.sts import read_sts

    try:
        first, second, _ = read_sts(STSEvalConfig(kind="sts", name="sts", path=path))
    except DataError as exc:
        raise DataError(f"--eval-sts {exc}") from None
    return {normalise(t): f"{path} pair {i % len(first) + 1}" for i, t in enumerate(first + second)}


def find_leaks(rows: list[dict], query_column: str, evaluation: dict[str, str]) -> list[int]:
    """0-based indices of rows whose query is in the evaluation set."""
    return [i for i, row in enumerate(rows) if normalise(str(row[query_column])) in evaluation]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, help="training rows: jsonl, csv, tsv or parquet")
    parser.add_argument("--query-column", default="query")
    parser.add_argument("--eval-beir", action="append", default=[], help="BEIR folder whose queries must not leak")
    parser.add_argument("--split", default="test", help="qrels split of --eval-beir (default: test)")
    parser.add_argument("--eval-sts", action="append", default=[], help="STS Benchmark file whose sentences must not leak")
    parser.add_argument("--out", required=True, help="cleaned jsonl")
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    if not args.eval_beir and not args.eval_sts:
        raise DataError("give at least one --eval-beir FOLDER or --eval-sts FILE")
    out = check_output(args.out, args.overwrite)
    evaluation: dict[str, str] = {}
    for folder in args.eval_beir:
        evaluation |= beir_eval_queries(folder, args.split)
    for path in args.eval_sts:
        evaluation |= sts_eval_sentences(path)
    table = load_table(args.train, "auto")
    if args.query_column not in table.column_names:
        raise DataError(f"{args.train}: missing column '{args.query_column}' (columns: {table.column_names})")
    rows = table.to_list()
    leaks = set(find_leaks(rows, args.query_column, evaluation))
    kept = [row for i, row in enumerate(rows) if i not in leaks]
    manifest = {
        "tool": "embtrain prep leakage",
        "train": args.train,
        "evaluation": {"beir": args.eval_beir, "split": args.split, "sts": args.eval_sts},
        "rows_in": len(rows),
        "removed_rows": sorted(i + 1 for i in leaks),
        "row_numbering": "1-based: the first row of --train is row 1",
    }
    write_jsonl(kept, out, manifest)
    print(f"removed {len(leaks)} of {len(rows)} rows whose query occurs in the evaluation data; wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main("python -m data_prep.leakage", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
