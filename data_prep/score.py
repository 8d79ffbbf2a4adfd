"""Annotate training rows with a teacher's scores, for distillation.

    embtrain prep score --train data/mined.jsonl --teacher BAAI/bge-base-en-v1.5 --out data/scored.jsonl
    embtrain prep score --train data/mined.jsonl --cross-encoder cross-encoder/ms-marco-MiniLM-L6-v2 --out ...

Adds `teacher_scores` to every row: the teacher's score of the positive, then of each hard
negative, in the row's order. With `--teacher` the score is the dot product of the teacher's
embeddings (cosine when it normalises); with `--cross-encoder` it is the relevance score of a
sequence-classification model on (query, document): its one logit, or, with several labels, the
log-odds of the relevant label (picked by name from the model's config: relevant, positive,
entailment, yes, true; LABEL_1 of an unnamed two-label model; or --label). Writes
`<out>.manifest.json` too.
"""

from __future__ import annotations

import argparse

from tqdm.auto import tqdm

from data_prep.output import check_output, positive_int, tool_main, write_jsonl
from trainer.data.errors import DataError
from trainer.data.readers import load_table


def documents_of(row: dict, positive_column: str, negatives_column: str | None) -> list[str]:
    return [row[positive_column]] + (list(row[negatives_column]) if negatives_column else [])


def embedding_scores(
    rows, model: str, query_column, positive_column, negatives_column, batch_size, trust_remote_code: bool = False
) -> list[list[float]]:
    from trainer.model.encoder import Encoder, embedding_config

    encoder = Encoder.from_config(embedding_config(model, trust_remote_code))
    queries = encoder.encode([r[query_column] for r in rows], is_query=True, batch_size=batch_size, progress="queries")
    flat = [d for r in rows for d in documents_of(r, positive_column, negatives_column)]
    documents = encoder.encode(flat, is_query=False, batch_size=batch_size, progress="documents")
    scores, start = [], 0
    for i, row in enumerate(rows):
        count = len(documents_of(row, positive_column, negatives_column))
        scores.append([round(float(v), 6) for v in documents[start : start + count] @ queries[i]])
        start += count
    return scores


RELEVANT_LABELS = ("relevant", "positive", "entailment", "entail", "yes", "true", "match", "similar", "paraphrase")


def relevance_label(config, chosen: str | None) -> int | None:
    """Which output of a sequence-classification model is the relevance score: None for a single
    logit, else the index of the relevant label: `chosen` (a name or an index), a label whose name
    says relevant, or label 1 of a two-label model whose labels have no names."""
    count = config.num_labels
    names = {i: str(config.id2label.get(i, f"LABEL_{i}")) for i in range(count)}
    if chosen is not None:
        for index, name in names.items():
            if chosen == str(index) or chosen.lower() == name.lower():
                return index if count > 1 else None
        raise DataError(f"--label {chosen}: the cross-encoder's labels are {names}")
    if count == 1:
        return None
    normal = {i: n.lower().replace("-", "_").replace(" ", "_") for i, n in names.items()}
    negated = ("not", "non", "ir", "un", "no_")
    found = [i for i, n in normal.items() if any(w in n for w in RELEVANT_LABELS) and not n.startswith(negated)]
    if len(found) == 1:
        return found[0]
    if count == 2 and all(n == f"label_{i}" for i, n in normal.items()):
        return 1
    raise DataError(
        f"cannot tell which of the cross-encoder's {count} labels {names} means relevant; name it with --label"
    )


def relevance_scores(logits, label: int | None):
    """The single logit, or the log-odds of the relevant label against the others."""
    import torch

    if label is None:
        return logits[:, 0]
    others = torch.cat([logits[:, :label], logits[:, label + 1 :]], dim=1)
    return logits[:, label] - torch.logsumexp(others, dim=1)


def cross_encoder_scores(
    rows, model: str, query_column, positive_column, negatives_column, batch_size, trust_remote_code: bool = False,
    label: str | None = None,
) -> list[list[float]]:
    import torch
    from transformers import AutoModelForSequenceClassification

    from trainer.config import ModelConfig
    from trainer.model.encoder import LOAD_ERRORS, load_error, load_tokenizer, read_backbone_config

    path, _ = read_backbone_config(ModelConfig(name_or_path=model, trust_remote_code=trust_remote_code))
    tokenizer = load_tokenizer(model, trust_remote_code)
    try:
        scorer = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
    except LOAD_ERRORS as exc:
        raise load_error(model, path, "weights", exc) from None
    relevant = relevance_label(scorer.config, label)
    pairs = [(i, r[query_column], d) for i, r in enumerate(rows) for d in documents_of(r, positive_column, negatives_column)]
    values: list[float] = []
    with torch.no_grad():
        for start in tqdm(range(0, len(pairs), batch_size), desc="pairs"):
            chunk = pairs[start : start + batch_size]
            features = tokenizer([q for _, q, _ in chunk], [d for _, _, d in chunk], padding=True,
                                 truncation=True, max_length=512, return_tensors="pt")
            values += relevance_scores(scorer(**features).logits.float(), relevant).tolist()
    scores: list[list[float]] = [[] for _ in rows]
    for (i, _, _), value in zip(pairs, values):
        scores[i].append(round(value, 6))
    return scores


def check_rows(path: str, rows: list[dict], query_column: str, positive_column: str, negatives_column: str | None) -> None:
    """Every text to score is a non-empty string and the negatives a list of them, before a model loads."""
    for number, row in enumerate(rows, start=1):
        for column in (query_column, positive_column):
            value = row[column]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}, row {number}: column '{column}' must be a non-empty text, got {value!r:.60}")
        if negatives_column:
            negatives = row[negatives_column]
            if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
                raise DataError(
                    f"{path}, row {number}: column '{negatives_column}' must be a list of texts, got {negatives!r:.60}"
                )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, help="rows to score: jsonl, csv, tsv or parquet")
    teacher = parser.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher", help="embedding model: folder, checkpoint, Hub id or package:NAME")
    teacher.add_argument("--cross-encoder", help="sequence-classification model scoring (query, document)")
    parser.add_argument("--label", help="the cross-encoder's relevant label, by name or index (default: from its config)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a model whose config names its own Python code run it (only for models you trust)")
    parser.add_argument("--query-column", default="query")
    parser.add_argument("--positive-column", default="positive")
    parser.add_argument("--negatives-column", default="negatives", help="list of hard negatives ('' for none)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    out = check_output(args.out, args.overwrite)
    table = load_table(args.train, "auto")
    negatives_column = args.negatives_column or None
    for column in [args.query_column, args.positive_column] + ([negatives_column] if negatives_column else []):
        if column not in table.column_names:
            raise DataError(f"{args.train}: missing column '{column}' (columns: {table.column_names})")
    rows = table.to_list()
    check_rows(args.train, rows, args.query_column, args.positive_column, negatives_column)
    columns = (args.query_column, args.positive_column, negatives_column, args.batch_size, args.trust_remote_code)
    if args.teacher:
        scores = embedding_scores(rows, args.teacher, *columns)
    else:
        scores = cross_encoder_scores(rows, args.cross_encoder, *columns, label=args.label)
    for row, row_scores in zip(rows, scores):
        row["teacher_scores"] = row_scores
    manifest = {
        "tool": "embtrain prep score",
        "train": args.train,
        "teacher": args.teacher,
        "cross_encoder": args.cross_encoder,
        "scores_per_row": "positive first, then each negative in order",
    }
    write_jsonl(rows, out, manifest)
    print(f"scored {len(rows)} rows with {args.teacher or args.cross_encoder}; wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main("python -m data_prep.score", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
