"""The evaluation cache: keyed by the evaluation files' content, written atomically, and a
corrupt entry is evaluated again and rewritten."""

import json
import os
from pathlib import Path

import pytest

from test_eval_distributed import count_forwards, load_encoder, make_recipe, words_model, write_sts  # noqa: F401
from trainer.evaluation.cache import EvalCache
from trainer.evaluation.runner import EvalRunner


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class Setup:
    """A recipe with a retrieval and an STS set, and an encoder that counts its forward passes."""

    def __init__(self, folder: Path, model: Path, beir: Path) -> None:
        from accelerate import Accelerator

        self.recipe = make_recipe(folder, model, beir, write_sts(folder))
        self.encoder = load_encoder(model)
        self.forwards = count_forwards(self.encoder)
        self.accelerator = Accelerator(cpu=True)
        self.cache_dir = Path(self.recipe.checkpointing.output_dir) / ".eval_cache"

    def run(self, cached: bool = True) -> tuple[dict[str, float], int]:
        """Metrics and the forward passes they took; a fresh runner reads the data again."""
        before = self.forwards[0]
        runner = EvalRunner(self.recipe.evaluation, self.recipe, self.cache_dir.parent / "run", save_best_model=False)
        return runner.run(self.accelerator, self.encoder, cached=cached), self.forwards[0] - before


def test_a_hit_skips_evaluation(words_model, tiny_beir, tmp_path):
    setup = Setup(tmp_path, words_model, tiny_beir)
    first, forwards = setup.run()
    assert forwards > 0 and len(list(setup.cache_dir.glob("*.json"))) == 2  # one entry per set
    again, forwards = setup.run()
    assert again == first and forwards == 0


def test_a_corrupt_entry_is_evaluated_again_and_rewritten(words_model, tiny_beir, tmp_path, capsys):
    setup = Setup(tmp_path, words_model, tiny_beir)
    first, _ = setup.run()
    entries = sorted(setup.cache_dir.glob("*.json"))
    entries[0].write_text('{"ndcg@10": 0.6')  # a write cut short
    entries[1].write_bytes(b"\xff\xfe")  # not even text
    capsys.readouterr()
    again, forwards = setup.run()
    assert again == first and forwards > 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: evaluation cache")]
    assert len(warnings) == 2
    assert all(isinstance(json.loads(p.read_text()), dict) for p in entries)  # rewritten
    _, forwards = setup.run()
    assert forwards == 0


def test_an_edited_qrels_file_at_the_same_path_is_evaluated_again(words_model, tiny_beir, tmp_path):
    setup = Setup(tmp_path, words_model, tiny_beir)
    before, _ = setup.run()
    qrels = tiny_beir / "qrels" / "test.tsv"
    # each query's relevant document becomes one about another topic
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{(i + 7) % 40}\t1\n" for i in range(12)))
    after, forwards = setup.run()
    fresh, _ = setup.run(cached=False)
    assert forwards > 0
    assert after == fresh
    assert after["tiny/ndcg@10"] < before["tiny/ndcg@10"] - 0.1
    assert after["sts/spearman"] == before["sts/spearman"]


def test_a_failed_write_keeps_the_old_entry_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    cache = EvalCache(tmp_path / "cache")
    cache.put("k", {"ndcg@10": 0.5})
    assert cache.get("k") == {"ndcg@10": 0.5}

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    cache.put("k", {"ndcg@10": 0.7})
    assert "warning: evaluation cache not written" in capsys.readouterr().err
    assert cache.get("k") == {"ndcg@10": 0.5}
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k.json"]


def test_an_entry_that_is_not_metrics_is_a_miss(tmp_path, capsys):
    cache = EvalCache(tmp_path)
    (tmp_path / "k.json").write_text('["not", "metrics"]')
    assert cache.get("k") is None
    assert "does not hold metrics" in capsys.readouterr().err
    assert cache.get("missing") is None and cache.get(None) is None


def test_the_key_changes_with_every_setting_that_changes_embeddings(words_model, tiny_beir, tmp_path):
    """A student cut from the same weights (layers, num_layers) or any other embedding setting
    never reads the full model's cached scores; settings that leave embeddings alone share them."""
    from dataclasses import replace

    from trainer.config import ModelConfig
    from trainer.evaluation.cache import cache_key

    eval_set = make_recipe(tmp_path, words_model, tiny_beir, write_sts(tmp_path)).evaluation.sets[0]
    base = ModelConfig(name_or_path=str(words_model))
    key = cache_key(base, eval_set)
    assert key is not None
    changed = [
        {"layers": [0]}, {"num_layers": 1}, {"embedding_dim": 8}, {"pooling": "cls"}, {"normalize": False},
        {"max_seq_length": 8}, {"query_prompt": "q: "}, {"document_prompt": "d: "},
    ]
    keys = {cache_key(replace(base, **change), eval_set) for change in changed}
    assert key not in keys and len(keys) == len(changed)
    assert cache_key(replace(base, gradient_checkpointing=True), eval_set) == key
    assert cache_key(replace(base, attention_dropout=0.0, hidden_dropout=0.2), eval_set) == key  # training only
    # scores computed under bf16 autocast, or on another kind of device, are not float32 CPU scores
    assert len({key, cache_key(base, eval_set, precision="bf16"), cache_key(base, eval_set, device="cuda")}) == 3


def test_the_key_of_lora_and_latent_attention_models(tmp_path, tiny_model, tiny_beir):
    import json

    from trainer.config import LatentAttentionConfig, LoraConfig, ModelConfig, RetrievalEvalConfig
    from trainer.evaluation.cache import cache_key
    from trainer.model.encoder import Encoder

    eval_set = RetrievalEvalConfig(kind="retrieval", name="t", path=str(tiny_beir))
    plain = ModelConfig(name_or_path=str(tiny_model), max_seq_length=16)
    base = cache_key(plain, eval_set)
    # fresh adapters start as the identity: the base model's scores hold
    assert cache_key(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, lora=LoraConfig()), eval_set) == base
    # a fresh latent-attention module is random: nothing to cache
    fresh = ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, pooling="latent_attention",
                        latent_attention=LatentAttentionConfig(num_latents=4, num_heads=2))
    assert cache_key(fresh, eval_set) is None
    # a saved adapter is keyed by its weights, its settings (alpha, targets) and its base
    Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, lora=LoraConfig(rank=2))).save_pretrained(tmp_path / "a")
    adapter = ModelConfig(name_or_path=str(tmp_path / "a"), max_seq_length=16)
    first = cache_key(adapter, eval_set)
    assert first is not None and first != base
    settings_file = tmp_path / "a" / "adapter_config.json"
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "lora_alpha": 64}))
    assert cache_key(adapter, eval_set) != first


def test_a_miss_reads_the_embeddings_an_unchanged_model_gave_before(words_model, tiny_beir, tmp_path, monkeypatch):
    """A start evaluation whose metrics are not cached (another set, say) embeds only the texts
    the shared embedding cache lacks, and scores as without it."""
    from trainer.model.embedding_cache import CACHE_ENV

    setup = Setup(tmp_path, words_model, tiny_beir)
    uncached, _ = setup.run(cached=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "embeddings"))
    first, forwards = setup.run()
    assert forwards > 0 and first == pytest.approx(uncached, abs=1e-9)
    for entry in setup.cache_dir.glob("*.json"):
        entry.unlink()  # the metrics forgotten; the embeddings kept
    again, forwards = setup.run()
    assert forwards == 0 and again == pytest.approx(first, abs=1e-9)
    later, forwards = setup.run(cached=False)  # a model that has trained: never read from the cache
    assert forwards > 0
