"""LoRA: only the adapters train, checkpoints hold only them, resume is exact, and the merged
export embeds like the adapter model and loads without peft."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_decoder, write_recipe
from trainer.cli import main
from trainer.config import LoraConfig, ModelConfig, RecipeError, load_recipe
from trainer.errors import RunError
from trainer.loop import train
from trainer.model.encoder import Encoder, embedding_config


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def lora_recipe(tmp_path, tiny_model, pairs_file, lora: str = "{rank: 4, alpha: 8, dropout: 0.0}", extra: str = "") -> Path:
    path = write_recipe(tmp_path, tiny_model, pairs_file, extra)
    text = path.read_text().replace("max_seq_length: 16}", f"max_seq_length: 16, lora: {lora}}}")
    path.write_text(text.replace("optimizer: {lr: 1.0e-3}", "optimizer: {lr: 1.0e-2}"))
    return path


def test_only_the_adapters_train_and_checkpoints_hold_only_them(tmp_path, tiny_model, pairs_file, capsys):
    train(load_recipe(lora_recipe(tmp_path, tiny_model, pairs_file)))
    out = capsys.readouterr().out
    assert "LoRA rank 4 (alpha 8) on 12 modules (dense, key, query, value)" in out  # 2 layers x 6 linear layers
    step = tmp_path / "runs" / "r" / "step_4"
    resume_state = load_file(step / "accelerate" / "model.safetensors")
    assert resume_state and all(".lora_A." in k or ".lora_B." in k for k in resume_state)
    assert not (step / "model" / "model.safetensors").exists()  # no copy of the frozen base weights
    adapter = load_file(step / "model" / "adapter_model.safetensors")
    assert len(adapter) == len(resume_state) == 24
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained

    trained = Encoder.from_config(embedding_config(str(step)), merge_adapter=False)
    base = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16))
    frozen = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
              for k, v in trained.backbone.state_dict().items() if "lora_" not in k}
    for name, value in base.backbone.state_dict().items():
        torch.testing.assert_close(frozen[name], value, rtol=0, atol=0, msg=name)  # the base never moved


def test_lora_resume_equals_an_uninterrupted_run(tmp_path, tiny_model, pairs_file):
    recipe = lora_recipe(tmp_path, tiny_model, pairs_file, "{rank: 4, alpha: 8, dropout: 0.1}")
    train(load_recipe(recipe))
    run_dir = tmp_path / "runs" / "r"
    uninterrupted = load_file(run_dir / "step_4" / "model" / "adapter_model.safetensors")
    shutil.rmtree(run_dir / "step_4")  # as if the run had died after step 2
    train(load_recipe(recipe), resume=True)
    resumed = load_file(run_dir / "step_4" / "model" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)

    # other adapters are refused, not half loaded: by the recipe, and by the weights themselves
    shutil.rmtree(run_dir / "step_4")
    with pytest.raises(RunError, match="model.lora.rank: 4 in the run, 2 now"):
        train(load_recipe(recipe, ["model.lora.rank=2"]), resume=True)
    from safetensors.torch import save_file

    state_file = run_dir / "step_2" / "accelerate" / "model.safetensors"
    state = load_file(state_file)
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(state_file))
    with pytest.raises(RunError, match=r"do not match this recipe's LoRA adapters \(1 missing"):
        train(load_recipe(recipe), resume=True)


def test_merged_export_matches_the_adapter_model_and_loads_without_peft(tmp_path, tiny_model, pairs_file, capsys):
    train(load_recipe(lora_recipe(tmp_path, tiny_model, pairs_file, "{rank: 4, alpha: 8, trainable_modules: [LayerNorm]}")))
    best = tmp_path / "runs" / "r" / "step_4"
    out = tmp_path / "merged"
    assert main(["export", str(best), "--out", str(out)]) == 0
    assert "parity with the trainer's embeddings" in capsys.readouterr().out
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert "LoRA: rank 4, alpha 8.0, on every linear layer, with LayerNorm trained in full; merged" in (out / "README.md").read_text()

    texts = ["apple river engine", "a text never seen by the exporter"]
    expected = Encoder.from_config(embedding_config(str(best)), merge_adapter=False).encode(texts, is_query=True)
    code = (  # peft cannot be imported in this process
        "import sys, json; sys.modules['peft'] = None;"
        "from sentence_transformers import SentenceTransformer; from transformers import AutoModel;"
        "AutoModel.from_pretrained(sys.argv[1]);"
        "m = SentenceTransformer(sys.argv[1], device='cpu');"
        f"print(json.dumps(m.encode({texts!r}).tolist()))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (torch.tensor(json.loads(done.stdout)) - expected).abs().max().item() <= 1e-5

    kept = tmp_path / "adapter"
    assert main(["export", str(best), "--out", str(kept), "--keep-adapter"]) == 0
    assert (kept / "adapter_config.json").exists() and not (kept / "model.safetensors").exists()
    mask = os.umask(0)
    os.umask(mask)
    assert {path.stat().st_mode & 0o777 for path in kept.rglob("*") if path.is_file()} == {0o666 & ~mask}  # not safetensors' 0600
    from sentence_transformers import SentenceTransformer

    again = SentenceTransformer(str(kept), device="cpu").encode(texts, convert_to_tensor=True)
    assert (again.cpu() - expected).abs().max().item() <= 1e-5
    read_back = Encoder.from_config(embedding_config(str(kept)))  # embtrain eval reads the adapter folder too
    assert (read_back.encode(texts, is_query=True) - expected).abs().max().item() <= 1e-5
    assert "names its base by a local path" in capsys.readouterr().err  # the tiny base is a local folder

    named = tmp_path / "named"
    assert main(["export", str(best), "--out", str(named), "--keep-adapter", "--adapter-base", "org/tiny-bert"]) == 0
    assert json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-bert"
    assert "names its base by a local path" not in capsys.readouterr().err
    assert main(["export", str(best), "--out", str(tmp_path / "x"), "--adapter-base", "org/tiny-bert"]) == 2
    assert "add --keep-adapter" in capsys.readouterr().err


def test_a_lora_checkpoint_evaluates_and_starts_a_new_run_merged(tmp_path, tiny_model, pairs_file, tiny_beir, capsys):
    train(load_recipe(lora_recipe(tmp_path, tiny_model, pairs_file)))
    step = tmp_path / "runs" / "r" / "step_4"
    assert main(["eval", str(step), "--beir", str(tiny_beir)]) == 0
    assert "ndcg@10" in capsys.readouterr().out
    # stage 2: full fine-tuning from the merged stage-1 model, elsewhere on disk
    moved = tmp_path / "elsewhere" / "stage1"
    shutil.copytree(step / "model", moved)
    (tmp_path / "two").mkdir()
    second = write_recipe(tmp_path / "two", tiny_model, pairs_file)
    second.write_text(second.read_text().replace(str(tiny_model), str(moved)))
    train(load_recipe(second))
    start = Encoder.from_config(embedding_config(str(moved)))
    assert type(start.backbone).__name__ == "BertModel"  # merged: a plain model to train in full
    saved = load_file(tmp_path / "two" / "runs" / "r" / "step_4" / "model" / "model.safetensors")
    assert not any("lora" in k for k in saved)


def test_gradient_checkpointing_with_lora_trains_the_adapters(tiny_model):
    config = ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, gradient_checkpointing=True,
                         lora=LoraConfig(rank=2, alpha=4, dropout=0.0, target_modules=["query", "value"]))
    encoder = Encoder.from_config(config)
    encoder.train()
    embeddings = encoder(encoder.tokenize(["apple river", "engine 12"]))
    embeddings.sum().backward()
    grads = {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}
    assert len(grads) == 8 and all(".lora_" in n for n in grads)  # 2 layers x (query, value) x (A, B)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if "lora_B" in n)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_decoders_get_adapters_on_every_linear_layer_by_default(tmp_path, family):
    from trainer.model.lora import describe_parameters

    folder = tiny_decoder(tmp_path, family)
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(folder), pooling="last_token", max_seq_length=8, lora=LoraConfig()))
    line = describe_parameters(encoder, encoder.backbone)
    assert "on 14 modules (down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)" in line


def test_lora_settings_are_checked(tmp_path, tiny_model, pairs_file):
    recipe = lora_recipe(tmp_path, tiny_model, pairs_file)
    for override, message in [
        ("model.lora.rank=0", "'model.lora.rank': must be >= 1"),
        ("model.lora.dropout=1.0", "'model.lora.dropout': must be in"),
        ("model.lora.target_modules=[]", "'model.lora.target_modules': name at least one"),
        ("model.lora.ranks=4", "'model.lora.ranks'"),
    ]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(recipe, [override])
    assert load_recipe(recipe, ["model.lora={}"]).model.lora == LoraConfig()


def test_a_target_module_that_matches_nothing_is_named(tiny_model):
    with pytest.raises(RunError, match="model.lora: .*q_proj"):
        Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16, lora=LoraConfig(target_modules=["q_proj"])))
