"""Turn the recipe's training sources into one `TrainingSet`.

`pairs` sources are read with Hugging Face `datasets` (jsonl, csv, tsv, parquet) into a
memory-mapped Arrow table, with a column mapping; `beir` sources give one example per relevant
qrel; `texts` sources one example per distinct text (no positive). Every row is checked in one streaming pass, and problems are reported with the file and
row, before training starts.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from trainer.config import BeirSource, PairsSource, TextsSource, TrainSource
from trainer.data.beir import JSON_KINDS, jsonl_rows, read_beir, text_lines
from trainer.data.errors import DataError
from trainer.data.examples import Example
from trainer.data.training_set import TextKeys, TrainingSet, text_key
from trainer.progress import progress_bar
from trainer.schema import kind_of

READERS: dict[str, Callable[..., SourceTable]] = {}
"""The reader of each kind of training source: (source, num_negatives, index) -> SourceTable."""


def reads(cls: type) -> Callable:
    """Decorator: the function reads training sources of the kind `cls`."""

    def register(fn: Callable[..., SourceTable]) -> Callable[..., SourceTable]:
        READERS[kind_of(cls)] = fn
        return fn

    return register


_CHUNK = 4096
FORMAT_OF_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
TEXT_LINES_SUFFIX = ".txt"
"""A texts source's plain file: one text per line (format `txt`; blank lines are skipped)."""


def path_exists(pattern: str) -> bool:
    """A file, a folder, or a glob that matches at least one file."""
    return Path(pattern).exists() or bool(glob.glob(pattern))


def peek_columns(path: str, fmt: str) -> list[str] | None:
    """The column names of a pairs file from its first line or schema, without reading it;
    None when they cannot be told (an unknown format, an empty or unreadable file)."""
    import csv
    import json

    files = [path] if Path(path).is_file() else sorted(glob.glob(path))
    fmt = FORMAT_OF_SUFFIX.get(Path(path).suffix.lower()) if fmt == "auto" else fmt
    if not files or fmt is None:
        return None
    if fmt == "txt":
        return ["text"]
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(files[0]).names)
        with open(files[0], encoding="utf-8-sig", newline="") as handle:
            if fmt == "jsonl":
                first = next((line for line in handle if line.strip()), "")
                row = json.loads(first)
                return list(row) if isinstance(row, dict) else None
            return next(csv.reader(handle, delimiter="\t" if fmt == "tsv" else ","))
    except (OSError, ValueError, StopIteration):
        return None


def load_table(path: str, fmt: str, texts: bool = False):
    """A pairs file (or glob), or with `texts` a texts file, as a memory-mapped table. A file that cannot be read is a
    `DataError` naming the file and, where there is one, the line: `datasets` reports byte
    offsets or nothing useful, so a failed or empty read is followed by a scan that finds it."""
    import datasets

    if Path(path).is_dir():
        raise DataError(f"{path}: a folder; a pairs source reads a file (or a glob such as {path}/*.jsonl)")
    fmt = resolve_format(path, fmt, texts)
    files = matching_files(path)
    if not files:
        raise DataError(f"{path}: file not found")
    builder = {"jsonl": "json", "csv": "csv", "tsv": "csv", "parquet": "parquet", "txt": "text"}[fmt]
    kwargs = {"delimiter": "\t"} if fmt == "tsv" else {"encoding": "utf-8-sig"} if fmt == "txt" else {}
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parser logs byte offsets; the error below says more
    try:
        table = datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
    except Exception as exc:  # datasets wraps parser errors several levels deep
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        problem = first_problem(files, fmt)
        raise DataError(problem or f"{path}: cannot read as {fmt}: {type(cause).__name__}: {cause}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if len(table) == 0:
        raise DataError(first_problem(files, fmt) or f"{path}: no rows")
    return table


def utf8_problem(path: str | Path) -> str | None:
    """The file and line of the first line of `path` that is not UTF-8 text; None if all are."""
    try:
        for _ in text_lines(Path(path)):
            pass
    except DataError as exc:
        return str(exc)
    return None


def resolve_format(path: str, fmt: str, texts: bool = False) -> str:
    """The format of a source's file; `texts`: a texts source, which also reads `.txt` files."""
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    if texts and suffix == TEXT_LINES_SUFFIX:
        return "txt"
    if suffix not in FORMAT_OF_SUFFIX:
        formats = "jsonl|csv|tsv|parquet" + ("|txt" if texts else "")
        raise DataError(f"{path}: cannot tell the format from '{suffix}'; set format: {formats}")
    return FORMAT_OF_SUFFIX[suffix]


def matching_files(path: str) -> list[Path]:
    """The file, or the files a glob matches, in order."""
    if Path(path).is_file():
        return [Path(path)]
    return [Path(f) for f in sorted(glob.glob(path)) if Path(f).is_file()]


def first_problem(files: list[Path], fmt: str) -> str | None:
    """The first thing in `files` that keeps them from being read as `fmt`, with its file and line:
    not UTF-8, invalid JSON, a line that is not an object, a field whose JSON type changes, a csv
    syntax error, or no rows at all. None when nothing is found."""
    if fmt == "txt":
        for path in files:
            problem = utf8_problem(path)
            if problem:
                return problem
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for path in files:
            try:
                if pq.read_metadata(path).num_rows == 0:
                    return f"{path}: no rows"
            except (OSError, ValueError):  # not parquet at all: the reader's own message says so
                return None
        return None
    for path in files:
        problem = _jsonl_problem(path) if fmt == "jsonl" else _delimited_problem(path, fmt)
        if problem:
            return problem
    return None


def _jsonl_problem(path: Path) -> str | None:
    first_kind: dict[str, tuple[str, int]] = {}
    rows = 0
    try:
        for line_no, row in jsonl_rows(path):
            rows += 1
            for key, value in row.items():
                if value is None:
                    continue
                kind = JSON_KINDS[type(value)]
                seen = first_kind.setdefault(key, (kind, line_no))
                if seen[0] != kind:
                    return f"{path}, line {line_no}: field '{key}' is {kind}, but on line {seen[1]} it is {seen[0]}"
    except DataError as exc:
        return str(exc)
    return None if rows else f"{path}: no rows (the file is empty)"


def _delimited_problem(path: Path, fmt: str) -> str | None:
    import csv

    reader = csv.reader((line for _, line in text_lines(path)), delimiter="\t" if fmt == "tsv" else ",", strict=True)
    header: list[str] | None = None
    rows, start = 0, 1
    try:
        for row in reader:
            start = reader.line_num + 1
            if not row:
                continue
            if header is None:
                header = row
                continue
            rows += 1
            if len(row) > len(header):
                return f"{path}, line {reader.line_num}: {len(row)} fields, the header has {len(header)}"
    except DataError as exc:
        return str(exc)
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            return f"{path}, line {start}: a quoted field is never closed (a stray double quote?)"
        return f"{path}, line {reader.line_num}: {exc}"
    if header is None:
        return f"{path}: no rows (the file is empty)"
    return None if rows else f"{path}: only a header line ({', '.join(header)}), no rows"


def _check_text(path: str, row: int, column: str, value: object) -> str:
    if not isinstance(value, str):
        kind = "missing" if value is None else f"not text ({type(value).__name__} {value!r})"
        raise DataError(f"{path}, row {row}: column '{column}' is {kind}")
    if not value.strip():
        raise DataError(f"{path}, row {row}: column '{column}' is empty")
    return value


def _check_scores(path: str, row: int, column: str, scores: object, needed: int) -> None:
    """A list of at least `needed` finite numbers: the positive's score, then each negative's."""
    import math

    if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise DataError(f"{path}, row {row}: column '{column}' must be a list of numbers, got {scores!r}")
    if len(scores) < needed:
        raise DataError(
            f"{path}, row {row}: column '{column}' has {len(scores)} scores; the positive and {needed - 1} hard "
            f"negative(s) need {needed}"
        )
    if not all(math.isfinite(s) for s in scores[:needed]):
        raise DataError(f"{path}, row {row}: column '{column}' holds a NaN or infinite score: {scores!r}")


@dataclass
class SourceTable:
    """One source as an Arrow table with columns query, positive[, negatives], checked, and its keys."""

    table: object
    keys: TextKeys
    num_negatives: int


@reads(PairsSource)
def read_pairs(source: PairsSource, num_negatives: int | None, index: int = 0) -> SourceTable:
    table = load_table(source.path, source.format)
    columns = {"query": source.query_column, "positive": source.positive_column}
    if source.negatives_column is not None:
        columns["negatives"] = source.negatives_column
    if source.teacher_scores_column is not None:
        columns["teacher_scores"] = source.teacher_scores_column
    for column in columns.values():
        if column not in table.column_names:
            raise DataError(
                f"{source.path}: missing column '{column}' (columns: {table.column_names}); "
                "map yours with query_column / positive_column / negatives_column / teacher_scores_column"
            )
    if len(set(columns.values())) != len(columns):
        raise DataError(
            f"{source.path}: query_column, positive_column, negatives_column and teacher_scores_column must be "
            "different columns"
        )
    table = table.select_columns(list(columns.values()))
    if source.max_examples is not None:
        table = table.select(range(min(source.max_examples, len(table))))
    # in two steps, so that a mapping such as query_column: positive cannot collide
    table = table.rename_columns({original: f"__{name}" for name, original in columns.items()})
    table = table.rename_columns({f"__{name}": name for name in columns})
    try:
        return _scan(table, source.path, columns, num_negatives, index)
    except UnicodeDecodeError:  # the JSON reader keeps bytes that are not UTF-8 until a row is read
        problem = first_problem(matching_files(source.path), resolve_format(source.path, source.format))
        raise DataError(problem or f"{source.path}: not UTF-8 text") from None


def _scan(table, name: str, columns: dict[str, str], num_negatives: int | None, index: int) -> SourceTable:
    """Check every row (streaming, in chunks) and hash its texts for the sampler."""
    size = len(table)
    query = np.empty(size, dtype=np.int64)
    positive = np.empty(size, dtype=np.int64)
    negative_lists: list[list[int]] = []
    counts: set[int] = set()
    has_negatives = "negatives" in columns
    progress = progress_bar(total=size, desc=f"checking {name}", unit=" rows", hide=size < 200_000, leave=False)
    for start in range(0, size, _CHUNK):
        chunk = table[start : start + _CHUNK]
        progress.update(len(chunk["query"]))
        for j, (q, p) in enumerate(zip(chunk["query"], chunk["positive"])):
            row = start + j + 1
            query[start + j] = text_key(_check_text(name, row, columns["query"], q))
            positive[start + j] = text_key(_check_text(name, row, columns["positive"], p))
            if not has_negatives:
                continue
            raw = chunk["negatives"][j]
            if not isinstance(raw, list):
                raise DataError(f"{name}, row {row}: column '{columns['negatives']}' must be a list of texts, got {raw!r}")
            if num_negatives is not None and len(raw) < num_negatives:
                raise DataError(f"{name}, row {row}: has {len(raw)} hard negatives, data.num_negatives is {num_negatives}")
            kept = raw if num_negatives is None else raw[:num_negatives]
            negative_lists.append(
                [text_key(_check_text(name, row, f"{columns['negatives']}[{i}]", n)) for i, n in enumerate(kept)]
            )
            counts.add(len(kept))
        if "teacher_scores" in columns:
            for j, scores in enumerate(chunk["teacher_scores"]):
                _check_scores(name, start + j + 1, columns["teacher_scores"], scores, 1 + (len(negative_lists[start + j]) if has_negatives else 0))
    progress.close()
    if len(counts) > 1:
        raise DataError(
            f"{name}: rows have different numbers of hard negatives ({sorted(counts)}); "
            "set data.num_negatives to use the first N of each"
        )
    width = counts.pop() if counts else 0
    if num_negatives is not None and not has_negatives and num_negatives > 0:
        raise DataError(f"{name}: data.num_negatives is {num_negatives} but the source has no negatives column")
    negatives = np.array(negative_lists, dtype=np.int64).reshape(size, width) if has_negatives else np.empty((size, 0), np.int64)
    keys = TextKeys(query, positive, negatives, np.full(size, index, dtype=np.int32))
    return SourceTable(table, keys, width)


@reads(BeirSource)
def read_beir_pairs(source: BeirSource, num_negatives: int | None, index: int = 0) -> SourceTable:
    import datasets

    if num_negatives:
        raise DataError(f"{source.path}: data.num_negatives is {num_negatives}, but a beir source has no hard negatives")
    beir = read_beir(source.path, source.split)
    rows = {"query": [], "positive": []}
    for query_id, doc_id in beir.relevant_pairs(source.min_score):
        rows["query"].append(beir.queries[query_id])
        rows["positive"].append(beir.corpus[doc_id])
    if not rows["query"]:
        raise DataError(
            f"{Path(source.path) / 'qrels' / f'{source.split}.tsv'}: no judgement scores at least min_score {source.min_score}"
        )
    if source.max_examples is not None:
        rows = {k: v[: source.max_examples] for k, v in rows.items()}
    table = datasets.Dataset.from_dict(rows)
    return _scan(table, source.path, {"query": "query", "positive": "positive"}, None, index)


@reads(TextsSource)
def read_texts(source: TextsSource, num_negatives: int | None, index: int = 0) -> SourceTable:
    """Every text of every text column, row-major, each distinct text once (its first place)."""
    import datasets

    if source.format == "stsb":
        from trainer.config import STSEvalConfig
        from trainer.evaluation.sts import read_sts

        first, second, _ = read_sts(STSEvalConfig(kind="sts", name=source.path, path=source.path, format="stsb"))
        table = datasets.Dataset.from_dict({"query": [t for pair in zip(first, second) for t in pair]})
        columns = ["sentence1", "sentence2"]
    else:
        table = load_table(source.path, source.format, texts=True)
        columns = list(source.text_columns)
        wanted = columns + ([source.title_column] if source.title_column else [])
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise DataError(
                f"{source.path}: missing column '{missing[0]}' (columns: {table.column_names}); "
                "name yours with text_columns / title_column"
            )
        table = table.map(
            _texts_of_rows, batched=True, remove_columns=table.column_names,
            fn_kwargs={"columns": columns, "title": source.title_column}, desc=f"texts of {source.path}",
        )
    try:
        return _scan_texts(table, source, columns, index)
    except UnicodeDecodeError:
        problem = first_problem(matching_files(source.path), resolve_format(source.path, source.format, texts=True))
        raise DataError(problem or f"{source.path}: not UTF-8 text") from None


def _texts_of_rows(rows: dict[str, list], columns: list[str], title: str | None) -> dict[str, list]:
    """A batch of rows to one text per (row, column), row-major; a title goes before its text."""
    texts = []
    for i in range(len(rows[columns[0]])):
        for column in columns:
            text = rows[column][i]
            if title is not None and isinstance(text, str) and isinstance(rows[title][i], str):
                text = f"{rows[title][i].strip()} {text}".strip()
            texts.append(text)
    return {"query": texts}


def _scan_texts(table, source: TextsSource, columns: list[str], index: int) -> SourceTable:
    """Check every text (the error names its row and column), drop repeated texts (and the blank
    lines of a txt file), take max_examples."""
    lines = source.format != "stsb" and resolve_format(source.path, source.format, texts=True) == "txt"
    keys = np.empty(len(table), dtype=np.int64)
    blank = np.zeros(len(table), dtype=bool)
    for start in range(0, len(table), _CHUNK):
        for j, text in enumerate(table[start : start + _CHUNK]["query"]):
            position = start + j
            if lines and not text.strip():
                blank[position] = True
                continue
            row, column = position // len(columns) + 1, columns[position % len(columns)]
            keys[position] = text_key(_check_text(source.path, row, column, text))
    kept = np.flatnonzero(~blank)
    _, first = np.unique(keys[kept], return_index=True)
    first = kept[first]
    if first.size == 0:
        raise DataError(f"{source.path}: no texts (every line is blank)")
    first.sort()
    if source.max_examples is not None:
        first = first[: source.max_examples]
    if len(first) < len(table):
        table = table.select(first)
    keys = keys[first]
    text_keys = TextKeys(keys, keys.copy(), np.empty((len(keys), 0), np.int64), np.full(len(keys), index, dtype=np.int32))
    return SourceTable(table, text_keys, 0)


def read_source(source: TrainSource, num_negatives: int | None = None, index: int = 0) -> SourceTable:
    part = READERS[source.kind](source, num_negatives, index)
    if len(part.keys) == 0:
        raise DataError(f"{source.path}: no training examples")
    return part


def read_examples(source: TrainSource) -> list[Example]:
    """A whole (small) source as a list, for tools; training reads lazily through `TrainingSet`."""
    part = read_source(source)
    return list(TrainingSet([part.table], part.keys, part.num_negatives))


def read_training_data(sources: list[TrainSource], num_negatives: int | None) -> TrainingSet:
    """All sources, concatenated, each with exactly `num_negatives` hard negatives."""
    parts = [read_source(source, num_negatives, index) for index, source in enumerate(sources)]
    counts = {p.num_negatives for p, s in zip(parts, sources) if s.kind != "texts"}  # single texts have none
    if len(counts) > 1:
        raise DataError(f"training sources have different numbers of hard negatives ({sorted(counts)}); set data.num_negatives")
    return TrainingSet([p.table for p in parts], TextKeys.concatenate([p.keys for p in parts]), counts.pop() if counts else 0)
