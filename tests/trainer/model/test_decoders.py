"""Decoder backbones (tiny random Qwen2 and Llama): last-token pooling on the appended EOS under
left and right padding, precision and attention kernel from the recipe, and exports that keep it."""

import pytest
import torch

from conftest import tiny_decoder
from trainer.config import LoraConfig, ModelConfig
from trainer.export.sentence_transformers_folder import export
from trainer.model.encoder import Encoder, ModelError

TEXTS = ["apple river engine", "the story of a note about music", "why", "and what is the text of the river"]


@pytest.fixture(params=["qwen2", "llama"])
def decoder(request, tmp_path):
    return tiny_decoder(tmp_path / request.param, request.param)


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_pooling_reads_the_appended_eos_under_either_padding(decoder, side):
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(decoder), pooling="last_token", max_seq_length=32))
    encoder.tokenizer.padding_side = side
    features = encoder.tokenize(TEXTS)
    mask, ids = features["attention_mask"].bool(), features["input_ids"]
    last = [row[m][-1].item() for row, m in zip(ids, mask)]
    assert last == [encoder.tokenizer.eos_token_id] * len(TEXTS)  # every text ends with its EOS
    assert (mask[:, 0] if side == "right" else mask[:, -1]).all() and not mask.all()  # padded on that side
    with torch.no_grad():
        batched = encoder.eval()(features)
        alone = torch.cat([encoder(encoder.tokenize([t])) for t in TEXTS])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)  # padding changes nothing
    truncated = encoder.tokenize(["the story " * 40])["input_ids"][0]
    assert len(truncated) == 32 and truncated[-1].item() == encoder.tokenizer.eos_token_id  # kept when cut


def test_the_export_of_a_lora_decoder_ends_texts_with_eos_and_matches(decoder, tmp_path):
    config = ModelConfig(name_or_path=str(decoder), pooling="last_token", max_seq_length=32, lora=LoraConfig(rank=2, alpha=4))
    encoder = Encoder.from_config(config)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    encoder.save_pretrained(tmp_path / "trained")
    result = export(tmp_path / "trained", tmp_path / "st")  # fails unless sentence-transformers reproduces it
    assert result.max_abs_diff <= 1e-5
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert model.tokenizer("apple")["input_ids"][-1] == model.tokenizer.eos_token_id


def test_precision_and_attention_kernel_come_from_the_recipe(decoder):
    half = Encoder.from_config(ModelConfig(name_or_path=str(decoder), pooling="last_token", torch_dtype="bfloat16",
                                           attn_implementation="eager", max_seq_length=16))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.backbone.config._attn_implementation == "eager"
    default = Encoder.from_config(ModelConfig(name_or_path=str(decoder), pooling="last_token", max_seq_length=16))
    assert {p.dtype for p in default.parameters()} == {torch.float32}
    assert default.backbone.config._attn_implementation == "sdpa"
    lora = Encoder.from_config(ModelConfig(name_or_path=str(decoder), torch_dtype="bfloat16", max_seq_length=16, lora=LoraConfig()))
    trained = {p.dtype for p in lora.parameters() if p.requires_grad}
    assert trained == {torch.float32}  # adapters train in float32 on a half-precision base
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match="flash-attn"):
            Encoder.from_config(ModelConfig(name_or_path=str(decoder), attn_implementation="flash_attention_2", max_seq_length=16))
