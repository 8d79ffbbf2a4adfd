"""Experiment trackers (`logging.report_to`): TensorBoard and Weights & Biases, through Accelerate.

Both log from the main process only: the resolved recipe and a summary of the environment as the
run's configuration (hyper-parameters), then every metric of `metrics.jsonl` at its step.
TensorBoard writes event files to the run folder's `tensorboard/`. W&B runs online when an API
key is configured (`WANDB_API_KEY`, or `wandb login`) and offline otherwise, into the run folder's
`wandb/`, to be uploaded later with `wandb sync`; `WANDB_MODE` set by the user wins.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import platform
from pathlib import Path

import torch

from trainer.errors import RunError

WANDB_HOST = "api.wandb.ai"


def check_installed(report_to: list[str]) -> None:
    """A clear error before anything runs when a tracker's package is missing."""
    for name in report_to:
        if importlib.util.find_spec(name) is None:
            raise RunError(f"logging.report_to names {name}, which is not installed: pip install 'embtrain[{name}]'")


def tensorboard_dir(run_dir: Path) -> Path:
    return run_dir / "tensorboard"


def wandb_key_configured() -> bool:
    """Whether W&B has an API key: in the environment, or in ~/.netrc as `wandb login` leaves it."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def init_kwargs(report_to: list[str], run_dir: Path, run_name: str) -> tuple[dict, list[str]]:
    """Accelerate's per-tracker init options, and lines to tell the user."""
    kwargs: dict = {}
    notes: list[str] = []
    if "wandb" in report_to:
        options = {"dir": str(run_dir), "name": run_name}
        if "WANDB_MODE" not in os.environ and not wandb_key_configured():
            options["mode"] = "offline"
            notes.append(
                f"wandb: no API key configured, logging offline to {run_dir / 'wandb'}; upload later with "
                f"`wandb sync {run_dir / 'wandb'}/offline-run-*`"
            )
        kwargs["wandb"] = options
    if "tensorboard" in report_to:
        notes.append(f"tensorboard: event files in {tensorboard_dir(run_dir)} (tensorboard --logdir {tensorboard_dir(run_dir)})")
    return kwargs, notes


def environment(accelerator) -> dict[str, str | int]:
    """Versions, devices, processes and precision, logged with the recipe."""
    import accelerate
    import transformers

    versions = {"python": platform.python_version(), "torch": str(torch.__version__), "transformers": transformers.__version__,
                "accelerate": accelerate.__version__}
    for name in ("peft", "sentence_transformers", "deepspeed"):
        spec = importlib.util.find_spec(name)
        if spec is not None:
            try:
                versions[name] = str(__import__(name).__version__)
            except Exception:  # noqa: BLE001 - a broken optional package must not stop the run
                continue
    device = accelerator.device
    summary: dict[str, str | int] = {f"env/{k}": v for k, v in versions.items()}
    summary["env/device"] = str(device)
    if device.type == "cuda":
        summary["env/gpu"] = torch.cuda.get_device_name(device)
        summary["env/gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        summary["env/cpu"] = platform.processor() or platform.machine()
        summary["env/cpu_threads"] = torch.get_num_threads()
    summary["env/world_size"] = accelerator.num_processes
    summary["env/mixed_precision"] = str(accelerator.mixed_precision)
    summary["env/distributed_type"] = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    return summary
