import json

import pytest
import torch
from safetensors.torch import load_file

from data_prep import student


def test_student_keeps_exactly_the_chosen_layers(tiny_model, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "student"
    assert student.main(["--from", str(tiny_model), "--layers", "1", "--out", str(out)]) == 0
    assert "kept layers [1]" in capsys.readouterr().out
    teacher = load_file(str(tiny_model / "model.safetensors"))
    cut = load_file(str(out / "model.safetensors"))
    layer_keys = [k for k in cut if ".layer." in k]
    assert layer_keys and all(".layer.0." in k for k in layer_keys)
    for key in layer_keys:
        assert torch.equal(cut[key], teacher[key.replace(".layer.0.", ".layer.1.")]), key
    assert torch.equal(cut["embeddings.word_embeddings.weight"], teacher["embeddings.word_embeddings.weight"])
    assert SentenceTransformer(str(out), device="cpu").encode(["alpha beta"]).shape == (1, 32)
    made = json.loads((out / "student.json").read_text())  # what the model card names as the base
    assert made == {"from": str(tiny_model), "layers": [1], "of_layers": 2}


def test_student_errors(tiny_model, tmp_path, capsys):
    out = tmp_path / "s"
    assert student.main(["--from", str(tiny_model), "--layers", "0", "5", "--out", str(out)]) == 2
    assert "has 2 layers (0 to 1); there is no layer 5" in capsys.readouterr().err
    assert student.main(["--from", str(tiny_model), "--layers", "1", "0", "--out", str(out)]) == 2
    assert "increasing" in capsys.readouterr().err
    out.mkdir()
    (out / "x").write_text("keep me")
    assert student.main(["--from", str(tiny_model), "--layers", "0", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "x").exists()
