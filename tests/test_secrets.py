"""Tokens in the environment never reach a file that a run or an export writes, nor their output
(the push itself is checked in tests/trainer/export/test_hub.py, payload included)."""

from pathlib import Path

import pytest

from trainer.cli import main

HF_TOKEN = "hf_planted" + "Q7xZ" * 8
WANDB_API_KEY = "planted" + "9d3f" * 10


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_no_planted_token_in_any_file_of_a_run_and_an_export(tmp_path, tiny_model, pairs_file, tiny_beir, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_API_KEY)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""run_name: secrets
model: {{name_or_path: {tiny_model}, max_seq_length: 16}}
data: {{train: [{{kind: pairs, path: {pairs_file}, negatives_column: negatives}}], batch_size: 8}}
training: {{max_steps: 3}}
evaluation: {{sets: [{{kind: retrieval, name: t, path: {tiny_beir}}}], metric_for_best: t/ndcg@10}}
checkpointing: {{output_dir: {tmp_path / 'runs'}, every_steps: 2}}
"""
    )
    assert main(["train", str(recipe)]) == 0
    run_dir = tmp_path / "runs" / "secrets"
    assert main(["export", str(run_dir / "step_3"), "--out", str(tmp_path / "exported")]) == 0
    output = capsys.readouterr()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 20 and any(p.name == "model.safetensors" for p in written)
    for path in written:
        content = path.read_bytes()
        assert HF_TOKEN.encode() not in content and WANDB_API_KEY.encode() not in content, path
    assert HF_TOKEN not in output.out + output.err and WANDB_API_KEY not in output.out + output.err
