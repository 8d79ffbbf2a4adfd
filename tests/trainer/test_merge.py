"""embtrain merge: the weighted average of several models' weights, written as a model folder."""

import json

import pytest
import torch

from trainer.cli import main
from trainer.config import LoraConfig, ModelConfig
from trainer.merge import MergeError, merge
from trainer.model.encoder import Encoder, embedding_config


def perturbed(tiny_model, folder, seed: int, **settings) -> Encoder:
    """The tiny model with every weight moved at random, saved as an embtrain model folder."""
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, **settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    encoder.save_pretrained(folder)
    return encoder


def test_merge_equals_a_hand_weighted_average_and_embeds_with_it(tmp_path, tiny_model):
    models = [perturbed(tiny_model, tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))]
    out = merge([str(tmp_path / n) for n in "abc"], tmp_path / "soup", weights=[2, 1, 1])
    states = [m.state_dict() for m in models]
    soup = Encoder.from_config(embedding_config(str(out)))
    for key, tensor in soup.state_dict().items():
        if tensor.is_floating_point():
            expected = 0.5 * states[0][key] + 0.25 * states[1][key] + 0.25 * states[2][key]
            torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(tensor, states[0][key])
    assert not torch.equal(soup.state_dict()[next(iter(states[0]))], states[0][next(iter(states[0]))])
    assert json.loads((out / "merge.json").read_text())["weights"] == [0.5, 0.25, 0.25]
    texts = ["apple river", "engine 12"]
    with torch.no_grad():
        assert soup.encode(texts, is_query=True).shape == (2, soup.dim)


def test_a_lora_checkpoint_is_merged_into_its_base_before_averaging(tmp_path, tiny_model):
    lora = LoraConfig(rank=2, alpha=4, dropout=0.0, target_modules=["query", "value"])
    adapter = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, lora=lora))
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.05)
    adapter.save_pretrained(tmp_path / "lora")
    effective = Encoder.from_config(embedding_config(str(tmp_path / "lora"))).state_dict()  # adapter merged
    full = perturbed(tiny_model, tmp_path / "full", seed=5).state_dict()
    out = merge([str(tmp_path / "lora"), str(tmp_path / "full")], tmp_path / "soup")
    soup = Encoder.from_config(embedding_config(str(out))).state_dict()
    key = next(k for k in soup if k.endswith("attention.self.query.weight"))
    torch.testing.assert_close(soup[key], (effective[key] + full[key]) / 2, rtol=0, atol=1e-6)
    assert not any("lora" in k for k in soup)


def test_merge_refuses_models_that_do_not_fit_together(tmp_path, tiny_model):
    perturbed(tiny_model, tmp_path / "a", 1)
    perturbed(tiny_model, tmp_path / "cls", 2, pooling="cls")
    with pytest.raises(MergeError, match="embeds differently.*pooling 'cls' vs 'mean'"):
        merge([str(tmp_path / "a"), str(tmp_path / "cls")], tmp_path / "soup")
    with pytest.raises(MergeError, match="2 weights for 3 models"):
        merge([str(tmp_path / "a")] * 3, tmp_path / "soup", weights=[1, 2])
    with pytest.raises(MergeError, match="at least two"):
        merge([str(tmp_path / "a")], tmp_path / "soup")
    with pytest.raises(MergeError, match="overlaps the input"):
        merge([str(tmp_path / "a"), str(tmp_path / "a")], tmp_path / "a" / "soup")
    assert not (tmp_path / "soup").exists()


def test_merge_refuses_different_shapes(tmp_path, tiny_model):
    from transformers import BertConfig, BertModel

    perturbed(tiny_model, tmp_path / "a", 1)
    wider = tmp_path / "wider"
    config = BertConfig.from_pretrained(tiny_model)
    config.intermediate_size = 48
    BertModel(config).save_pretrained(wider)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model / name).exists():
            (wider / name).write_bytes((tiny_model / name).read_bytes())
    with pytest.raises(MergeError, match="intermediate.dense.weight has shape"):
        merge([str(tmp_path / "a"), str(wider)], tmp_path / "soup")


def test_merge_through_the_cli_refuses_to_overwrite_without_the_flag(tmp_path, tiny_model, capsys):
    perturbed(tiny_model, tmp_path / "a", 1)
    perturbed(tiny_model, tmp_path / "b", 2)
    args = ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "soup")]
    assert main(args) == 0
    assert "merged 2 models (weights 0.5, 0.5)" in capsys.readouterr().out
    assert main(args) != 0
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
