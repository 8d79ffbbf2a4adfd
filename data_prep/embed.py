"""Embed a recipe's training texts with its frozen models ahead of training.

    embtrain prep embed recipes/distill_minilm.yaml [key.sub=value ...] [--batch-size 64]

Every text of the recipe's training data (queries, positives, hard negatives, single texts), with
the prompts the run will use, is embedded by each frozen model its loss names (online teachers,
guides) into that model's `cache_dir`, the cache the run then reads: training starts with every
teacher embedding on disk. Texts already in the cache are skipped, so an interrupted run of this
tool resumes where it stopped (it saves every `flush_rows` texts).
"""

from __future__ import annotations

import argparse
import time

from trainer.data.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--batch-size", type=int, default=64, help="training rows embedded per forward pass")


def frozen_models(configs) -> dict:
    """Every frozen model a list of loss configs names, wrapper terms' inner terms included, by key."""
    import dataclasses

    from trainer.losses.base import LossConfig
    from trainer.model.frozen import FrozenModelConfig, frozen_key

    found = {}
    for config in configs:
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if isinstance(value, FrozenModelConfig):
                found[frozen_key(value)] = value
            elif isinstance(value, list) and value and isinstance(value[0], LossConfig):
                found.update(frozen_models(value))
    return found


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from trainer.config import load_recipe
    from trainer.data.collate import TextTokenizer
    from trainer.data.readers import read_training_data
    from trainer.model.embedding_cache import CachedEncoder, EmbeddingCache
    from trainer.model.frozen import cache_identity, load_frozen

    recipe = load_recipe(args.recipe, args.overrides)
    models = {k: c for k, c in frozen_models(recipe.loss).items() if c.scorer == "embedding"}
    if not models:
        raise DataError(f"{args.recipe}: the loss names no frozen embedding model (teacher: or guide:) to embed with")
    unset = [c.name_or_path for c in models.values() if not c.cache or not c.cache_dir]
    if unset:
        raise DataError(
            f"{args.recipe}: set cache_dir (and leave cache on) for {', '.join(unset)}, so that the run reads what this "
            "tool writes; without it a run fills a cache of its own in its run folder"
        )
    examples = read_training_data(recipe.data.train, recipe.data.num_negatives)
    sources = recipe.data.train
    for config in models.values():
        encoder = load_frozen(config)
        cached = CachedEncoder(encoder, EmbeddingCache(config.cache_dir, cache_identity(config), encoder.dim))
        tokenizer = TextTokenizer(encoder.tokenizer, encoder.config.max_seq_length, [(encoder.config.query_prompt, encoder.config.document_prompt)])
        before, start = len(cached.cache), time.perf_counter()
        order = sorted(range(len(examples)), key=lambda i: (sources[examples[i].source].kind, len(examples[i].query)))
        with torch.no_grad():
            for first in tqdm(range(0, len(order), args.batch_size), desc=f"embed with {config.name_or_path}", unit=" batches"):
                rows = [examples[i] for i in order[first : first + args.batch_size]]
                for group in _by_shape(rows):
                    texts = tokenizer.with_ids(group)
                    cached.embed(texts.queries, texts.query_ids, args.batch_size)
                    if texts.documents is not None:
                        cached.embed(texts.documents, texts.document_ids, args.batch_size)
        cached.cache.flush()
        seconds = time.perf_counter() - start
        print(
            f"{config.name_or_path}: {len(cached.cache) - before} new texts embedded in {seconds:.0f} s, "
            f"{len(cached.cache)} in {config.cache_dir}"
        )
    return 0


def _by_shape(rows: list) -> list[list]:
    """Rows split so that a group holds only single texts or only pairs with one count of negatives."""
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row.positive is None, len(row.negatives)), []).append(row)
    return list(groups.values())


def main(argv: list[str] | None = None) -> int:
    from data_prep.output import tool_main

    return tool_main("python -m data_prep.embed", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
