"""Trackers: a short run logs to TensorBoard and to W&B (offline, without an API key); the files
are read back with TensorBoard's reader and W&B's own record protobuf, and hold the metrics."""

import json
import struct

import pytest

from test_loop import recipe_file
from trainer.config import load_recipe
from trainer.errors import RunError
from trainer.loop import train
from trainer import trackers


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture()
def no_wandb_account(tmp_path, monkeypatch):
    """No API key anywhere: W&B must run offline, its settings kept out of the user's home."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(path):
    """The protobuf records of a .wandb file (leveldb log framing: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    position, pending, block = 7, b"", 32768
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:  # zero padding to the block's end
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # whole, or the last part
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_tensorboard_and_offline_wandb_receive_the_recipe_the_environment_and_every_metric(
    tmp_path, tiny_model, pairs_file, tiny_beir, no_wandb_account, capsys
):
    recipe = load_recipe(recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir), [
        "training.max_steps=4", "logging.report_to=[tensorboard, wandb]", "evaluation.every_steps=2",
    ])
    train(recipe)
    run_dir = tmp_path / "runs" / "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    ndcg = {r["step"]: r["tiny/ndcg@10"] for r in rows if "tiny/ndcg@10" in r}
    assert sorted(losses) == [1, 2, 3, 4] and sorted(ndcg) == [2, 4]
    assert "logging offline" in capsys.readouterr().out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "embtrain"))
    events.Reload()
    assert {(e.step, round(e.value, 5)) for e in events.Scalars("loss")} == {(s, round(v, 5)) for s, v in losses.items()}
    assert {(e.step, round(e.value, 5)) for e in events.Scalars("tiny/ndcg@10")} == {(s, round(v, 5)) for s, v in ndcg.items()}
    assert {"grad_norm", "lr", "peak_memory_gb", "padding_efficiency"} <= set(events.Tags()["scalars"])
    hparams = next((run_dir / "tensorboard" / "embtrain").glob("*/hparams.yml")).read_text()
    assert "env/torch" in hparams and "optimizer.lr" in hparams and "env/world_size: 1" in hparams

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items.get("_step", record.history.step.num), {}).update(items)
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert {s: round(h["loss"], 5) for s, h in history.items() if "loss" in h} == {s: round(v, 5) for s, v in losses.items()}
    assert {s: round(h["tiny/ndcg@10"], 5) for s, h in history.items() if "tiny/ndcg@10" in h} == {s: round(v, 5) for s, v in ndcg.items()}
    assert config["optimizer.lr"] == pytest.approx(5e-3) and config["env/world_size"] == 1 and "env/torch" in config


def test_wandb_goes_online_with_a_key_and_offline_without(tmp_path, no_wandb_account, monkeypatch):
    options, notes = trackers.init_kwargs(["wandb"], tmp_path, "r")
    assert options["wandb"]["mode"] == "offline" and "wandb sync" in notes[0]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    options, notes = trackers.init_kwargs(["wandb"], tmp_path, "r")
    assert "mode" not in options["wandb"] and notes == []
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / ".netrc").write_text(f"machine {trackers.WANDB_HOST}\n  login user\n  password {'y' * 40}\n")
    (tmp_path / "home" / ".netrc").chmod(0o600)
    assert "mode" not in trackers.init_kwargs(["wandb"], tmp_path, "r")[0]["wandb"]
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's own setting wins
    monkeypatch.delenv("HOME")
    assert "mode" not in trackers.init_kwargs(["wandb"], tmp_path, "r")[0]["wandb"]


def test_a_missing_tracker_package_is_named_before_the_run_starts(tmp_path, tiny_model, pairs_file, tiny_beir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    recipe = load_recipe(recipe_file(tmp_path, tiny_model, pairs_file, tiny_beir), ["logging.report_to=[wandb]"])
    with pytest.raises(RunError, match=r"pip install 'embtrain\[wandb\]'"):
        train(recipe)
    assert not (tmp_path / "runs" / "tiny").exists()
