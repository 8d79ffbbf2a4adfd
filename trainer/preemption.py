"""Stop cleanly on SIGTERM / SIGUSR1 (cluster preemption or time limit): the loop saves a
checkpoint at the next step boundary and exits, and `--resume` continues the run."""

from __future__ import annotations

import signal
import threading

import torch
from accelerate import Accelerator

class PreemptionWatch:
    """Records the first SIGTERM/SIGUSR1; all processes agree on it at each step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self, accelerator: Accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
