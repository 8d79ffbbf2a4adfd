"""Several processes agree on a preemption signal at the same step, one step late between steps,
without a device tensor (the agreement runs over a gloo group on CPU numbers)."""

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from conftest import run_processes
from trainer.preemption import PreemptionWatch

SIGNAL_AT = 3
"""The step after which process 1 receives SIGTERM."""


class NoDeviceReduce(SimpleNamespace):
    """What the watch needs of an Accelerator; its own reduce must not be used when gloo is there."""

    def reduce(self, *args, **kwargs):
        raise AssertionError("the accelerator's (device) reduce was used")


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        accelerator = NoDeviceReduce(num_processes=world, device=torch.device("cpu"))
        stops = []
        with PreemptionWatch() as watch:
            before = watch.should_stop(accelerator)  # blocking agreement: nobody has a signal
            for step in range(8):
                if rank == 1 and step == SIGNAL_AT:
                    watch._handle(15, None)  # SIGTERM arrives on process 1 only, during this step
                stops.append(watch.should_stop_between_steps(accelerator))
            after = watch.should_stop(accelerator)
            name = watch.name
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"before": before, "stops": stops, "after": after, "name": name}))
    finally:
        dist.destroy_process_group()


def test_processes_stop_at_the_same_step_one_step_late(tmp_path):
    run_processes(_worker, (2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, seconds=120)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["before"] is False
        # the agreement started after step 3 is read after step 4: both stop there, not earlier
        assert result["stops"].index(True) == SIGNAL_AT + 1
        assert result["after"] is True
    assert results[0]["stops"] == results[1]["stops"]
    assert results[0]["name"] == "a signal on another process" and results[1]["name"] == "SIGTERM"


def test_one_process_stops_at_once():
    accelerator = SimpleNamespace(num_processes=1)
    with PreemptionWatch() as watch:
        assert watch.should_stop_between_steps(accelerator) is False
        watch._handle(10, None)
        assert watch.should_stop_between_steps(accelerator) is True and watch.name == "SIGUSR1"
