"""Saving and loading the encoder."""

import torch

from trainer.config import ModelConfig
from trainer.model.encoder import Encoder, embedding_config


def test_a_student_cut_to_some_layers_reloads_as_it_was_saved(tmp_path, tiny_model):
    student = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), layers=[1], max_seq_length=16))
    student.save_pretrained(tmp_path / "student")
    again = Encoder.from_config(embedding_config(str(tmp_path / "student")))  # as eval and export load it
    assert again.num_layers == 1
    texts = ["apple river", "engine 12 and more"]
    assert torch.allclose(again.encode(texts, is_query=True), student.encode(texts, is_query=True), atol=1e-6)
