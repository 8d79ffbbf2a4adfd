"""NV-Embed's latent-attention pooling: a trained module that is checkpointed, resumed and exported."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_decoder, write_recipe
from trainer.config import LatentAttentionConfig, ModelConfig, RecipeError, load_recipe
from trainer.loop import train
from trainer.model.encoder import Encoder, embedding_config
from trainer.model.latent_attention import LatentAttention


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_tokens_attend_to_the_latents_then_an_mlp_then_the_masked_mean():
    torch.manual_seed(0)
    module = LatentAttention(8, num_latents=4, num_heads=2, mlp_dim=16).eval()
    states, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    # by hand: the tokens are the queries, the normed latents the keys and values
    latents = torch.nn.functional.layer_norm(module.latents, (8,), module.norm_latents.weight, module.norm_latents.bias)
    tokens = module.norm_tokens(states)
    w_q, w_k, w_v = module.attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = module.attention.in_proj_bias.chunk(3)
    q = (tokens @ w_q.T + b_q).view(2, 5, 2, 4).transpose(1, 2)
    k = (latents @ w_k.T + b_k).view(4, 2, 4).transpose(0, 1)
    v = (latents @ w_v.T + b_v).view(4, 2, 4).transpose(0, 1)
    heads = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # (B, heads, L, 4)
    attended = module.attention.out_proj(heads.transpose(1, 2).reshape(2, 5, 8))
    x = states + attended
    x = x + module.mlp(module.norm_mlp(x))
    expected = torch.stack([x[0, :3].mean(0), x[1].mean(0)])
    torch.testing.assert_close(module(states, mask), expected, atol=1e-6, rtol=0)


def test_trained_checkpointed_resumed_and_exported_with_parity(tmp_path, tiny_model, pairs_file, capsys):
    from trainer.cli import main

    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    recipe.write_text(recipe.read_text().replace(
        "max_seq_length: 16}", "max_seq_length: 16, pooling: latent_attention, latent_attention: {num_latents: 8, num_heads: 2}, "
        "lora: {rank: 2, alpha: 4, dropout: 0.0}}"))
    train(load_recipe(recipe))
    run_dir = tmp_path / "runs" / "r"
    initial = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, pooling="latent_attention",
                                              latent_attention=LatentAttentionConfig(num_latents=8, num_heads=2)))
    uninterrupted = load_file(run_dir / "step_4" / "model" / "latent_attention.safetensors")
    assert any(not torch.equal(uninterrupted[k], v) for k, v in initial.pool.state_dict().items())  # it trained
    resume_state = load_file(run_dir / "step_4" / "accelerate" / "model.safetensors")
    assert any(k.startswith("pool.") for k in resume_state) and any(".lora_" in k for k in resume_state)

    shutil.rmtree(run_dir / "step_4")  # as if the run had died after step 2
    train(load_recipe(recipe), resume=True)
    resumed = load_file(run_dir / "step_4" / "model" / "latent_attention.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)

    out = tmp_path / "st"
    assert main(["export", str(run_dir / "step_4"), "--out", str(out)]) == 0
    assert "parity with the trainer's embeddings" in capsys.readouterr().out
    texts = ["apple river engine", "a text never seen by the exporter"]
    expected = Encoder.from_config(embedding_config(str(run_dir / "step_4"))).encode(texts, is_query=True)
    code = (
        "import sys, json; from sentence_transformers import SentenceTransformer;"
        "m = SentenceTransformer(sys.argv[1], device='cpu', trust_remote_code=True);"
        f"print(json.dumps(m.encode({texts!r}).tolist()))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (torch.tensor(json.loads(done.stdout)) - expected).abs().max().item() <= 1e-5
    again = Encoder.from_config(embedding_config(str(out)))  # embtrain eval reads the exported folder back
    assert (again.encode(texts, is_query=True) - expected).abs().max().item() <= 1e-5


def test_with_instruction_tokens_left_out_as_nv_embed_does(tmp_path, tiny_model):
    from trainer.export.sentence_transformers_folder import export

    config = ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, pooling="latent_attention", pool_prompt=False,
                         query_prompt="what about ", latent_attention=LatentAttentionConfig(num_latents=4, num_heads=2))
    encoder = Encoder.from_config(config).eval()
    pooled = Encoder.from_config(ModelConfig(**{**config.__dict__, "pool_prompt": True})).eval()
    pooled.pool.load_state_dict(encoder.pool.state_dict())
    texts = ["apple river", "engine 12 and more"]
    assert (encoder.encode(texts, is_query=True) - pooled.encode(texts, is_query=True)).abs().max() > 1e-3
    encoder.save_pretrained(tmp_path / "trained")
    assert export(tmp_path / "trained", tmp_path / "st").max_abs_diff <= 1e-5  # queries with the prompt, documents without
    assert embedding_config(str(tmp_path / "st")).pool_prompt is False


def test_on_a_decoder_in_half_precision(tmp_path):
    folder = tiny_decoder(tmp_path, "qwen2")
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(folder), pooling="latent_attention", torch_dtype="bfloat16",
                                              latent_attention=LatentAttentionConfig(num_latents=4, num_heads=2)))
    embeddings = encoder(encoder.tokenize(["apple", "the river"]))
    assert embeddings.dtype == torch.float32 and embeddings.shape == (2, 16)


def test_settings_are_checked(tmp_path, tiny_model, pairs_file):
    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    with pytest.raises(RecipeError, match="'model.latent_attention': set with pooling: latent_attention"):
        load_recipe(recipe, ["model.latent_attention={num_latents: 4}"])
    with pytest.raises(RecipeError, match="'model.latent_attention.num_heads': must be >= 1"):
        load_recipe(recipe, ["model.pooling=latent_attention", "model.latent_attention={num_heads: 0}"])
    from trainer.model.encoder import ModelError

    with pytest.raises(ModelError, match="num_heads 3 must divide"):
        Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, pooling="latent_attention",
                                        latent_attention=LatentAttentionConfig(num_heads=3)))
