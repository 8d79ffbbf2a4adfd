"""Exported sentence-transformers folders embed exactly like the trainer's encoder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from trainer.cli import main
from trainer.config import ModelConfig
from trainer.export.sentence_transformers_folder import ExportError, PARITY_TEXTS, export
from trainer.model.encoder import Encoder

ROOT = Path(__file__).resolve().parents[3]


def embtrain_model(tiny_model: Path, folder: Path, **settings) -> Path:
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=32, **settings))
    encoder.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"pooling": "cls", "normalize": False},
        {"pooling": "last_token", "query_prompt": "query: ", "document_prompt": "passage: "},
    ],
    ids=["mean", "cls-unnormalised", "last-token-prompts"],
)
def test_fp32_export_matches_the_trainer(tmp_path, tiny_model, settings):
    from sentence_transformers import SentenceTransformer

    source = embtrain_model(tiny_model, tmp_path / "model", **settings)
    result = export(source, tmp_path / "st")
    assert result.max_abs_diff <= 1e-5
    # independently of export's own check: the folder, loaded as users load it
    model = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(source), max_seq_length=32, **settings))
    expected = encoder.encode(PARITY_TEXTS[:3], is_query=True)
    prompt_name = "query" if settings.get("query_prompt") else None
    got = model.encode(PARITY_TEXTS[:3], prompt_name=prompt_name, convert_to_tensor=True)
    assert (got - expected).abs().max().item() <= 1e-5
    config = json.loads((tmp_path / "st" / "config_sentence_transformers.json").read_text())
    assert config["similarity_fn_name"] == ("dot" if settings.get("normalize") is False else "cosine")
    from transformers import AutoModel

    assert AutoModel.from_pretrained(tmp_path / "st").config.hidden_size == 32


def test_truncated_and_half_precision_exports(tmp_path, tiny_model):
    from sentence_transformers import SentenceTransformer

    source = embtrain_model(tiny_model, tmp_path / "model")
    result = export(source, tmp_path / "st16", truncate_dim=8)
    assert result.max_abs_diff <= 1e-5
    embeddings = SentenceTransformer(str(tmp_path / "st16"), device="cpu").encode(["apple river"])
    assert embeddings.shape == (1, 8)
    assert abs(float((embeddings**2).sum()) - 1.0) < 1e-5  # truncated, then normalised
    half = export(source, tmp_path / "fp16", dtype="fp16")
    assert half.max_abs_diff <= half.tolerance
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fp16" / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor(next(iter(weights.keys()))).dtype == torch.float16


def test_a_cut_export_is_read_back_at_its_dimension_by_eval_and_mining(tmp_path, tiny_model, tiny_beir, capsys):
    from sentence_transformers import SentenceTransformer

    from trainer.model.encoder import ModelError, embedding_config

    source = embtrain_model(tiny_model, tmp_path / "model")
    export(source, tmp_path / "st8", truncate_dim=8)
    config = embedding_config(str(tmp_path / "st8"))
    assert config.embedding_dim == 8
    ours = Encoder.from_config(config).encode(PARITY_TEXTS[:3], is_query=True)
    theirs = SentenceTransformer(str(tmp_path / "st8"), device="cpu").encode(PARITY_TEXTS[:3], convert_to_tensor=True)
    assert ours.shape == (3, 8) and (ours - theirs).abs().max().item() <= 1e-5
    # eval of the cut folder equals eval of the full model at @dim8; a second export keeps the cut
    assert main(["eval", str(tmp_path / "st8"), "--beir", str(tiny_beir), "--json"]) == 0
    cut = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(source), "--beir", str(tiny_beir), "--dims", "8", "--json"]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cut["ndcg@10"] == pytest.approx(full["ndcg@10@dim8"], abs=1e-6)
    assert full["ndcg@10"] != full["ndcg@10@dim8"]
    # a Dense module that is not a cut is refused, not silently skipped
    dense = tmp_path / "st8" / "2_Dense" / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"linear.weight": torch.randn(8, 32)}, str(dense))
    with pytest.raises(ModelError, match="is a learned projection"):
        embedding_config(str(tmp_path / "st8"))


def test_a_layer_cut_export_embeds_like_the_full_models_earlier_layer(tmp_path, tiny_model, tiny_beir, capsys):
    """--layers 1 writes a 1-layer model whose embeddings are the full model's pooled layer-1 output
    (what adaptive_layers trains), loaded as such by sentence-transformers and by eval."""
    from sentence_transformers import SentenceTransformer

    from trainer.model.encoder import ModelError

    source = embtrain_model(tiny_model, tmp_path / "model")
    result = export(source, tmp_path / "st1", num_layers=1)
    assert result.max_abs_diff <= 1e-5
    full = Encoder.from_config(ModelConfig(name_or_path=str(source), max_seq_length=32)).eval()
    with torch.no_grad():
        layer1 = full(full.tokenize(PARITY_TEXTS[:3]), layers=(1,))[:, 1]
    theirs = SentenceTransformer(str(tmp_path / "st1"), device="cpu").encode(PARITY_TEXTS[:3], convert_to_tensor=True)
    assert (theirs - layer1).abs().max().item() <= 1e-5
    assert json.loads((tmp_path / "st1" / "config.json").read_text())["num_hidden_layers"] == 1
    # eval --layers 1 on the full model equals eval of the cut folder
    assert main(["eval", str(tmp_path / "st1"), "--beir", str(tiny_beir), "--json"]) == 0
    cut = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(source), "--beir", str(tiny_beir), "--layers", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(cut, abs=1e-6)
    with pytest.raises(ExportError, match="has 2 layers; keep between 1 and 2"):
        export(source, tmp_path / "st3", num_layers=3)
    with pytest.raises(ModelError, match="has 2 layers"):
        Encoder.from_config(ModelConfig(name_or_path=str(source), max_seq_length=32, num_layers=5))


def test_refuses_bad_input_and_overwrites_only_when_asked(tmp_path, tiny_model):
    source = embtrain_model(tiny_model, tmp_path / "model")
    with pytest.raises(ExportError, match="not an embtrain model"):
        export(tiny_model, tmp_path / "a")
    with pytest.raises(ExportError, match="not found"):
        export(tmp_path / "nowhere", tmp_path / "a")
    export(source, tmp_path / "out")
    with pytest.raises(ExportError, match="exists and is not empty; pass --overwrite"):
        export(source, tmp_path / "out")
    export(source, tmp_path / "out", overwrite=True)
    with pytest.raises(ExportError, match="--dim 99 must be between 1 and the model's 32"):
        export(source, tmp_path / "b", truncate_dim=99)
    (source / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExportError, match="cannot load the model"):
        export(source, tmp_path / "c")
    (source / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="incomplete checkpoint"):
        export(source, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_cli_export_of_a_run_writes_card_and_plot_and_loads_in_a_fresh_process(
    tmp_path, tiny_model, pairs_file, tiny_beir, capsys
):
    from accelerate.state import AcceleratorState

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""run_name: card
model: {{name_or_path: {tiny_model}, max_seq_length: 16, query_prompt: "q: "}}
data:
  train: [{{kind: pairs, path: {pairs_file}}}]
  batch_size: 8
training: {{max_steps: 4}}
logging: {{log_every_steps: 1}}
evaluation:
  sets: [{{kind: retrieval, name: tiny, path: {tiny_beir}}}]
  metric_for_best: tiny/ndcg@10
checkpointing: {{output_dir: {tmp_path / 'runs'}}}
"""
    )
    try:
        assert main(["train", str(recipe)]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / "exported"
    code = main([
        "export", str(tmp_path / "runs" / "card" / "step_4"), "--out", str(out), "--name", "me/tiny",
        "--license", "mit", "--base-model", "org/base", "--datasets", "org/pairs",
    ])
    assert code == 0
    assert "parity with the trainer's embeddings" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "sentence-transformers" and metadata["license"] == "mit"
    assert metadata["base_model"] == "org/base" and metadata["datasets"] == ["org/pairs"]
    final = [json.loads(l) for l in (tmp_path / "runs" / "card" / "metrics.jsonl").read_text().splitlines()][-1]
    ndcg = metadata["model-index"][0]["results"][0]["metrics"][0]
    assert ndcg == {"type": "ndcg_at_10", "value": round(final["tiny/ndcg@10"], 4)}
    assert "max_steps: 4" in card and "![training loss and evaluation](training_curves.png)" in card
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"] == {"query": "q: "}

    # a fresh process loads the folder with sentence-transformers alone
    code = (
        "import sys, json; from sentence_transformers import SentenceTransformer;"
        "m = SentenceTransformer(sys.argv[1], device='cpu');"
        "print(json.dumps(m.encode(['apple'], prompt_name='query').tolist()))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = torch.tensor(json.loads(done.stdout))
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tmp_path / "runs" / "card" / "step_4" / "model"),
                                              max_seq_length=16, query_prompt="q: "))
    assert (fresh - encoder.encode(["apple"], is_query=True)).abs().max().item() <= 1e-5


def test_onnx_export_matches_within_its_tolerance(tmp_path, tiny_model):
    pytest.importorskip("onnxruntime")
    from trainer.export.onnx import ONNX_FILE, ONNX_TOLERANCE, onnx_embeddings

    source = embtrain_model(tiny_model, tmp_path / "model", query_prompt="q: ")
    result = export(source, tmp_path / "st", onnx=True)
    assert (tmp_path / "st" / ONNX_FILE).exists()
    assert result.onnx_max_abs_diff is not None and result.onnx_max_abs_diff <= ONNX_TOLERANCE
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(source), max_seq_length=32, query_prompt="q: "))
    texts = ["a text never seen by the exporter", "apple river engine"]
    got = onnx_embeddings(tmp_path / "st", encoder, texts, "q: ", None)
    assert (got - encoder.encode(texts, is_query=True)).abs().max().item() <= ONNX_TOLERANCE


def test_model_card_leaves_out_what_a_damaged_run_folder_cannot_give(tmp_path, capsys):
    from trainer.export.model_card import read_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_bytes(b"run_name: caf\xe9\n")  # not UTF-8
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "tiny/ndcg@10": 0.5}\n{"step": 3, "lo')
    record = read_run(run)
    assert record.recipe is None and record.losses == [(1, 2.5)] and record.evaluations == [{"step": 2, "tiny/ndcg@10": 0.5}]
    err = capsys.readouterr().err
    assert "recipe.yaml: not read" in err and "metrics.jsonl: 1 unreadable line(s)" in err


def test_model_card_scores_the_exported_cut_and_describes_nested_losses(tmp_path):
    from trainer.export.model_card import write_model_card

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(
        "model: {name_or_path: org/base}\n"
        "loss:\n"
        "  - kind: matryoshka\n"
        "    dims: [32, 8]\n"
        "    terms:\n"
        "      - {kind: infonce, temperature: 0.05, directions: [query_to_doc, doc_to_query], guide: {name_or_path: org/guide}}\n"
        "  - {kind: gor, weight: 0.1}\n"
    )
    (run / "metrics.jsonl").write_text(
        '{"step": 0, "tiny/ndcg@10": 0.4, "tiny/ndcg@10@dim8": 0.2}\n'
        '{"step": 5, "tiny/ndcg@10": 0.6, "tiny/ndcg@10@dim8": 0.5, "sts/spearman": 0.7, "sts/spearman@dim8": 0.65}\n'
    )

    def card(**cut) -> tuple[dict, str]:
        folder = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        text = write_model_card(folder, name="me/m", run_dir=run, dimension=8, similarity="cosine", prompts={}, **cut).read_text()
        return yaml.safe_load(text.split("---")[1]), text

    def headline(metadata: dict) -> dict[str, float]:
        return {m["type"]: m["value"] for r in metadata.get("model-index", [{}])[0].get("results", []) for m in r["metrics"]}

    metadata, text = card(cut_dim=8)
    assert headline(metadata) == {"ndcg_at_10": 0.5, "spearman": 0.65}  # the 8-dim model's, not the full one's
    assert "its scores are the `@dim8` rows" in text
    assert "matryoshka (dims [32, 8]) of [infonce (temperature 0.05, directions ['query_to_doc', 'doc_to_query'], guide org/guide)]" in text
    assert "+ 0.1 x gor" in text
    assert headline(card()[0]) == {"ndcg_at_10": 0.6, "spearman": 0.7}
    metadata, text = card(cut_dim=16)  # not evaluated at that size: no headline score at all
    assert "model-index" not in metadata and "at which the run did not evaluate" in text
    metadata, text = card(cut_layers=2)
    assert "model-index" not in metadata and "cut to its first 2 layers" in text


def test_model_card_shows_the_exported_checkpoints_own_step_and_scores(tmp_path):
    from trainer.export.model_card import STUDENT_FILE, write_model_card

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 0, "tiny/ndcg@10": 0.4}\n{"step": 5, "loss": 1.5}\n{"step": 10, "tiny/ndcg@10": 0.6}\n'
        '{"step": 15, "loss": 0.9}\n{"step": 20, "tiny/ndcg@10": 0.5}\n'
    )
    student = tmp_path / "student"
    student.mkdir()
    (student / STUDENT_FILE).write_text(json.dumps({"from": "org/teacher", "layers": [0, 2, 5], "of_layers": 6}))

    def card(recipe: str, **options) -> tuple[dict, str]:
        (run / "recipe.yaml").write_text(recipe)
        folder = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        text = write_model_card(folder, name="me/m", run_dir=run, dimension=8, similarity="cosine", prompts={}, **options).read_text()
        return yaml.safe_load(text.split("---")[1]), text

    texts_only = "model: {name_or_path: org/base, layers: [0, 3]}\ndata: {train: [{kind: texts, path: t.txt}], batch_size: 4}\n"
    metadata, text = card(texts_only, step=10)  # best/ saved at step 10, after which the run went on
    assert metadata["model-index"][0]["results"][0]["metrics"] == [{"type": "ndcg_at_10", "value": 0.6}]
    assert "Steps trained: 10" in text and "At step 10;" in text
    assert "a student of `org/base` (2 of its layers: 0, 3)" in text and metadata["base_model"] == "org/base"
    assert "hard negatives" not in text  # texts have no negatives
    metadata, text = card(f"model: {{name_or_path: {student}}}\ndata: {{train: [{{kind: pairs, path: p.jsonl}}], batch_size: 4}}\n")
    assert "Steps trained: 20" in text  # no checkpoint step given: the last step the run logged
    assert "a student of `org/teacher` (3 of its layers: 0, 2, 5)" in text and metadata["base_model"] == "org/teacher"
    assert str(student) not in text.split("## Training")[0] and "hard negatives per query: as in the data" in text
