"""A run's summary.json, its end-of-run table and plots, and `embtrain runs`."""

import json
import os
import socket

import pytest

from test_loop import recipe_file
from trainer.cli import main
from trainer.config import load_recipe
from trainer.loop import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_finished_run_writes_its_summary_table_and_plots(tmp_path, tiny_model, pairs_file, tiny_beir, capsys):
    recipe = load_recipe(recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir), [
        "training.max_steps=6", "evaluation.at_start=true", "evaluation.every_steps=3", "evaluation.dims=[16]",
        "logging.log_every_steps=2",
    ])
    final = train(recipe)
    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == summary["total_steps"] == 6
    assert summary["final_metrics"] == final and summary["final_metrics_step"] == 6
    assert set(summary["start_metrics"]) == set(final)  # the evaluation at step 0
    assert summary["best"]["metric"] == "tiny/ndcg@10" and summary["best"]["path"] == str(run_dir / "best")
    times = summary["time_s"]
    parts = times["setup"] + times["training"] + times["evaluation"] + times["checkpointing"]
    assert times["evaluation"] > 0 and times["checkpointing"] > 0 and parts == pytest.approx(times["total"], abs=0.5)
    assert summary["pairs_seen"] == 6 * 8 and summary["tokens_seen"] > 6 * 8 * 2  # a query and a positive at least
    assert summary["peak_memory_kind"] == "cpu_rss" and summary["peak_memory_gb"] > 0.1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    training_rows = [r for r in rows if "lr" in r]
    assert len(training_rows) == 3 and all(r["grad_norm"] > 0 and r["peak_memory_gb"] > 0 for r in training_rows)
    out = capsys.readouterr().out
    assert "tiny/ndcg@10@dim16" in out and f"summary: {run_dir / 'summary.json'}" in out
    for name in ("loss.png", "eval.png"):
        data = (run_dir / "plots" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    from matplotlib.image import imread

    assert imread(run_dir / "plots" / "eval.png").shape[:2] == (450, 800)


def test_a_crash_is_recorded_with_its_error(tmp_path, tiny_model, pairs_file, tiny_beir, monkeypatch):
    import trainer.loop

    real_step, calls = trainer.loop.train_step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.loop, "train_step", failing_step)
    recipe = load_recipe(recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir), ["training.max_steps=6"])
    with pytest.raises(RuntimeError, match="simulated"):
        train(recipe)
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["status"] == "crashed" and summary["reason"] == "RuntimeError: out of memory (simulated)"
    assert summary["step"] == 2


def test_runs_lists_each_run_with_its_status(tmp_path, tiny_model, pairs_file, tiny_beir, capsys):
    path = recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir)
    train(load_recipe(path, ["training.max_steps=2", "run_name=done"]))
    killed = tmp_path / "runs" / "killed"
    killed.mkdir()
    (killed / "recipe.yaml").write_text("run_name: killed\n")
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    (killed / "summary.json").write_text(json.dumps({"status": "running", "pid": dead, "host": socket.gethostname(), "total_steps": 9}))
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "loss": 1.9, "lr": 0.1}\n{"step": 3, "lo')
    live = tmp_path / "runs" / "live"
    live.mkdir()
    (live / "recipe.yaml").write_text("run_name: live\n")
    (live / "summary.json").write_text(json.dumps({"status": "running", "pid": os.getpid(), "host": socket.gethostname()}))
    (tmp_path / "runs" / "not-a-run").mkdir()
    capsys.readouterr()
    assert main(["runs", str(tmp_path / "runs"), "--json"]) == 0
    runs = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(runs) == {"done", "killed", "live"}
    assert runs["done"]["status"] == "finished" and runs["done"]["step"] == 2 and runs["done"]["best"]["step"] == 2
    assert runs["killed"]["status"].startswith("killed") and runs["live"]["status"] == "running"
    assert runs["killed"]["step"] is None and runs["killed"]["logged_step"] == 2  # the line cut short is skipped
    assert main(["runs", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert "tiny/ndcg@10" in table and "2/2" in table and "2/9 logged" in table


def test_a_run_started_by_a_large_process_reports_its_own_peak_memory():
    """getrusage's ru_maxrss of a started program carries over its parent's peak (Linux), which
    made small runs launched from a big Python process report the parent's memory."""
    import subprocess
    import sys

    from trainer.run_summary import peak_resident_bytes

    ballast = bytearray(768 * 2**20)
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])  # touch every page: 768 MiB resident here
    child = subprocess.run(
        [sys.executable, "-c", "from trainer.run_summary import peak_resident_bytes; print(peak_resident_bytes())"],
        capture_output=True, text=True, check=True,
    )
    assert peak_resident_bytes() >= 768 * 2**20
    assert int(child.stdout) < 512 * 2**20  # the child imports torch: about 300 MB
    del ballast
