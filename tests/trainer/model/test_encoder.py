"""Saving and loading the encoder."""

import pytest
import torch

from trainer.config import ModelConfig
from trainer.schema import FieldError
from trainer.model.encoder import Encoder, embedding_config


def test_a_student_cut_to_some_layers_reloads_as_it_was_saved(tmp_path, tiny_model):
    student = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), layers=[1], max_seq_length=16))
    student.save_pretrained(tmp_path / "student")
    again = Encoder.from_config(embedding_config(str(tmp_path / "student")))  # as eval and export load it
    assert again.num_layers == 1
    texts = ["apple river", "engine 12 and more"]
    assert torch.allclose(again.encode(texts, is_query=True), student.encode(texts, is_query=True), atol=1e-6)


def test_prompt_tokens_can_be_left_out_of_pooling_as_sentence_transformers_does(tmp_path, tiny_model):
    from sentence_transformers import SentenceTransformer

    from trainer.data.collate import PROMPT_LENGTH, TextTokenizer
    from trainer.data.examples import Example
    from trainer.export.sentence_transformers_folder import export

    config = ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, query_prompt="what about ", pool_prompt=False)
    encoder = Encoder.from_config(config).eval()
    texts = ["apple river", "engine 12 and more"]
    with_prompt = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, query_prompt="what about ")).eval()
    got = encoder.encode(texts, is_query=True)
    assert (got - with_prompt.encode(texts, is_query=True)).abs().max() > 1e-3  # the prompt is out of the mean
    # by hand: the mean over the text's own tokens and [SEP], after [CLS] and the 2 prompt words
    features = encoder.tokenize(["what about apple river"])
    with torch.no_grad():
        states = encoder.backbone(**features).last_hidden_state[0]
    torch.testing.assert_close(got[0], torch.nn.functional.normalize(states[3:].mean(0), dim=0), atol=1e-6, rtol=0)

    # the training batch carries each row's prompt length: its source's prompt
    tokenizer = TextTokenizer(encoder.tokenizer, 16, [("what about ", "doc: "), ("", "")], pool_prompt=False)
    queries, documents = tokenizer([Example("apple", "river", (), source=0), Example("engine", "gear", ("x",), source=1)])
    assert queries[PROMPT_LENGTH].tolist() == [3, 0] and documents[PROMPT_LENGTH].tolist() == [3, 0, 0]  # [CLS] doc :

    encoder.save_pretrained(tmp_path / "trained")  # the export checks parity with sentence-transformers
    assert export(tmp_path / "trained", tmp_path / "st").max_abs_diff <= 1e-5
    exported = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert not exported[1].include_prompt
    assert embedding_config(str(tmp_path / "st")).pool_prompt is False


def test_settings_that_cannot_be_served_alike_are_refused(tmp_path, tiny_model):
    from trainer.schema import FieldError

    with pytest.raises(FieldError, match="cls pooling reads the first token"):
        ModelConfig(name_or_path="x", pooling="cls", pool_prompt=False)


def test_the_recipes_dropouts_reach_the_model_and_a_missing_one_is_refused(tiny_model, tmp_path):
    from conftest import tiny_decoder
    from trainer.model.encoder import ModelError

    default = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16))
    assert default.backbone.config.attention_probs_dropout_prob == 0.0 and default.backbone.config.hidden_dropout_prob == 0.1
    own = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, attention_dropout=None))
    assert own.backbone.config.attention_probs_dropout_prob == 0.1 and own.backbone.config.hidden_dropout_prob == 0.1
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, attention_dropout=0.0, hidden_dropout=0.25))
    assert encoder.backbone.config.attention_probs_dropout_prob == 0.0 and encoder.backbone.config.hidden_dropout_prob == 0.25
    dropouts = [m.p for m in encoder.backbone.modules() if isinstance(m, torch.nn.Dropout)]
    assert 0.25 in dropouts and 0.1 not in dropouts
    # the attention kernel reads its dropout from the config: in training, no attention dropout
    # gives the same states as eval mode when the hidden dropout is 0 too
    quiet = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, attention_dropout=0.0, hidden_dropout=0.0)).train()
    features = quiet.tokenize(["apple banana", "cherry"])
    torch.testing.assert_close(quiet(features), quiet.eval()(features))
    decoder = tiny_decoder(tmp_path / "qwen2")
    assert Encoder.from_config(ModelConfig(name_or_path=str(decoder), max_seq_length=16, attention_dropout=0.2)).backbone.config.attention_dropout == 0.2
    with pytest.raises(ModelError, match="hidden_dropout: .* has no such dropout .* set it to 0 or null"):
        Encoder.from_config(ModelConfig(name_or_path=str(decoder), max_seq_length=16, hidden_dropout=0.1))
    quiet_decoder = Encoder.from_config(ModelConfig(name_or_path=str(decoder), max_seq_length=16, hidden_dropout=0.0))
    assert not hasattr(quiet_decoder.backbone.config, "hidden_dropout")  # nothing to switch off
    with pytest.raises(FieldError, match="attention_dropout"):
        ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, attention_dropout=1.0)


def test_checkpoints_and_exports_keep_the_models_own_dropouts(tiny_model, tmp_path):
    """The recipe's dropouts are a training setting: config.json keeps the model's own, and
    loading the folder with its saved settings applies the recipe's again."""
    import json

    from trainer.config import LoraConfig
    from trainer.export.sentence_transformers_folder import export

    def saved(folder):
        config = json.loads((folder / "config.json").read_text())
        return config["attention_probs_dropout_prob"], config["hidden_dropout_prob"]

    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, hidden_dropout=0.2))
    encoder.save_pretrained(tmp_path / "trained")
    assert saved(tmp_path / "trained") == (0.1, 0.1)
    live = encoder.backbone.config
    assert (live.attention_probs_dropout_prob, live.hidden_dropout_prob) == (0.0, 0.2)  # training goes on with the recipe's
    again = Encoder.from_config(embedding_config(str(tmp_path / "trained")))  # as resume, eval and export load it
    assert (again.backbone.config.attention_probs_dropout_prob, again.backbone.config.hidden_dropout_prob) == (0.0, 0.2)
    export(tmp_path / "trained", tmp_path / "st")
    assert saved(tmp_path / "st") == (0.1, 0.1)

    adapter = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, lora=LoraConfig(rank=2)))
    adapter.save_pretrained(tmp_path / "adapter")
    assert saved(tmp_path / "adapter") == (0.1, 0.1)
    export(tmp_path / "adapter", tmp_path / "merged")
    assert saved(tmp_path / "merged") == (0.1, 0.1)


def widths_seen(encoder: Encoder) -> list[int]:
    widths = []
    encoder.backbone.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    return widths


def test_encode_pads_each_batch_to_its_shape_bucket_and_embeds_as_alone(tiny_model):
    """A corpus brings a few tensor shapes (oneDNN keeps kernels per shape), embeddings unchanged."""
    from conftest import FILLER, TOPICS
    from trainer.model.sub_batches import bucket_length

    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=64)).double()
    texts = [" ".join((TOPICS + FILLER)[: 3 + 2 * i]) for i in range(12)]  # 5 to 27 tokens
    widths = widths_seen(encoder)
    got = encoder.encode(texts, is_query=False, batch_size=3)
    lengths = sorted((int(m.sum()) for m in encoder.tokenize(texts)["attention_mask"]), reverse=True)
    assert widths == [bucket_length(lengths[i]) for i in range(0, 12, 3)]
    assert any(w > lengths[i] for w, i in zip(widths, range(0, 12, 3)))  # some batch was widened
    alone = torch.cat([encoder.encode([t], is_query=False) for t in texts])
    torch.testing.assert_close(got, alone, atol=1e-12, rtol=0)


def test_encode_never_widens_left_padding(tmp_path):
    from conftest import tiny_decoder

    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_decoder(tmp_path / "qwen2")), pooling="last_token", max_seq_length=64))
    encoder.tokenizer.padding_side = "left"
    encoder = encoder.double()
    texts = ["apple river engine and the story of it", "why", "the note"]  # 39, 4 and 9 tokens with the EOS
    widths = widths_seen(encoder)
    got = encoder.encode(texts, is_query=False, batch_size=3)
    assert widths == [39]  # the longest text's length; its bucket (40) would shift positions under left padding
    alone = torch.cat([encoder.encode([t], is_query=False) for t in texts])
    torch.testing.assert_close(got, alone, atol=1e-10, rtol=0)


def test_short_rows_in_bf16_on_a_cpu_run_the_unfused_attention_kernel(tiny_model):
    """In training, there PyTorch's fused kernel is the slower one (README: Speed); float32,
    wide rows, evaluation and GPUs keep PyTorch's choice."""
    from contextlib import nullcontext

    from trainer.model.encoder import UNFUSED_ATTENTION_WIDTH, attention_backend

    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16)).train()
    fused_allowed = []
    attention = next(m for name, m in encoder.backbone.named_modules() if name.endswith("attention.self"))
    attention.register_forward_pre_hook(lambda *_: fused_allowed.append(torch.backends.cuda.flash_sdp_enabled()))
    features = encoder.tokenize(["apple banana cherry", "river"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():  # a training forward, as the cached loss's first pass: the same kernel as with gradient
            encoder(features)
        encoder(features)
        in_bf16 = encoder.eval()(features)  # evaluation, mining: no backward pass, the fused kernel is faster
    in_fp32 = encoder(features)
    assert fused_allowed == [False, False, True, True] and torch.backends.cuda.flash_sdp_enabled()  # restored after
    torch.testing.assert_close(in_bf16.float(), in_fp32, atol=0.03, rtol=0)
    cpu = torch.device("cpu")
    assert not isinstance(attention_backend(UNFUSED_ATTENTION_WIDTH, cpu, torch.bfloat16, True), nullcontext)
    assert isinstance(attention_backend(UNFUSED_ATTENTION_WIDTH + 32, cpu, torch.bfloat16, True), nullcontext)
    assert isinstance(attention_backend(32, cpu, torch.float32, True), nullcontext)
    assert isinstance(attention_backend(32, cpu, torch.bfloat16, False), nullcontext)
    assert isinstance(attention_backend(32, torch.device("meta"), torch.bfloat16, True), nullcontext)


def test_gradient_checkpointing_in_bf16_keeps_the_kernel_its_layers_run_again_with(tiny_model):
    """Checkpointed layers run again in the backward pass, outside the forward's kernel choice:
    the forward keeps PyTorch's choice, so both save alike."""
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, gradient_checkpointing=True)).train()
    features = encoder.tokenize(["apple banana cherry", "river"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = encoder(features)
    embeddings.float().sum().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)
