"""`embtrain estimate`: its parts follow the recipe (LoRA, ZeRO, cached loss, checkpointing,
precision), a batch that does not fit gets a chunk size that does, and the estimate comes within
1.3x of the peak resident memory measured on this CPU for two model sizes and two batch sizes."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FILLER, TOPICS, write_recipe
from trainer.cli import main
from trainer.config import load_recipe
from trainer.estimate import CPU_BASELINE_BYTES, estimate, step_shape

ROOT = Path(__file__).resolve().parents[2]


def bert(folder: Path, hidden: int, layers: int) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TOPICS + FILLER
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 32,
                        intermediate_size=4 * hidden, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    return folder


def long_pairs(path: Path, rows: int = 200, words: int = 300) -> Path:
    """Every text longer than any max_seq_length used here: the estimate's worst case is the real case."""
    rng = random.Random(0)
    vocabulary = TOPICS + FILLER
    text = lambda: " ".join(rng.choice(vocabulary) for _ in range(words))  # noqa: E731
    path.write_text("".join(json.dumps({"query": text(), "positive": text(), "negatives": [text()]}) + "\n" for _ in range(rows)))
    return path


def test_the_parts_follow_the_recipe(tmp_path, tiny_model, pairs_file):
    path = write_recipe(tmp_path, tiny_model, pairs_file)
    base = load_recipe(path)
    plain = estimate(base, device="cpu")
    assert plain.total_parameters == plain.trainable_parameters > 0
    assert plain.weights == 4 * plain.total_parameters and plain.gradients == plain.weights
    assert plain.optimizer == 2 * plain.weights and plain.baseline == CPU_BASELINE_BYTES
    assert estimate(base, device="gpu").baseline == 0
    sharded = [estimate(base, world_size=4, zero_stage=stage) for stage in range(4)]
    assert sharded[1].optimizer == plain.optimizer // 4 and sharded[1].gradients == plain.gradients
    assert sharded[2].gradients == plain.gradients // 4 and sharded[2].weights == plain.weights
    assert sharded[3].weights == plain.weights // 4
    lora = estimate(load_recipe(path, ["model.lora={rank: 2}"]))
    assert lora.trainable_parameters < plain.trainable_parameters / 4 and lora.gradients == 4 * lora.trainable_parameters
    assert lora.weights > plain.weights  # the adapters come on top of the frozen weights
    cached = estimate(base, chunk_size=2)
    checkpointed = estimate(base, gradient_checkpointing=True)
    bf16 = estimate(load_recipe(path, ["training.mixed_precision=bf16"]))
    assert cached.activations < plain.activations and checkpointed.activations < plain.activations
    assert bf16.activations < plain.activations
    longer = estimate(load_recipe(path, ["model.max_seq_length=32"]))
    assert longer.activations > 1.8 * plain.activations  # twice the tokens
    # recomputed activations: each layer's GELU output (intermediate size 64, float32) is not kept
    kept = estimate(load_recipe(path, ["model.recompute_activations=false"]))
    shape = step_shape(base, [])
    texts = shape.batch_size * (1 + shape.documents_per_query)
    assert kept.activations - plain.activations == texts * shape.max_seq_length * 64 * 4 * 2  # 2 layers
    assert estimate(base, gradient_checkpointing=True).activations == checkpointed.activations  # nothing more to recompute there


def test_a_batch_that_does_not_fit_gets_a_chunk_size_that_does(tmp_path, capsys):
    model = bert(tmp_path / "model", 256, 4)
    pairs = long_pairs(tmp_path / "pairs.jsonl", rows=64)
    path = write_recipe(tmp_path, model, pairs, "")
    overrides = ["model.max_seq_length=128", "data.batch_size=32"]
    assert main(["estimate", str(path), *overrides, "--device", "cpu", "--device-memory", "1.5GB"]) == 3
    out = capsys.readouterr().out
    assert "steps: 2 per epoch, 4 in all" in out and "warning: does not fit 1.50 GB" in out
    chunk = int(out.split("training.grad_cache_chunk_size=")[1].split(" ")[0].rstrip(";"))
    followed = [*overrides, f"training.grad_cache_chunk_size={chunk}"]
    assert main(["estimate", str(path), *followed, "--device", "cpu", "--device-memory", "1.5GB"]) == 0
    assert "fits 1.50 GB" in capsys.readouterr().out
    # after a run of these settings, its measured peak is compared; a run of others is not
    from trainer.loop import train

    train(load_recipe(path, [*followed, "training.max_steps=1"]))
    capsys.readouterr()
    assert main(["estimate", str(path), *followed, "training.max_steps=1", "--device", "cpu"]) == 0
    assert "x this estimate" in capsys.readouterr().out
    assert main(["estimate", str(path), *overrides, "--device", "cpu"]) == 0
    assert "run of other settings than these; its peak is not compared" in capsys.readouterr().out
    assert main(["estimate", str(path), *followed, "training.max_steps=1", "--device", "gpu"]) == 0
    assert "was measured on a CPU; estimate with --device cpu" in capsys.readouterr().out
    (pairs.parent / "moved.jsonl").write_text("")
    pairs.unlink()
    assert main(["estimate", str(path), *overrides, "--device", "cpu"]) == 0
    assert "steps: unknown, the training data cannot be read" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["estimate", str(path), "--device-memory", "lots"])
    assert exit_info.value.code == 2 and "not a memory size such as 24GB" in capsys.readouterr().err


@pytest.mark.slow
def test_the_estimate_is_within_1_3x_of_the_measured_peak(tmp_path):
    pairs = long_pairs(tmp_path / "pairs.jsonl")
    ratios = {}
    for hidden in (256, 512):
        model = bert(tmp_path / f"bert-{hidden}", hidden, 4)
        for batch in (16, 48):
            name = f"h{hidden}-b{batch}"
            recipe = tmp_path / f"{name}.yaml"
            recipe.write_text(
                f"run_name: {name}\nmodel: {{name_or_path: {model}, max_seq_length: 128, attention_dropout: 0.0}}\n"
                f"data:\n  train: [{{kind: pairs, path: {pairs}, negatives_column: negatives}}]\n  batch_size: {batch}\n"
                f"training: {{max_steps: 2}}\nlogging: {{log_every_steps: 1}}\ncheckpointing: {{output_dir: {tmp_path / 'runs'}}}\n"
            )
            done = subprocess.run([sys.executable, "-m", "trainer.cli", "train", str(recipe)], cwd=ROOT, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
            measured = json.loads((tmp_path / "runs" / name / "summary.json").read_text())["peak_memory_gb"] * 2**30
            ratios[name] = measured / estimate(load_recipe(recipe), device="cpu").total
    assert all(1 / 1.3 <= r <= 1.3 for r in ratios.values()), ratios
    assert ratios["h512-b48"] > 0 and max(ratios.values()) - min(ratios.values()) < 0.3  # one error, not four
