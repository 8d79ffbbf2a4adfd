"""Read rows one at a time, each with where it came from, from any input `ingest` accepts.

Formats: jsonl, csv, tsv, parquet, a Hugging Face `datasets` folder (`save_to_disk`), or a BEIR
folder. A row that cannot be parsed (invalid JSON, wrong number of fields) is yielded as a
`BadRow` rather than raised, so the caller decides whether to drop it or stop. Nothing is read
into memory as a whole: files are streamed, parquet by record batches, datasets folders are
memory-mapped Arrow.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from trainer.data.beir import text_lines
from trainer.data.errors import DataError
from trainer.data.readers import FORMAT_OF_SUFFIX

FORMATS = ("auto", "jsonl", "csv", "tsv", "parquet", "hf", "beir")
_SUFFIXES = {**FORMAT_OF_SUFFIX, ".txt": "tsv"}


@dataclass
class Row:
    location: str
    """Where the row is, for messages: 'line 17', 'row 17', 'qrel 3 (query 12, document 77)'."""
    data: dict


@dataclass
class BadRow:
    location: str
    reason: str
    """A short code, counted in the manifest: invalid_json, wrong_field_count, ..."""
    message: str
    raw: str


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "corpus.jsonl").exists() and (path / "qrels").is_dir():
            return "beir"
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf"
        raise DataError(
            f"{path}: a folder, but neither a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) "
            "nor a datasets folder written by save_to_disk (dataset_info.json)"
        )
    if not path.exists():
        raise DataError(f"{path}: file not found")
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from '{path.suffix}'; pass --format jsonl|csv|tsv|parquet")
    return fmt


def read_rows(path: str | Path, fmt: str = "auto", split: str = "train") -> Iterator[Row | BadRow]:
    """Every row of the input, in order. `split`: the qrels file of a BEIR folder, or the split
    of a datasets folder holding several."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    path = Path(path)
    if fmt == "jsonl":
        return _jsonl(path)
    if fmt in ("csv", "tsv"):
        return _delimited(path, fmt)
    if fmt == "parquet":
        return _parquet(path)
    if fmt == "hf":
        return _saved_dataset(path, split)
    if fmt == "beir":
        return _beir(path, split)
    raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _jsonl(path: Path) -> Iterator[Row | BadRow]:
    for line_no, line in text_lines(path):
        if not line.strip():
            continue
        location = f"line {line_no}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield BadRow(location, "invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}", line.rstrip("\r\n"))
            continue
        if not isinstance(data, dict):
            yield BadRow(location, "not_an_object", "expected a JSON object", line.rstrip("\r\n"))
            continue
        yield Row(location, data)


def _delimited(path: Path, fmt: str) -> Iterator[Row | BadRow]:
    """csv: standard quoting; tsv: tabs only, no quoting (quotes are part of the text)."""
    csv.field_size_limit(sys.maxsize)
    options = {"delimiter": ","} if fmt == "csv" else {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    # lines keep their ends, so quoted line breaks reach csv as they are in the file
    reader = csv.reader((line for _, line in text_lines(path)), **options)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file") from None
    except csv.Error as exc:
        raise DataError(f"{path}, line 1: {exc}") from None
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise DataError(f"{path}, line 1: repeated column names in the header {header}")
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: {exc}") from None
        if not fields:
            continue
        location = f"line {reader.line_num}"
        if len(fields) != len(header):
            yield BadRow(
                location,
                "wrong_field_count",
                f"{len(fields)} fields, the header has {len(header)}"
                + ("; a text containing a tab?" if fmt == "tsv" else "; an unbalanced quote?"),
                ("\t" if fmt == "tsv" else ",").join(fields),
            )
            continue
        yield Row(location, dict(zip(header, fields)))


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: cannot read as parquet: {exc}") from None
    row_no = 0
    batches = parquet.iter_batches(batch_size=4096)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, ValueError, pa.ArrowException) as exc:  # a damaged row group shows only when read
            raise DataError(f"{path}, after row {row_no}: cannot read as parquet: {exc}") from None
        for data in batch.to_pylist():
            row_no += 1
            yield Row(f"row {row_no}", data)


def _saved_dataset(path: Path, split: str) -> Iterator[Row]:
    import datasets

    import pyarrow as pa

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:  # kinds datasets raises for a damaged folder
        raise DataError(f"{path}: cannot read as a datasets folder: {type(exc).__name__}: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (splits: {list(loaded)}); pass --split")
        loaded = loaded[split]
    row_no = 0
    for batch in loaded.iter(batch_size=1024):
        columns = list(batch)
        for i in range(len(batch[columns[0]]) if columns else 0):
            row_no += 1
            yield Row(f"row {row_no}", {c: batch[c][i] for c in columns})


def _beir(path: Path, split: str) -> Iterator[Row]:
    """One row per relevant qrel: query, positive (title and text). The folder is checked whole first."""
    from trainer.data.beir import read_beir

    beir = read_beir(path, split)
    for number, (query_id, doc_id) in enumerate(beir.relevant_pairs(), start=1):
        yield Row(
            f"qrels/{split}.tsv pair {number} (query {query_id}, document {doc_id})",
            {"query": beir.queries[query_id], "positive": beir.corpus[doc_id]},
        )
