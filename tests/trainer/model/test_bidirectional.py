"""Bidirectional attention for decoders, checked against the installed transformers: a later token
changes an earlier token's state only when it is on, for every attention kernel, and the exported
folder does the same."""

import pytest
import torch

from conftest import tiny_decoder
from trainer.config import LoraConfig, ModelConfig
from trainer.export.sentence_transformers_folder import export
from trainer.model.encoder import Encoder, ModelError
from trainer.schema import FieldError


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_a_later_token_changes_an_earlier_tokens_state_only_when_bidirectional(tmp_path, family, kernel):
    folder = tiny_decoder(tmp_path, family)

    def first_token_states(bidirectional: bool) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = Encoder.from_config(ModelConfig(name_or_path=str(folder), pooling="mean", max_seq_length=32,
                                                  attn_implementation=kernel, bidirectional=bidirectional)).eval()
        encoder.tokenizer.padding_side = "left"
        features = encoder.tokenize(["apple river", "apple rivet and more"])  # same start, other ends; padded
        with torch.no_grad():
            states = encoder.backbone(**features).last_hidden_state
        real = features["attention_mask"].bool()
        return states[0][real[0]][0], states[1][real[1]][0]  # each text's first real token

    causal_a, causal_b = first_token_states(False)
    torch.testing.assert_close(causal_a, causal_b, atol=1e-5, rtol=0)  # causal: the end cannot reach the start
    full_a, full_b = first_token_states(True)
    assert (full_a - full_b).abs().max() > 1e-3  # bidirectional: it does


def test_padding_is_still_masked_and_the_export_reproduces_it(tmp_path):
    folder = tiny_decoder(tmp_path, "qwen2")
    config = ModelConfig(name_or_path=str(folder), pooling="mean", max_seq_length=32, bidirectional=True, lora=LoraConfig(rank=2, alpha=4))
    encoder = Encoder.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
        texts = ["apple river", "the story of a note about music and more"]
        batched = encoder(encoder.tokenize(texts))
        alone = torch.cat([encoder(encoder.tokenize([t])) for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)  # pads are seen by no token
    encoder.save_pretrained(tmp_path / "trained")
    assert export(tmp_path / "trained", tmp_path / "st").max_abs_diff <= 1e-5
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tmp_path / "st"), device="cpu", trust_remote_code=True)
    assert type(model[0]).__name__ == "BidirectionalTransformer"


def test_refused_where_it_cannot_apply(tmp_path, tiny_model):
    with pytest.raises(ModelError, match="no causal attention to switch off"):
        Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, bidirectional=True))
    with pytest.raises(FieldError, match="flash_attention_2 takes no full attention mask"):
        ModelConfig(name_or_path="x", bidirectional=True, attn_implementation="flash_attention_2")
