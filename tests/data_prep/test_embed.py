import json

import pytest

from conftest import write_recipe
from trainer.cli import main


def test_prep_embed_fills_the_cache_that_the_run_then_reads(tmp_path, tiny_model, pairs_file, monkeypatch, capsys):
    from trainer.config import load_recipe
    from trainer.loop import train
    from trainer.model import embedding_cache

    cache = tmp_path / "teacher-cache"
    recipe = write_recipe(
        tmp_path, tiny_model, pairs_file,
        f"loss: [{{kind: infonce}}, {{kind: embed_distill, teacher: {{name_or_path: {tiny_model}, cache_dir: {cache}}}}}]",
    )
    assert main(["prep", "embed", str(recipe), "--batch-size", "16"]) == 0
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    texts = {r["query"] for r in rows} | {r["positive"] for r in rows} | {n for r in rows for n in r["negatives"]}
    assert f"{len(texts)} new texts embedded" in capsys.readouterr().out
    assert main(["prep", "embed", str(recipe)]) == 0
    assert "0 new texts embedded" in capsys.readouterr().out  # a second run has nothing left to do

    embedded = []
    original = embedding_cache.EmbeddingCache.add
    monkeypatch.setattr(embedding_cache.EmbeddingCache, "add", lambda self, ids, rows: embedded.extend(ids) or original(self, ids, rows))
    train(load_recipe(recipe))
    assert embedded == [], "training found every teacher embedding in the cache"


def test_prep_embed_needs_a_cache_dir(tmp_path, tiny_model, pairs_file, capsys):
    recipe = write_recipe(tmp_path, tiny_model, pairs_file, f"loss: [{{kind: embed_distill, teacher: {{name_or_path: {tiny_model}}}}}]")
    assert main(["prep", "embed", str(recipe)]) == 2
    assert "set cache_dir" in capsys.readouterr().err
    plain = write_recipe(tmp_path, tiny_model, pairs_file, "")
    assert main(["prep", "embed", str(plain)]) == 2
    assert "names no frozen embedding model" in capsys.readouterr().err
