import numpy as np
import pytest
import torch

from trainer.config import ModelConfig
from trainer.data.collate import Collator, TextTokenizer
from trainer.data.examples import Example
from trainer.errors import RunError
from trainer.model.embedding_cache import CachedEncoder, EmbeddingCache
from trainer.model.encoder import Encoder
from trainer.model.frozen import embed_frozen

IDENTITY = {"model": "m"}


def test_cache_finds_what_was_added_before_and_after_flushing(tmp_path):
    cache = EmbeddingCache(tmp_path, IDENTITY, dim=3, flush_rows=4)
    cache.add(np.array([5, 9]), np.array([[1, 1, 1], [2, 2, 2]], dtype=np.float32))
    found, rows = cache.lookup(np.array([9, 7, 5]))
    assert found.tolist() == [True, False, True] and rows[0].tolist() == [2, 2, 2] and rows[1].tolist() == [0, 0, 0]
    cache.add(np.array([-3, 7, 9]), np.array([[3, 3, 3], [4, 4, 4], [0, 0, 0]], dtype=np.float32))  # 9 again: kept once
    assert not cache.pending and len(cache.shards) == 1  # 4 rows: flushed
    reopened = EmbeddingCache(tmp_path, IDENTITY, dim=3)
    found, rows = reopened.lookup(np.array([7, -3, 9, 5, 11]))
    assert found.tolist() == [True, True, True, True, False]
    assert rows[:4, 0].tolist() == [4, 3, 2, 1] and len(reopened) == 4


def test_cache_of_another_model_is_refused(tmp_path):
    EmbeddingCache(tmp_path, IDENTITY, dim=3)
    with pytest.raises(RunError, match="another model"):
        EmbeddingCache(tmp_path, {"model": "other"}, dim=3)


def test_cached_encoder_embeds_only_new_texts_and_like_the_encoder(tiny_model, tmp_path):
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16)).eval()
    cached = CachedEncoder(encoder, EmbeddingCache(tmp_path, IDENTITY, encoder.dim))
    tokenizer = TextTokenizer(encoder.tokenizer, 16, [("", "")])
    texts = ["alpha beta gamma delta epsilon", "beta", "gamma delta", "alpha"]
    first = tokenizer.with_ids([Example(t, None) for t in texts[:2]])
    second = tokenizer.with_ids([Example(t, None) for t in texts])
    calls = []
    original = encoder.forward
    encoder.forward = lambda features, **kw: calls.append(features["input_ids"].shape) or original(features, **kw)
    cached.embed(first.queries, first.query_ids, None)
    got = cached.embed(second.queries, second.query_ids, None)
    assert calls == [(2, 7), (2, 4)]  # the second batch embeds its two new texts, padded to their own length
    encoder.forward = original
    expected = embed_frozen(encoder, second.queries, None)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert cached.cache.embedded == 4


def test_a_run_embeds_each_text_once_across_epochs_and_resumes_with_its_cache(tmp_path, tiny_model, pairs_file, monkeypatch):
    import json
    import shutil

    from conftest import make_pairs, write_recipe
    from trainer.config import load_recipe
    from trainer.loop import train
    from trainer.model import embedding_cache

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": r["positive"]}) + "\n" for r in make_pairs(24, seed=7)))
    embedded = []
    original = embedding_cache.EmbeddingCache.add

    def count(self, ids, rows):
        embedded.extend(ids.tolist())
        return original(self, ids, rows)

    monkeypatch.setattr(embedding_cache.EmbeddingCache, "add", count)
    recipe = write_recipe(tmp_path, tiny_model, pairs_file, f"loss: [{{kind: embed_distill, teacher: {{name_or_path: {tiny_model}}}}}]")
    recipe.write_text(recipe.read_text().replace(f"kind: pairs, path: {pairs_file}, negatives_column: negatives", f"kind: texts, path: {texts}")
                      .replace("max_steps: 4", "epochs: 3"))
    train(load_recipe(recipe))
    assert len(embedded) == len(set(embedded)) == 24  # 3 epochs of 3 batches, each text embedded once
    run_dir = tmp_path / "runs" / "r"
    (cache_dir,) = (run_dir / "teacher_cache").iterdir()
    assert len(list(cache_dir.glob("*.ids.npy"))) >= 1
    shutil.rmtree(run_dir / "step_9")  # the last step is trained again, from step_8
    embedded.clear()
    train(load_recipe(recipe), resume=True)
    assert (run_dir / "step_9").exists()
    assert embedded == []  # the resumed run finds every text on disk
