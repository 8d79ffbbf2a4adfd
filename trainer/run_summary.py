"""What a run folder says about its run: its status while it runs and after, an end-of-run summary
(`summary.json` and a table in the terminal) and plots a person can open.

`summary.json` is written when the run starts (status `running`, with the process id and host)
and rewritten when it ends: `finished`, `preempted` (a SIGTERM/SIGUSR1 saved a checkpoint) or
`crashed` (an error, named). A run killed outright (SIGKILL, a lost node) leaves `running`
behind; `embtrain runs` tells it from a live one by its process id on the same host.
The plots are drawn from `metrics.jsonl`: `plots/loss.png` (the loss, each term of a composite
loss, and the learning rate against steps) and `plots/eval.png` (every evaluation metric against
steps, each Matryoshka size included).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUMMARY_FILE = "summary.json"
PLOTS_DIR = "plots"


@dataclass
class RunClock:
    """Wall time of one invocation, split into setup, training, evaluation and checkpointing."""

    started: float = field(default_factory=time.perf_counter)
    setup: float | None = None
    evaluation: float = 0.0
    checkpointing: float = 0.0
    mining: float = 0.0
    """Hard negatives mined again during training (data.refresh_negatives)."""

    def setup_done(self) -> None:
        """Setup ends when the first training step starts (a start evaluation counts as evaluation)."""
        if self.setup is None:
            self.setup = time.perf_counter() - self.started - self.evaluation - self.mining

    @contextmanager
    def timing(self, part: str):
        begun = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, part, getattr(self, part) + time.perf_counter() - begun)

    def split(self) -> dict[str, float]:
        total = time.perf_counter() - self.started
        setup = self.setup if self.setup is not None else total - self.evaluation - self.checkpointing
        training = max(0.0, total - setup - self.evaluation - self.checkpointing - self.mining)
        parts = {"setup": setup, "training": training, "evaluation": self.evaluation, "checkpointing": self.checkpointing}
        if self.mining:
            parts["mining"] = self.mining
        return {k: round(v, 3) for k, v in {**parts, "total": total}.items()}


def peak_resident_bytes() -> int:
    """This process's peak resident memory. On Linux from /proc's VmHWM, which starts afresh when
    the process starts a program: getrusage's ru_maxrss carries over the peak of the process
    that started it (a training run launched from a 2 GB Python process reported at least 2 GB)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def peak_memory() -> dict[str, float | str]:
    """The process's peak memory: GPU memory allocated by PyTorch on a GPU, resident memory on a CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3), "peak_memory_kind": "gpu_allocated"}
    return {"peak_memory_gb": round(peak_resident_bytes() / 2**30, 3), "peak_memory_kind": "cpu_rss"}


def write_summary(run_dir: Path, summary: dict) -> None:
    """Atomically, so that a reader never sees half of it."""
    from trainer.run_dir import write_atomic

    write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def read_summary(run_dir: Path) -> dict | None:
    try:
        value = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def running_summary(run_dir: Path, total_steps: int, resumed: bool) -> dict:
    return {
        "status": "running", "pid": os.getpid(), "host": socket.gethostname(), "run_dir": str(run_dir),
        "total_steps": total_steps, "resumed": resumed, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl rows (none if it has none)."""
    from trainer.run_dir import METRICS_FILE
    from trainer.run_dir import read_metrics as read_rows

    path = run_dir / METRICS_FILE
    return read_rows(path)[0] if path.exists() else []


def is_training_row(row: dict) -> bool:
    """Training rows carry the learning rate; evaluation rows carry only `set/metric` values."""
    return "lr" in row


def end_summary(
    run_dir: Path, status: str, *, state, total_steps: int, metric_for_best: str | None, clock: RunClock,
    tokens_seen: int, pairs_seen: int, resumed: bool, checkpoint: str | None = None, reason: str | None = None,
) -> dict:
    """Everything a person asks of a run that ended, from its state and `metrics.jsonl`."""
    rows = read_metrics(run_dir)
    evaluations = [r for r in rows if not is_training_row(r)]
    training = [r for r in rows if is_training_row(r)]
    summary: dict = {
        "status": status, "run_dir": str(run_dir), "step": state.step, "total_steps": total_steps, "resumed": resumed,
        "ended_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if reason:
        summary["reason"] = reason
    if checkpoint:
        summary["checkpoint"] = checkpoint
    if state.best_step is not None:
        best_dir = run_dir / "best"
        summary["best"] = {
            "metric": metric_for_best, "value": state.best_metric, "step": state.best_step,
            "path": str(best_dir) if best_dir.is_dir() else None,
        }
    if evaluations:
        summary["start_metrics"] = {k: v for k, v in evaluations[0].items() if k != "step"} if evaluations[0]["step"] == 0 else None
        last = evaluations[-1]
        summary["final_metrics"] = {k: v for k, v in last.items() if k != "step"}
        summary["final_metrics_step"] = last["step"]
    if training:
        summary["final_loss"] = training[-1].get("loss")
    summary["time_s"] = clock.split()
    summary["tokens_seen"] = tokens_seen
    summary["pairs_seen"] = pairs_seen
    summary.update(peak_memory())
    if state.nonfinite_steps:
        summary["nonfinite_steps"] = state.nonfinite_steps
    return summary


def summary_table(summary: dict) -> str:
    """The summary as aligned lines for the terminal."""
    lines = [f"run {summary['run_dir']}: {summary['status']} at step {summary['step']} of {summary['total_steps']}"]
    best = summary.get("best")
    if best:
        lines.append(f"  best {best['metric']:<28} {best['value']:.4f} at step {best['step']}" + (f" ({best['path']})" if best["path"] else ""))
    final = summary.get("final_metrics") or {}
    start = summary.get("start_metrics") or {}
    if final:
        lines.append(f"  {'metric':<34} {'start':>8} {'end':>8}")
        for name, value in final.items():
            before = start.get(name)
            lines.append(f"  {name:<34} {'' if before is None else f'{before:.4f}':>8} {value:>8.4f}")
    times = summary["time_s"]
    lines.append("  time " + ", ".join(f"{k} {_duration(v)}" for k, v in times.items()))
    memory = "GPU allocated" if summary["peak_memory_kind"] == "gpu_allocated" else "resident"
    lines.append(f"  {summary['tokens_seen']:,} tokens and {summary['pairs_seen']:,} examples seen; peak memory {summary['peak_memory_gb']:.2f} GB ({memory})")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def write_plots(run_dir: Path) -> list[Path]:
    """PNG plots of `metrics.jsonl`: loss (and terms) with the learning rate, and evaluation metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    training = [r for r in rows if is_training_row(r)]
    evaluations = [r for r in rows if not is_training_row(r)]
    folder = run_dir / PLOTS_DIR
    folder.mkdir(exist_ok=True)
    written = []
    if training:
        figure, loss_axis = plt.subplots(figsize=(8, 4.5))
        steps = [r["step"] for r in training]
        names = ["loss"] + sorted({k for r in training for k in r if k.startswith("loss/")})
        for name in names:
            points = [(r["step"], r[name]) for r in training if r.get(name) is not None]
            if points:
                loss_axis.plot(*zip(*points), label=name, linewidth=2 if name == "loss" else 1)
        loss_axis.set_xlabel("step")
        loss_axis.set_ylabel("loss")
        rate_axis = loss_axis.twinx()
        rate_axis.plot(steps, [r["lr"] for r in training], color="grey", linestyle="--", label="learning rate")
        rate_axis.set_ylabel("learning rate")
        handles = loss_axis.get_legend_handles_labels()[0] + rate_axis.get_legend_handles_labels()[0]
        loss_axis.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize="small")
        loss_axis.set_title(f"{run_dir.name}: training loss")
        figure.tight_layout()
        written.append(_save(figure, folder / "loss.png"))
    names = sorted({k for r in evaluations for k in r if k != "step"})
    if names:
        figure, axis = plt.subplots(figsize=(8, 4.5))
        for name in names:
            points = [(r["step"], r[name]) for r in evaluations if isinstance(r.get(name), (int, float))]
            axis.plot(*zip(*points), marker="o", label=name)
        axis.set_xlabel("step")
        axis.set_ylabel("metric")
        axis.legend(fontsize="small", ncol=2 if len(names) > 8 else 1)
        axis.set_title(f"{run_dir.name}: evaluation")
        figure.tight_layout()
        written.append(_save(figure, folder / "eval.png"))
    plt.close("all")
    return written


def _save(figure, path: Path) -> Path:
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.png")
    figure.savefig(temporary, dpi=100)
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------- embtrain runs


def run_status(run_dir: Path) -> dict:
    """One run's line: status, step, best metric, where it is. Runs from before summaries existed
    are read from their checkpoints."""
    from trainer.checkpoint import STATE_FILE, latest_checkpoint

    summary = read_summary(run_dir) or {}
    status = summary.get("status")
    if status == "running" and not _alive(summary):
        status = "killed or lost (no live process)"
    step, best = summary.get("step"), summary.get("best")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and (step is None or status and status.startswith("killed")):
        try:
            state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        step = state.get("step", step)
        if best is None and state.get("best_step") is not None:
            best = {"metric": _metric_for_best(run_dir), "value": state.get("best_metric"), "step": state.get("best_step")}
        if status is None:
            status = "finished" if state.get("finished") else "stopped"
    if status is None:
        status = "no checkpoint"
    logged = None
    if step is None:  # killed before its first checkpoint: the last step it logged
        rows = [r for r in read_metrics(run_dir) if is_training_row(r)]
        logged = rows[-1]["step"] if rows else None
    return {
        "run": run_dir.name, "status": status, "step": step, "logged_step": logged, "total_steps": summary.get("total_steps"),
        "best": best, "path": str(run_dir), "checkpoint": str(checkpoint) if checkpoint else None,
    }


def _metric_for_best(run_dir: Path) -> str | None:
    """The run's evaluation.metric_for_best, from the recipe it saved."""
    import yaml

    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
        return recipe["evaluation"]["metric_for_best"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def _alive(summary: dict) -> bool:
    if summary.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, so taken as running
    try:
        os.kill(int(summary["pid"]), 0)
    except (KeyError, ValueError, TypeError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def list_runs(folder: Path) -> list[dict]:
    """The runs in `folder` (a checkpoints folder): every sub-folder with a recipe.yaml."""
    runs = [p for p in sorted(folder.iterdir()) if p.is_dir() and (p / "recipe.yaml").is_file()] if folder.is_dir() else []
    return [run_status(run) for run in runs]


def runs_table(runs: list[dict]) -> str:
    if not runs:
        return "no runs"
    header = f"{'run':<28} {'status':<34} {'step':>11}  {'best':<34} path"
    lines = [header]
    for run in runs:
        total = f"/{run['total_steps']}" if run["total_steps"] else ""
        steps = f"{run['step']}{total}" if run["step"] is not None else (
            f"{run['logged_step']}{total} logged" if run.get("logged_step") is not None else (f"0{total}" if total else ""))
        best = run["best"]
        shown = "" if not best or best.get("value") is None else (
            f"{best.get('metric') or 'best'} {best['value']:.4f} @ {best['step']}"
        )
        lines.append(f"{run['run']:<28} {run['status']:<34} {steps:>11}  {shown:<34} {run['path']}")
    return "\n".join(lines)
