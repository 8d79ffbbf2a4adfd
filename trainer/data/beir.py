"""Reading BEIR-format folders: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from trainer.data.errors import DataError


@dataclass
class BeirSet:
    corpus: dict[str, str]
    """Document id to text (title and body joined by a space)."""
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    """Query id to {document id: relevance}."""

    def relevant_pairs(self, min_score: int = 1) -> Iterator[tuple[str, str]]:
        """(query id, document id) of every qrel scoring at least `min_score`, in file order."""
        for query_id, docs in self.qrels.items():
            for doc_id, score in docs.items():
                if score >= min_score:
                    yield query_id, doc_id


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    with handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {line_no}: invalid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {line_no}: expected a JSON object")
            yield line_no, row


def _text(path: Path, line_no: int, row: dict, key: str) -> str:
    if key not in row:
        raise DataError(f"{path}, line {line_no}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{path}, line {line_no}: field '{key}' must be a string, got {value!r}")
    return value


def read_corpus(path: Path) -> dict[str, str]:
    corpus = {}
    for line_no, row in jsonl_rows(path):
        doc_id = str(row.get("_id", ""))
        if not doc_id:
            raise DataError(f"{path}, line {line_no}: missing field '_id'")
        text = _text(path, line_no, row, "text").strip()
        title = str(row.get("title") or "").strip()
        full = f"{title} {text}".strip()
        if not full:
            raise DataError(f"{path}, line {line_no}: document {doc_id!r} has empty title and text")
        corpus[doc_id] = full
    return corpus


def read_queries(path: Path) -> dict[str, str]:
    queries = {}
    for line_no, row in jsonl_rows(path):
        query_id = str(row.get("_id", ""))
        if not query_id:
            raise DataError(f"{path}, line {line_no}: missing field '_id'")
        text = _text(path, line_no, row, "text").strip()
        if not text:
            raise DataError(f"{path}, line {line_no}: query {query_id!r} has empty text")
        queries[query_id] = text
    return queries


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    try:
        handle = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    qrels: dict[str, dict[str, int]] = {}
    with handle:
        reader = csv.reader(handle, delimiter="\t")
        for line_no, row in enumerate(reader, start=1):
            if not row or (line_no == 1 and row[0] == "query-id"):
                continue
            if len(row) < 3:
                raise DataError(f"{path}, line {line_no}: expected 'query-id<TAB>corpus-id<TAB>score'")
            try:
                score = int(float(row[2]))
            except ValueError:
                raise DataError(f"{path}, line {line_no}: score {row[2]!r} is not a number") from None
            qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def read_beir(folder: str | Path, split: str) -> BeirSet:
    """Read a BEIR folder; every qrels id must resolve to a query and a document."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: BEIR folder not found")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        found = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise DataError(f"{qrels_path}: no qrels for split {split!r} (found: {found})")
    corpus = read_corpus(folder / "corpus.jsonl")
    queries = read_queries(folder / "queries.jsonl")
    qrels = read_qrels(qrels_path)
    for query_id, docs in qrels.items():
        if query_id not in queries:
            raise DataError(f"{qrels_path}: query id {query_id!r} is not in queries.jsonl")
        for doc_id in docs:
            if doc_id not in corpus:
                raise DataError(f"{qrels_path}: corpus id {doc_id!r} (query {query_id!r}) is not in corpus.jsonl")
    return BeirSet(corpus=corpus, queries=queries, qrels=qrels)
