"""Activation outputs recomputed in the backward pass: the same gradients to the bit, and the
outputs are not kept between the forward and the backward pass."""

import gc
import weakref

import pytest
import torch

from conftest import grads, tiny_decoder
from trainer.config import ModelConfig
from trainer.model.encoder import Encoder
from trainer.model.recompute import ActivationRecompute

TEXTS = ["apple river engine", "the story of a note about the violin", "why", "what planet 12"]


def encoders(folder, **options) -> tuple[Encoder, Encoder]:
    on, off = (Encoder.from_config(ModelConfig(name_or_path=str(folder), max_seq_length=32, recompute_activations=flag, **options)) for flag in (True, False))
    off.load_state_dict(on.state_dict())
    return on.train(), off.train()


def step(encoder: Encoder, precision: str) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(3)  # the same dropout masks
    features = encoder.tokenize(TEXTS)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        embeddings = encoder(features)
    loss = (embeddings @ embeddings.T).float().logsumexp(-1).sum()
    loss.backward()
    return loss.detach(), grads(encoder)


@pytest.mark.parametrize("precision", ["float32", "bf16"])
@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_the_same_loss_and_gradients_to_the_bit(tiny_model, tmp_path, family, precision):
    folder = tiny_model if family == "bert" else tiny_decoder(tmp_path / family, family)
    on, off = encoders(folder, **({} if family == "bert" else {"pooling": "last_token"}))
    assert len(on.recompute.modules) == 2 and off.recompute is None  # one activation per layer
    loss_on, grads_on = step(on, precision)
    loss_off, grads_off = step(off, precision)
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and grads_on
    for name in grads_on:
        assert torch.equal(grads_on[name], grads_off[name]), name


@pytest.mark.parametrize("recompute", [True, False])
def test_activation_outputs_are_not_kept_for_the_backward_pass(tiny_model, recompute):
    from trainer.model.recompute import is_pure_activation

    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=32, recompute_activations=recompute)).train()
    outputs = []
    for module in filter(is_pure_activation, encoder.backbone.modules()):
        module.register_forward_hook(lambda _m, _a, out: outputs.append(weakref.ref(out)))
    embeddings = encoder(encoder.tokenize(TEXTS))
    gc.collect()
    assert [ref() is not None for ref in outputs] == [not recompute] * 2  # kept by the next matrix product, unless recomputed
    embeddings.sum().backward()  # made again where the backward pass reads them
    assert all(p.grad is not None for p in encoder.backbone.encoder.parameters())


def test_no_gradients_no_hooks(tiny_model):
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=32))
    with torch.no_grad():
        encoder(encoder.tokenize(TEXTS))
    assert not encoder.recompute._outputs and not encoder.recompute._active


def test_with_gradient_checkpointing_too(tiny_model):
    on, off = encoders(tiny_model, gradient_checkpointing=True)
    plain = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=32, recompute_activations=False)).train()
    plain.load_state_dict(on.state_dict())
    expected = step(plain, "float32")
    for encoder in (on, off):
        loss, got = step(encoder, "float32")
        assert torch.equal(loss, expected[0])
        for name in got:
            torch.testing.assert_close(got[name], expected[1][name], rtol=0, atol=1e-6, msg=name)


def test_an_input_changed_in_place_is_an_error():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    recompute = ActivationRecompute(model)
    inputs = []
    model[1].register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with recompute.training():
        out = model(torch.randn(3, 4))
    with torch.no_grad():
        inputs[0].mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_only_stateless_activation_modules():
    from transformers.activations import ACT2FN

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), ACT2FN["gelu"], torch.nn.SiLU(), torch.nn.PReLU(), torch.nn.Dropout(0.1))
    assert [type(m).__name__ for m in ActivationRecompute(model).modules] == ["GELUActivation", "SiLU"]
