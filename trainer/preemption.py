"""Stop cleanly on SIGTERM / SIGUSR1 (cluster preemption or time limit).

The signal is recorded from the start of a run to its end; the loop looks at it between steps,
after each evaluation and after each save, saves a checkpoint if there is anything to keep, and
exits with code 75; `--resume` continues the run. A signal during an evaluation or a save takes
effect when it ends (both are bounded; give the cluster's grace period room for the longest)."""

from __future__ import annotations

import signal
import threading

import torch
from accelerate import Accelerator


class PreemptionWatch:
    """Records the first SIGTERM/SIGUSR1; all processes agree on it when asked."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def __enter__(self) -> "PreemptionWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def should_stop(self, accelerator: Accelerator) -> bool:
        """Collective with several processes: call it at the same points on every process."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    @property
    def name(self) -> str:
        return self.received or "a signal on another process"

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
