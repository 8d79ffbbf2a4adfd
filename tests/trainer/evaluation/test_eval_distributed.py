"""Evaluation on every process: two CPU processes (gloo) give the one-process metrics, with plain
data parallelism and with sharded parameters (FSDP1 and FSDP2), and run the same forward passes."""

import json
import math
import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import FILLER, TOPICS, make_pairs, run_processes
from trainer.config import ModelConfig, Recipe, load_recipe
from trainer.evaluation.runner import EvalRunner
from trainer.model.encoder import Encoder

WORLD = 2


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one global state per process."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def words_model(tiny_model, tmp_path_factory) -> Path:
    """`tiny_model` with a tokenizer that knows its words: under transformers 5 the fixture's
    `BertTokenizerFast(vocab_file=...)` ignores the file and reads every word as [UNK]."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("words-bert")
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    assert tokenizer.unk_token_id not in tokenizer(" ".join(TOPICS + FILLER))["input_ids"]
    tokenizer.save_pretrained(folder)
    return folder


def write_sts(folder: Path, n: int = 13) -> Path:
    """An odd number of pairs, so that the second process's share is padded."""
    path = folder / "sts.jsonl"
    rows = make_pairs(n, seed=2)
    path.write_text(
        "".join(json.dumps({"sentence1": r["query"], "sentence2": r["positive"], "score": i % 5}) + "\n" for i, r in enumerate(rows))
    )
    return path


def make_recipe(folder: Path, model: Path, beir: Path, sts: Path) -> Recipe:
    # 40 documents and 11 queries in batches of 4: several batches, and unequal shares
    text = f"""\
run_name: eval
model:
  name_or_path: {model}
  max_seq_length: 16
data:
  train:
    - kind: pairs
      path: {folder / 'unused.jsonl'}
evaluation:
  sets:
    - kind: retrieval
      name: tiny
      path: {beir}
      batch_size: 4
      max_queries: 11
    - kind: sts
      name: sts
      path: {sts}
      format: jsonl
      batch_size: 4
checkpointing:
  output_dir: {folder / 'runs'}
"""
    path = folder / f"recipe-{os.getpid()}.yaml"  # one per process: the ranks must not read each other's half-written file
    path.write_text(text)
    return load_recipe(path)


def load_encoder(model_dir: Path) -> Encoder:
    """float64, so that batching by a different share changes no embedding."""
    return Encoder.from_config(ModelConfig(name_or_path=str(model_dir), max_seq_length=16)).double()


def count_forwards(encoder: Encoder) -> list[int]:
    calls = [0]
    encoder.backbone.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def shard(encoder: Encoder, kind: str, accelerator) -> torch.nn.Module:
    """The model as the training loop holds it after `prepare`."""
    from transformers.models.bert.modeling_bert import BertLayer

    if kind == "ddp":
        return accelerator.prepare(encoder)
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(encoder, auto_wrap_policy=ModuleWrapPolicy({BertLayer}), device_id=torch.device("cpu"))
    from torch.distributed.fsdp import fully_shard

    for layer in encoder.backbone.encoder.layer:
        fully_shard(layer)
    return fully_shard(encoder)


def _worker(rank: int, init_file: str, model_dir: str, folder: str, beir: str, sts: str, kind: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # a timeout turns a stuck collective into an error instead of a hung test
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        assert accelerator.num_processes == WORLD
        recipe = make_recipe(Path(folder), Path(model_dir), Path(beir), Path(sts))
        encoder = load_encoder(Path(model_dir))
        forwards = count_forwards(encoder)
        model = shard(encoder, kind, accelerator)
        runner = EvalRunner(recipe.evaluation, recipe, Path(folder) / "run", save_best_model=False)
        result = {"metrics": runner.run(accelerator, model)}
        result["forwards"] = forwards[0]
        if kind == "ddp":  # the cache: the first run misses on every process, the second hits on every process
            result["cached_miss"] = runner.run(accelerator, model, cached=True)
            result["forwards_after_miss"] = forwards[0]
            result["cached_hit"] = runner.run(accelerator, model, cached=True)
            result["forwards_after_hit"] = forwards[0]
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn(folder: Path, model: Path, beir: Path, sts: Path, kind: str) -> list[dict]:
    args = (str(folder / "init"), str(model), str(folder), str(beir), str(sts), kind)
    run_processes(_worker, args, nprocs=WORLD)
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def one_process_metrics(folder: Path, model: Path, beir: Path, sts: Path) -> tuple[dict[str, float], int]:
    from accelerate import Accelerator

    recipe = make_recipe(folder, model, beir, sts)
    encoder = load_encoder(model)
    forwards = count_forwards(encoder)
    metrics = EvalRunner(recipe.evaluation, recipe, folder / "run", save_best_model=False).run(Accelerator(cpu=True), encoder)
    return metrics, forwards[0]


def assert_same_metrics(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


def test_one_process_gives_the_bare_evaluators_numbers(words_model, tiny_beir, tmp_path):
    from trainer.evaluation import build_evaluator

    sts = write_sts(tmp_path)
    metrics, forwards = one_process_metrics(tmp_path, words_model, tiny_beir, sts)
    recipe = make_recipe(tmp_path, words_model, tiny_beir, sts)
    encoder = load_encoder(words_model)
    expected = {}
    for eval_set in recipe.evaluation.sets:
        expected |= {f"{eval_set.name}/{k}": v for k, v in build_evaluator(eval_set)(encoder).items()}
    assert metrics == expected  # exactly: one process encodes as before
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["sts/spearman"] != 0
    # 40 documents, 11 queries, 2 x 13 sentences in batches of 4
    assert forwards == 10 + 3 + 2 * 4


@pytest.mark.parametrize("kind", ["ddp", "fsdp1", "fsdp2"])
def test_two_processes_give_the_one_process_metrics(words_model, tiny_beir, tmp_path, kind):
    sts = write_sts(tmp_path)
    single = tmp_path / "single"
    single.mkdir()
    expected, _ = one_process_metrics(single, words_model, tiny_beir, sts)
    results = spawn(tmp_path, words_model, tiny_beir, sts, kind)
    for result in results:
        assert_same_metrics(result["metrics"], expected)
    assert results[0]["metrics"] == results[1]["metrics"]  # identical on every process
    # each process embeds half, padded: ceil(40/2)=20 documents, ceil(11/2)=6 queries, 2 x ceil(13/2)=7 sentences
    assert [r["forwards"] for r in results] == [5 + 2 + 2 * 2] * WORLD
    if kind == "ddp":
        for result in results:
            assert_same_metrics(result["cached_miss"], expected)
            assert result["cached_hit"] == results[0]["cached_miss"]
            assert result["forwards_after_miss"] == 2 * result["forwards"]
            assert result["forwards_after_hit"] == result["forwards_after_miss"]  # no process evaluated again
