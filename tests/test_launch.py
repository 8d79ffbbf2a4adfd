"""The launch configs: every Accelerate config parses, and the multi-CPU script trains with 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "launch" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 1
    text = path.read_text()
    assert text.startswith("# ") and "accelerate launch --config_file launch/accelerate/" + path.name in text
    deepspeed_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if deepspeed_file:
        assert json.loads((ROOT / deepspeed_file).read_text())["zero_optimization"]["stage"] in (2, 3)


def test_two_cpu_processes_train_with_cross_device_negatives(tmp_path, tiny_model, pairs_file):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""run_name: ddp
model: {{name_or_path: {tiny_model}, max_seq_length: 16}}
data:
  train: [{{kind: pairs, path: {pairs_file}, negatives_column: negatives}}]
  batch_size: 8
training: {{max_steps: 6, grad_cache_chunk_size: 3}}
logging: {{log_every_steps: 1}}
checkpointing: {{output_dir: {tmp_path / 'runs'}}}
"""
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PORT": "29533"}
    command = ["bash", "launch/cpu/multi_cpu.sh", str(recipe)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 8 x 2 process(es)" in result.stdout
    # 64 pairs / (8 x 2) = 4 global batches per epoch
    assert "4 steps per epoch" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # logged once, by the main process
    # 16 queries against 16 positives and 16 negatives: chance level is ln(32)
    assert rows[0]["loss"] == pytest.approx(3.47, abs=0.5)
    assert (tmp_path / "runs" / "ddp" / "step_6" / "model" / "model.safetensors").exists()
