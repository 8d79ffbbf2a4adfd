"""Write SNLI (anchor, entailment, contradiction) triplets as a pairs file with hard negatives.

    python data/snli/build_triplets.py SNLI_FOLDER data/snli/triplets-dev.jsonl --split dev

SNLI_FOLDER holds the line-aligned, tokenised `s1.<split>` (premise), `s2.<split>` (hypothesis)
and `labels.<split>` files. Each premise with at least one entailed and one contradicting
hypothesis gives one row: `query` the premise, `positive` its first entailed hypothesis,
`negatives` its first contradicting one. The tokeniser's spaces before punctuation and
contractions are removed; nothing else is changed.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SPACE_BEFORE = re.compile(r" (?=[.,!?;:%)]|n't\b|'(?:s|re|ve|ll|d|m)\b)")


def detokenise(text: str) -> str:
    return SPACE_BEFORE.sub("", text.strip()).replace("( ", "(")


def triplets(folder: Path, split: str) -> list[dict]:
    lines = [(folder / f"{name}.{split}").read_text(encoding="utf-8").splitlines() for name in ("s1", "s2", "labels")]
    if len({len(part) for part in lines}) != 1:
        raise SystemExit(f"{folder}: s1, s2 and labels .{split} have different line counts")
    by_premise: dict[str, dict[str, str]] = {}
    for premise, hypothesis, label in zip(*lines):
        by_premise.setdefault(detokenise(premise), {}).setdefault(label.strip(), detokenise(hypothesis))
    return [
        {"query": premise, "positive": found["entailment"], "negatives": [found["contradiction"]]}
        for premise, found in by_premise.items()
        if "entailment" in found and "contradiction" in found
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--split", default="dev")
    args = parser.parse_args()
    rows = triplets(args.folder, args.split)
    with args.out.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{args.out}: {len(rows)} triplets")


if __name__ == "__main__":
    main()
