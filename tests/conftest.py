"""Shared fixtures: a tiny random BERT with its own word-level vocabulary, and tiny data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def embedding_cache_off():
    """The shared embedding cache of unchanged models off (commands run as subprocesses inherit
    it), so that no test reads what another embedded, nor writes to the user's ~/.cache; its own
    tests turn it on in a folder of theirs."""
    import os

    from trainer.model.embedding_cache import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = "off"
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


TOPICS = [
    "apple", "river", "engine", "violin", "planet", "castle", "winter", "doctor", "garden", "rocket",
    "ocean", "pencil", "tiger", "bridge", "coffee", "desert", "forest", "island", "mirror", "silver",
    "thunder", "valley", "window", "yellow", "zebra", "anchor", "butter", "candle", "dragon", "feather",
    "glacier", "harbor",
]
FILLER = ["the", "a", "about", "is", "of", "and", "story", "note", "text", "what", "where", "why"]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """Query and positive share a topic word; the hard negative has another topic."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        other = TOPICS[(i + 7) % len(TOPICS)]
        rows.append(
            {
                "query": f"what {topic} {rng.choice(FILLER)} {i}",
                "positive": f"the {topic} story {rng.choice(FILLER)} {topic} {i}",
                "negatives": [f"the {other} note {rng.choice(FILLER)} {i}"],
            }
        )
    return rows


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with a word-level vocabulary, saved as a Hugging Face folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TOPICS + FILLER + [str(i) for i in range(200)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)  # vocab_file= is ignored by transformers 5
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(64)))
    return path


@pytest.fixture()
def tiny_beir(tmp_path) -> Path:
    """A BEIR folder built from the same synthetic topics: 40 documents, 12 test queries."""
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    rows = make_pairs(40, seed=1)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": r["positive"]}) + "\n" for i, r in enumerate(rows))
    )
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n" for i, r in enumerate(rows))
    )
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(12))
    )
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(12, 40))
    )
    return folder


def write_recipe(tmp_path: Path, model: Path, pairs: Path, extra: str = "") -> Path:
    """A 4-step recipe on the tiny model and pairs, saving every 2 steps; `extra` adds sections."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"""run_name: r
seed: 3
model: {{name_or_path: {model}, max_seq_length: 16}}
data:
  train: [{{kind: pairs, path: {pairs}, negatives_column: negatives}}]
  batch_size: 8
optimizer: {{lr: 1.0e-3}}
training: {{max_steps: 4}}
logging: {{log_every_steps: 1}}
checkpointing: {{output_dir: {tmp_path / 'runs'}, every_steps: 2, keep_last: null}}
{extra}"""
    )
    return path


def tiny_decoder(folder: Path, family: str = "qwen2", seed: int = 0, max_position_embeddings: int = 64) -> Path:
    """A 2-layer random decoder (qwen2 or llama, hidden 16) with the family's own tokenizer class
    over a one-character vocabulary; like the real ones, neither tokenizer adds an end-of-sequence
    token (Llama's adds its begin-of-sequence token)."""
    import string

    import torch
    from transformers import AutoConfig, AutoModel, LlamaTokenizer, Qwen2Tokenizer

    space = {"qwen2": "\u0120", "llama": "\u2581"}[family]  # byte-level BPE's and sentencepiece's space
    specials = {"qwen2": ["<|endoftext|>", "<|im_end|>"], "llama": ["<unk>", "<s>", "</s>"]}[family]
    vocab = {t: i for i, t in enumerate(specials + [space] + list(string.ascii_lowercase + string.digits))}
    if family == "qwen2":
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    else:
        tokenizer = LlamaTokenizer(vocab=vocab, merges=[], unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model(
        family, vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


def grads(encoder) -> dict:
    """Each parameter's gradient, by name, then zeroed: one backward's gradients to compare."""
    out = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad(set_to_none=True)
    return out


def assert_same(a: dict, b: dict, atol: float = 1e-10) -> None:
    """The same gradients (float64 tests: to 1e-10), and some at all."""
    import torch

    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def _run_then_exit(rank: int, worker, *args) -> None:
    """`worker(rank, *args)`, then leave at once, without the interpreter's shutdown: gloo's
    worker thread can still be releasing a finished collective's tensors, which takes the GIL,
    and a thread that asks for it while the interpreter shuts down is ended inside a C++
    destructor, so the process aborted ("terminate called without an active exception") in
    about one run in 15 after its results were written."""
    import os
    import sys

    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_processes(worker, args: tuple, nprocs: int, seconds: float = 300) -> None:
    """Run `worker(rank, *args)` in `nprocs` spawned processes; fail the test (and end them) if
    they have not all finished within `seconds`, instead of hanging on a stuck collective."""
    import time

    import torch.multiprocessing as mp

    workers = mp.spawn(_run_then_exit, args=(worker, *args), nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not workers.join(timeout=2):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.terminate()
            pytest.fail(f"the {nprocs} processes did not finish within {seconds:.0f} s")
