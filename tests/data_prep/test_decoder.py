"""`prep decoder`: a small random decoder that trains through every decoder path from the CLI."""

import json

from conftest import write_recipe
from trainer.cli import main
from trainer.config import ModelConfig
from trainer.model.encoder import Encoder


def test_a_random_decoder_trains_with_lora_bidirectional_and_latent_attention(tmp_path, tiny_model, pairs_file, capsys):
    from accelerate.state import AcceleratorState

    out = tmp_path / "qwen2-tiny"
    args = ["prep", "decoder", "--architecture", "qwen2", "--tokenizer", str(tiny_model), "--hidden-size", "32",
            "--layers", "2", "--heads", "2", "--max-positions", "64", "--out", str(out)]
    assert main(args) == 0
    assert "a random qwen2 decoder, 2 layers of 32" in capsys.readouterr().out
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(out), pooling="last_token", max_seq_length=16))
    assert encoder.backbone.config.model_type == "qwen2" and encoder.tokenizer.eos_token == "[SEP]"
    assert encoder.tokenize(["apple"])["input_ids"][0, -1].item() == encoder.tokenizer.eos_token_id

    recipe = write_recipe(tmp_path, out, pairs_file)
    recipe.write_text(recipe.read_text().replace(
        "max_seq_length: 16}",
        "max_seq_length: 16, bidirectional: true, pooling: latent_attention, latent_attention: {num_latents: 4, num_heads: 2}, "
        "query_prompt: 'query : ', pool_prompt: false, lora: {rank: 2, alpha: 4}}"))
    try:
        assert main(["train", str(recipe)]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    assert main(["export", str(tmp_path / "runs" / "r" / "step_4"), "--out", str(tmp_path / "st")]) == 0
    assert "parity with the trainer's embeddings" in capsys.readouterr().out
