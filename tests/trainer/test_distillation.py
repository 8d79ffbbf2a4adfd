"""Distillation in training: texts sources, online teachers of another width, the projection in
checkpoints and resume, and out of the exported model."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_pairs, write_recipe
from trainer.config import TextsSource, load_recipe
from trainer.data.errors import DataError
from trainer.data.readers import read_training_data
from trainer.errors import RunError
from trainer.loop import train


@pytest.fixture(scope="session")
def wide_teacher(tiny_model, tmp_path_factory) -> Path:
    """A 2-layer BERT of hidden size 48 with the tiny model's vocabulary: a teacher of another width."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("wide-teacher")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_model / name).exists():
            shutil.copy(tiny_model / name, folder / name)
    config = BertConfig.from_pretrained(tiny_model)
    config.hidden_size, config.intermediate_size = 48, 96
    torch.manual_seed(1)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def texts_file(tmp_path) -> Path:
    rows = [{"text": r["positive"], "title": f"t{i}"} for i, r in enumerate(make_pairs(40, seed=5))]
    rows.append(dict(rows[0]))  # a repeated text is used once
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def texts(source: TextsSource) -> list[str]:
    data = read_training_data([source], None)
    return [data[i].query for i in range(len(data))]


def test_texts_source_reads_each_distinct_text_once(texts_file, tmp_path):
    plain = texts(TextsSource(kind="texts", path=str(texts_file)))
    assert len(plain) == 40 and len(set(plain)) == 40
    titled = texts(TextsSource(kind="texts", path=str(texts_file), title_column="title"))
    assert titled[0] == f"t0 {plain[0]}" and len(titled) == 40
    both = texts(TextsSource(kind="texts", path=str(texts_file), text_columns=["title", "text"], max_examples=5))
    assert both == ["t0", plain[0], "t1", plain[1], "t2"]
    data = read_training_data([TextsSource(kind="texts", path=str(texts_file))], None)
    assert data[0].positive is None and data[0].negatives == ()

    sts = tmp_path / "sts.csv"
    sts.write_text("g\tf\t2012\t1\t2.5\tA girl styles her hair.\tA girl brushes her hair.\n"
                   "g\tf\t2012\t2\t5.0\tA man sings.\tA girl styles her hair.\n")
    assert texts(TextsSource(kind="texts", path=str(sts), format="stsb")) == [
        "A girl styles her hair.", "A girl brushes her hair.", "A man sings.",
    ]


def test_texts_source_reads_a_plain_file_one_text_per_line(tmp_path, capsys):
    from trainer.cli import main

    path = tmp_path / "sentences.txt"
    path.write_text("\ufeffA girl styles her hair.\n\n  \nA man sings.\nA girl styles her hair.\nLast line, no end")
    assert texts(TextsSource(kind="texts", path=str(path))) == ["A girl styles her hair.", "A man sings.", "Last line, no end"]
    assert texts(TextsSource(kind="texts", path=str(path), format="txt", max_examples=1)) == ["A girl styles her hair."]
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="blank.txt: no texts"):
        read_training_data([TextsSource(kind="texts", path=str(tmp_path / "blank.txt"))], None)
    (tmp_path / "latin1.txt").write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(DataError, match="latin1.txt, line 2"):
        read_training_data([TextsSource(kind="texts", path=str(tmp_path / "latin1.txt"))], None)

    # validate refuses what train would refuse: a .txt of pairs, columns a .txt does not have
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"run_name: r\nmodel: {{name_or_path: m}}\ndata: {{train: [{{kind: pairs, path: {path}}}, "
                      f"{{kind: texts, path: {path}, text_columns: [body]}}, {{kind: texts, path: {path}}}]}}\n")
    assert main(["validate", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "data.train.0.format:" in err and "set format: jsonl|csv|tsv|parquet" in err
    assert "data.train.1.text_columns: " in err and "no column 'body' (columns: ['text'])" in err
    assert "data.train.2" not in err


def test_texts_source_errors_name_the_row_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": "x", "b": "y"}\n{"a": "z", "b": ""}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, row 2: column 'b' is empty"):
        read_training_data([TextsSource(kind="texts", path=str(path), text_columns=["a", "b"])], None)
    with pytest.raises(DataError, match="missing column 'text'.*text_columns"):
        read_training_data([TextsSource(kind="texts", path=str(path))], None)


def distill_recipe(tmp_path, tiny_model, pairs_file, texts_file, teacher, extra_loss="", cached=False):
    loss = f"""loss:
  - {{kind: embed_distill, teacher: {{name_or_path: {teacher}}}}}
  - {{kind: jasper, teacher: {{name_or_path: {teacher}}}, weight: 0.1}}
  - {{kind: distill_kl, teacher: {{name_or_path: {teacher}}}}}
{extra_loss}"""
    path = write_recipe(tmp_path, tiny_model, pairs_file, loss)
    text = path.read_text().replace(
        "train: [{kind: pairs,", f"train: [{{kind: texts, path: {texts_file}}}, {{kind: pairs,"
    )
    if cached:
        text = text.replace("training: {max_steps: 4}", "training: {max_steps: 4, grad_cache_chunk_size: 3}")
    path.write_text(text)
    return path


@pytest.mark.parametrize("cached", [False, True])
def test_distilling_from_a_wider_teacher_on_texts_and_pairs(tmp_path, tiny_model, pairs_file, texts_file, wide_teacher, cached):
    recipe = distill_recipe(tmp_path, tiny_model, pairs_file, texts_file, wide_teacher, cached=cached)
    train(load_recipe(recipe, ["checkpointing.every_steps=null"]))
    lines = [json.loads(line) for line in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    losses = [line for line in lines if "loss" in line]
    assert len(losses) == 4 and all(math.isfinite(line["loss"]) for line in losses)
    saved = load_file(str(tmp_path / "runs" / "r" / "step_4" / "accelerate" / "model_1.safetensors"))
    assert saved["terms.0.projection.maps.32.weight"].shape == (48, 32)  # student 32 -> teacher 48
    assert saved["terms.1.projection.maps.32.weight"].shape == (48, 32)


def test_projection_resumes_exactly_and_stays_out_of_the_export(tmp_path, tiny_model, pairs_file, texts_file, wide_teacher):
    from trainer.export.sentence_transformers_folder import export

    recipe = distill_recipe(tmp_path, tiny_model, pairs_file, texts_file, wide_teacher)
    train(load_recipe(recipe, ["run_name=full", "checkpointing.every_steps=null"]))
    train(load_recipe(recipe))
    run_dir = tmp_path / "runs" / "r"
    shutil.rmtree(run_dir / "step_4")
    train(load_recipe(recipe), resume=True)
    full, resumed = (load_file(str(p / "step_4" / "accelerate" / "model_1.safetensors")) for p in (tmp_path / "runs" / "full", run_dir))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    out = tmp_path / "exported"
    export(run_dir / "step_4", out)
    for weights in out.rglob("*.safetensors"):
        assert not any("projection" in key for key in load_file(str(weights)))


def test_texts_sources_need_a_term_that_takes_single_texts(tmp_path, tiny_model, pairs_file, texts_file):
    path = distill_recipe(tmp_path, tiny_model, pairs_file, texts_file, tiny_model)
    text = path.read_text()
    text = text[: text.index("loss:")] + "loss: [{kind: infonce}]\n"
    path.write_text(text)
    with pytest.raises(RunError, match="every loss term needs"):
        train(load_recipe(path))


def test_export_with_the_projection_gives_the_teachers_space(tmp_path, tiny_model, pairs_file, texts_file, wide_teacher, tiny_beir):
    from sentence_transformers import SentenceTransformer

    from trainer.cli import main
    from trainer.model.encoder import Encoder, embedding_config

    recipe = distill_recipe(tmp_path, tiny_model, pairs_file, texts_file, wide_teacher)
    recipe.write_text(recipe.read_text() + f"evaluation: {{sets: [{{kind: retrieval, name: tiny, path: {tiny_beir}}}], metric_for_best: tiny/ndcg@10}}\n")
    train(load_recipe(recipe, ["checkpointing.every_steps=null"]))
    step = tmp_path / "runs" / "r" / "step_4"
    out = tmp_path / "projected"
    assert main(["export", str(step), "--out", str(out), "--projection"]) == 2  # two terms learned one: name it
    assert main(["export", str(step), "--out", str(out), "--projection", "terms.0.projection.maps.32"]) == 0
    model = SentenceTransformer(str(out), device="cpu")
    got = model.encode(["alpha beta"], convert_to_tensor=True)
    assert got.shape == (1, 48)
    weights = load_file(str(step / "accelerate" / "model_1.safetensors"))
    student = Encoder.from_config(embedding_config(str(step))).eval()
    expected = student.encode(["alpha beta"], is_query=True) @ weights["terms.0.projection.maps.32.weight"].T + weights["terms.0.projection.maps.32.bias"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    best = tmp_path / "runs" / "r" / "best"  # keeps the loss's parameters too, so it exports the same way
    assert main(["export", str(best), "--out", str(tmp_path / "from-best"), "--projection", "terms.0.projection.maps.32"]) == 0
