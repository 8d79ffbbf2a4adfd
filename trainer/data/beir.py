"""Reading BEIR-format folders: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""

from __future__ import annotations

import codecs
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


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text with its line end) of every line of a UTF-8 file, a byte-order mark
    dropped. Each line is decoded on its own, so that a `DataError` names the exact line that is
    not UTF-8 (a text-mode file decodes ahead in blocks and cannot tell)."""
    try:
        handle = Path(path).open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}, line {line_no}: not UTF-8 text ({exc.reason} at byte {exc.start + 1})") from None


JSON_KINDS = {str: "text", bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
"""How a JSON value's type is named in messages."""


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a `DataError` names the file and line of
    the first that is not UTF-8, not JSON or not an object."""
    for line_no, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {line_no}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {line_no}: expected a JSON object, got {JSON_KINDS.get(type(row), 'null')}")
        yield line_no, row


def document_texts(path: Path) -> Iterator[str]:
    """The texts of a jsonl of documents: `title` (if any) and `text`, joined with a space; a
    `DataError` names the line of one without text."""
    for line_no, row in jsonl_rows(path):
        text = f"{row.get('title') or ''} {row.get('text') or ''}".strip()
        if not text:
            raise DataError(f"{path}, line {line_no}: no 'text'")
        yield text


class DistinctTexts:
    """Texts in first-seen order, each once, with its row: a corpus built from repeated texts."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.row_of: dict[str, int] = {}

    def add(self, text: str) -> int:
        """The text's row, added at the end when it is new."""
        if text not in self.row_of:
            self.row_of[text] = len(self.texts)
            self.texts.append(text)
        return self.row_of[text]


def _text(path: Path, line_no: int, row: dict, key: str) -> str:
    if key not in row:
        raise DataError(f"{path}, line {line_no}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{path}, line {line_no}: field '{key}' must be a string, got {value!r}")
    return value


def _id(path: Path, line_no: int, row: dict) -> str:
    value = row.get("_id")
    if value is None or value == "":
        raise DataError(f"{path}, line {line_no}: missing field '_id'")
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise DataError(f"{path}, line {line_no}: field '_id' must be a string or a whole number, got {value!r}")
    return str(value)


def read_corpus(path: Path) -> dict[str, str]:
    corpus = {}
    for line_no, row in jsonl_rows(path):
        doc_id = _id(path, line_no, row)
        text = _text(path, line_no, row, "text").strip()
        title = row.get("title")
        if title is not None and not isinstance(title, str):
            raise DataError(f"{path}, line {line_no}: field 'title' must be a string, got {title!r}")
        full = f"{(title or '').strip()} {text}".strip()
        if not full:
            raise DataError(f"{path}, line {line_no}: document {doc_id!r} has empty title and text")
        corpus[doc_id] = full
    if not corpus:
        raise DataError(f"{path}: no documents (the file is empty)")
    return corpus


def read_queries(path: Path) -> dict[str, str]:
    queries = {}
    for line_no, row in jsonl_rows(path):
        query_id = _id(path, line_no, row)
        text = _text(path, line_no, row, "text").strip()
        if not text:
            raise DataError(f"{path}, line {line_no}: query {query_id!r} has empty text")
        queries[query_id] = text
    if not queries:
        raise DataError(f"{path}: no queries (the file is empty)")
    return queries


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    reader = csv.reader((line for _, line in text_lines(path)), delimiter="\t")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: {exc}") from None
        line_no = reader.line_num
        if not row or (line_no == 1 and row[0] == "query-id"):
            continue
        if len(row) < 3 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}, line {line_no}: expected 'query-id<TAB>corpus-id<TAB>score'")
        try:
            score = int(float(row[2]))
        except (ValueError, OverflowError):
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
    qrels = read_qrels(qrels_path)  # first: it is small, and its problems show before the corpus is read
    if not qrels:
        raise DataError(f"{qrels_path}: no judgements (the file is empty or holds only its header)")
    if not any(score > 0 for docs in qrels.values() for score in docs.values()):
        raise DataError(
            f"{qrels_path}: no relevant judgements: every score is 0 or less, so nothing can be retrieved or trained on"
        )
    corpus = read_corpus(folder / "corpus.jsonl")
    queries = read_queries(folder / "queries.jsonl")
    for query_id, docs in qrels.items():
        if query_id not in queries:
            raise DataError(f"{qrels_path}: query id {query_id!r} is not in queries.jsonl")
        for doc_id in docs:
            if doc_id not in corpus:
                raise DataError(f"{qrels_path}: corpus id {doc_id!r} (query {query_id!r}) is not in corpus.jsonl")
    return BeirSet(corpus=corpus, queries=queries, qrels=qrels)
