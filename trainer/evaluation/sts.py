"""STS evaluation: Spearman correlation of cosine similarity with gold scores."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from trainer.config import STSEvalConfig
from trainer.data.errors import DataError
from trainer.evaluation.sharded import TextEncoder


def read_sts(config: STSEvalConfig) -> tuple[list[str], list[str], list[float]]:
    path = Path(config.path)
    if not path.exists():
        raise DataError(f"{path}: STS file not found")
    s1, s2, scores = [], [], []
    if config.format == "stsb":
        # genre, file, year, id, score, sentence1, sentence2 [, extra]; tabs, no quoting
        with path.open("rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}, line {line_no}: not UTF-8 text ({exc.reason})") from None
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) < 7:
                    raise DataError(f"{path}, line {line_no}: expected at least 7 tab-separated fields")
                try:
                    scores.append(float(parts[4]))
                except ValueError:
                    raise DataError(f"{path}, line {line_no}: score {parts[4]!r} is not a number") from None
                s1.append(parts[5])
                s2.append(parts[6])
        if not scores:
            raise DataError(f"{path}: no sentence pairs (the file is empty)")
        return s1, s2, scores
    try:
        if config.format == "jsonl":
            table = pd.read_json(path, lines=True)
        else:
            table = pd.read_csv(path, sep="\t" if config.format == "tsv" else ",", quoting=csv.QUOTE_MINIMAL)
    except (ValueError, pd.errors.ParserError) as exc:  # not UTF-8, bad JSON or csv, empty
        from trainer.data.readers import first_problem

        problem = first_problem([path], config.format)  # names the line
        raise DataError(problem or f"{path}: cannot read as {config.format}: {str(exc).splitlines()[0]}") from None
    if table.empty:
        raise DataError(f"{path}: no rows, no sentence pairs")
    for column in (config.sentence1_column, config.sentence2_column, config.score_column):
        if column not in table.columns:
            raise DataError(f"{path}: missing column '{column}' (columns: {list(table.columns)})")
    return (
        table[config.sentence1_column].astype(str).tolist(),
        table[config.sentence2_column].astype(str).tolist(),
        table[config.score_column].astype(float).tolist(),
    )


def spearman(a: list[float], b: list[float]) -> float:
    return float(pd.Series(a).corr(pd.Series(b), method="spearman"))


class STSEvaluator:
    def __init__(self, config: STSEvalConfig) -> None:
        self.config = config
        self.sentences1, self.sentences2, self.scores = read_sts(config)

    def __call__(self, encoder: TextEncoder) -> dict[str, float]:
        # STS pairs are symmetric: both sides are encoded as queries (with the query prompt)
        options = {"is_query": True, "batch_size": self.config.batch_size, "prompt": self.config.query_prompt}
        e1 = encoder.encode(self.sentences1, **options)
        e2 = encoder.encode(self.sentences2, **options)
        cosine = F.cosine_similarity(e1, e2, dim=-1)
        return {"spearman": spearman(cosine.tolist(), self.scores)}
