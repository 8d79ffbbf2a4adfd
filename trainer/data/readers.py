"""Turn a training source from the recipe into a list of `Example`s.

`pairs` sources are read with Hugging Face `datasets` (jsonl, csv, tsv, parquet) and a
column mapping; `beir` sources give one example per relevant qrel. Every row is checked,
and problems are reported with the file and row, before training starts.
"""

from __future__ import annotations

import glob
from pathlib import Path

from trainer.config import BeirSource, PairsSource, TrainSource
from trainer.data.beir import read_beir
from trainer.data.errors import DataError
from trainer.data.examples import Example

_BUILDERS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


def path_exists(pattern: str) -> bool:
    """A file, a folder, or a glob that matches at least one file."""
    return Path(pattern).exists() or bool(glob.glob(pattern))


def read_source(source: TrainSource) -> list[Example]:
    if isinstance(source, PairsSource):
        examples = read_pairs(source)
    elif isinstance(source, BeirSource):
        examples = read_beir_pairs(source)
    else:  # pragma: no cover - the schema only builds the kinds above
        raise TypeError(f"unknown source {source!r}")
    if source.max_examples is not None:
        examples = examples[: source.max_examples]
    if not examples:
        raise DataError(f"{source.path}: no training examples")
    return examples


def load_table(path: str, fmt: str):
    import datasets

    if fmt == "auto":
        suffix = Path(path).suffix.lower()
        if suffix not in _BUILDERS:
            raise DataError(f"{path}: cannot tell the format from '{suffix}'; set format: jsonl|csv|tsv|parquet")
        fmt = _BUILDERS[suffix]
    if not path_exists(path):
        raise DataError(f"{path}: file not found")
    builder = {"jsonl": "json", "csv": "csv", "tsv": "csv", "parquet": "parquet"}[fmt]
    kwargs = {"delimiter": "\t"} if fmt == "tsv" else {}
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
    except Exception as exc:  # datasets wraps parser errors several levels deep
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise DataError(f"{path}: cannot read as {fmt}: {type(cause).__name__}: {cause}") from None


def _check_text(path: str, row: int, column: str, value: object) -> str:
    if not isinstance(value, str):
        kind = "missing" if value is None else f"not text ({type(value).__name__} {value!r})"
        raise DataError(f"{path}, row {row}: column '{column}' is {kind}")
    if not value.strip():
        raise DataError(f"{path}, row {row}: column '{column}' is empty")
    return value


def read_pairs(source: PairsSource) -> list[Example]:
    table = load_table(source.path, source.format)
    wanted = [source.query_column, source.positive_column]
    if source.negatives_column is not None:
        wanted.append(source.negatives_column)
    for column in wanted:
        if column not in table.column_names:
            raise DataError(
                f"{source.path}: missing column '{column}' (columns: {table.column_names}); "
                "map yours with query_column / positive_column / negatives_column"
            )
    examples = []
    for index, row in enumerate(table.select_columns(wanted)):
        row_no = index + 1
        query = _check_text(source.path, row_no, source.query_column, row[source.query_column])
        positive = _check_text(source.path, row_no, source.positive_column, row[source.positive_column])
        negatives: tuple[str, ...] = ()
        if source.negatives_column is not None:
            raw = row[source.negatives_column]
            if not isinstance(raw, list):
                raise DataError(
                    f"{source.path}, row {row_no}: column '{source.negatives_column}' must be a list of texts, got {raw!r}"
                )
            negatives = tuple(
                _check_text(source.path, row_no, f"{source.negatives_column}[{i}]", n) for i, n in enumerate(raw)
            )
        examples.append(Example(query, positive, negatives))
    return examples


def read_beir_pairs(source: BeirSource) -> list[Example]:
    beir = read_beir(source.path, source.split)
    examples = []
    for query_id, docs in beir.qrels.items():
        for doc_id, score in docs.items():
            if score >= source.min_score:
                examples.append(Example(beir.queries[query_id], beir.corpus[doc_id]))
    return examples


def select_negatives(examples: list[Example], num_negatives: int | None, name: str) -> list[Example]:
    """Give every example the same number of hard negatives, or say which row cannot."""
    if num_negatives is None:
        counts = {len(e.negatives) for e in examples}
        if len(counts) > 1:
            raise DataError(
                f"{name}: rows have different numbers of hard negatives ({sorted(counts)}); "
                "set data.num_negatives to use the first N of each"
            )
        return examples
    out = []
    for row, example in enumerate(examples, start=1):
        if len(example.negatives) < num_negatives:
            raise DataError(
                f"{name}, row {row}: has {len(example.negatives)} hard negatives, data.num_negatives is {num_negatives}"
            )
        out.append(Example(example.query, example.positive, example.negatives[:num_negatives]))
    return out


def read_training_data(sources: list[TrainSource], num_negatives: int | None) -> list[Example]:
    """All sources, concatenated, each with exactly `num_negatives` hard negatives."""
    examples: list[Example] = []
    for index, source in enumerate(sources):
        rows = select_negatives(read_source(source), num_negatives, source.name or source.path)
        examples += [Example(e.query, e.positive, e.negatives, index) for e in rows]
    counts = {len(e.negatives) for e in examples}
    if len(counts) > 1:
        raise DataError(f"training sources have different numbers of hard negatives ({sorted(counts)}); set data.num_negatives")
    return examples
