import json

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


# ---------------------------------------------------------------- an unchanged model's embeddings


class CountingEncoder:
    """Wraps an `Encoder`, counting the texts it is asked to embed."""

    def __init__(self, encoder):
        self.encoder, self.dim, self.texts = encoder, encoder.dim, []

    def encode(self, texts, **options):
        self.texts += list(texts)
        return self.encoder.encode(texts, **options)


def test_caching_encoder_embeds_each_text_once_per_prompt_and_like_the_encoder(tiny_model, monkeypatch, tmp_path):
    from trainer.model.embedding_cache import CACHE_ENV, cached_text_encoder

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    config = ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, query_prompt="query: ")
    encoder = Encoder.from_config(config).eval()
    counting = CountingEncoder(encoder)
    cached = cached_text_encoder(counting, config)
    texts = ["alpha beta gamma", "beta", "gamma delta"]
    first = cached.encode(texts[:2], is_query=False)
    both = cached.encode(texts, is_query=False)
    assert counting.texts == texts[:2] + texts[2:]  # the third text only, the second time
    torch.testing.assert_close(both, encoder.encode(texts, is_query=False), rtol=0, atol=1e-6)
    torch.testing.assert_close(both[:2], first, rtol=0, atol=0)
    queries = cached.encode(texts[:1], is_query=True)  # the query prompt: another input, another entry
    assert counting.texts[-1] == texts[0]
    torch.testing.assert_close(queries, encoder.encode(texts[:1], is_query=True), rtol=0, atol=1e-6)
    assert not torch.allclose(queries, both[:1])
    # a new process, the same model from its files: nothing to embed
    again = CountingEncoder(encoder)
    torch.testing.assert_close(cached_text_encoder(again, config).encode(texts, is_query=False), both, rtol=0, atol=0)
    assert again.texts == []
    # a setting that changes embeddings keys another folder
    other = ModelConfig(name_or_path=str(tiny_model), max_seq_length=8, query_prompt="query: ")
    assert cached_text_encoder(again, other).cache.folder != cached.cache.folder


def test_caching_encoder_is_off_when_asked_or_when_the_model_cannot_be_fingerprinted(tiny_model, monkeypatch, tmp_path):
    from trainer.model.embedding_cache import CACHE_ENV, cached_text_encoder

    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16))
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cached_text_encoder(encoder, encoder.config) is encoder
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cached_text_encoder(encoder, ModelConfig(name_or_path="org/not-a-local-folder")) is encoder
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocked))  # not a folder: a warning, and embedding goes on without the cache
    assert cached_text_encoder(encoder, encoder.config) is encoder


def test_mining_and_evaluation_share_the_corpus_embeddings(tiny_model, tiny_beir, monkeypatch, tmp_path, capsys):
    """`prep mine` embeds the corpus; `embtrain eval` of the same model then embeds only the test
    queries, and its numbers are those of an evaluation without the cache."""
    from trainer.cli import main
    from trainer.model.embedding_cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "mined.jsonl"
    assert main(["prep", "mine", "--beir", str(tiny_beir), "--split", "train", "--model", str(tiny_model),
                 "--out", str(out), "--num-negatives", "1", "--ranks", "1", "20"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tiny_model), "--beir", str(tiny_beir), "--json"]) == 0
    captured = capsys.readouterr()
    assert "corpus: 40 of 40 embeddings read from" in captured.err
    read = [line for line in captured.err.splitlines() if "embeddings read from" in line]
    assert len(read) == 1  # the test queries were not embedded before: no cached queries
    cached = json.loads(captured.out.strip().splitlines()[-1])
    monkeypatch.setenv(CACHE_ENV, "off")
    assert main(["eval", str(tiny_model), "--beir", str(tiny_beir), "--json"]) == 0
    fresh = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cached == pytest.approx(fresh, abs=1e-9)
