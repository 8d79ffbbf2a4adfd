"""Stop cleanly on SIGTERM / SIGUSR1 (cluster preemption or time limit).

The signal is recorded from the start of a run to its end; the loop looks at it between steps,
after each evaluation and after each save, saves a checkpoint if there is anything to keep, and
exits with code 75; `--resume` continues the run. A signal during an evaluation or a save takes
effect when it ends (both are bounded; give the cluster's grace period room for the longest).

With several processes they must agree, so that all of them stop at the same step. Between
steps that agreement must not stall the accelerator: it is an all-reduce of one CPU number over
a gloo group (no device tensor, so no host-device sync), started at one step and read at the
next, by which time it has long completed. A signal therefore stops the run one step later than
it would with one process."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist
from accelerate import Accelerator


class PreemptionWatch:
    """Records the first SIGTERM/SIGUSR1; all processes agree on it when asked."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {}
        self._group = None  # the gloo group the processes agree over, made at the first agreement
        self._pending: tuple[torch.Tensor, object] | None = None  # the between-steps all-reduce in flight
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

    def _flag(self) -> torch.Tensor:
        return torch.tensor([1.0 if self.received else 0.0])

    def _cpu_group(self):
        """A gloo group over the same processes (collective: every process makes it at its first
        agreement, which is at the same point everywhere); None where torch.distributed is not
        what runs the processes (then the accelerator's own reduce is used)."""
        if self._group is None and dist.is_available() and dist.is_initialized() and dist.is_gloo_available():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def should_stop(self, accelerator: Accelerator) -> bool:
        """Collective with several processes: call it at the same points on every process.
        Waits for the agreement (a host-side exchange, no device sync)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        stop = self._collect()  # a between-steps agreement still open counts too
        group = self._cpu_group()
        if group is None:
            flag = self._flag().to(accelerator.device)
            return bool(accelerator.reduce(flag, reduction="sum").item() > 0) or stop
        flag = self._flag()
        dist.all_reduce(flag, group=group)
        return bool(flag.item() > 0) or stop

    def should_stop_between_steps(self, accelerator: Accelerator) -> bool:
        """The check after each training step. With several processes it reads the agreement
        started at the previous step and starts the next one, so no process waits on it."""
        if accelerator.num_processes == 1:
            return self.received is not None
        group = self._cpu_group()
        if group is None:
            return self.should_stop(accelerator)
        stop = self._collect()
        flag = self._flag()
        self._pending = (flag, dist.all_reduce(flag, group=group, async_op=True))
        return stop

    def _collect(self) -> bool:
        """The result of the between-steps agreement in flight, if any (every process has one
        in flight at the same points)."""
        if self._pending is None:
            return False
        flag, work = self._pending
        self._pending = None
        work.wait()
        return bool(flag.item() > 0)

    @property
    def name(self) -> str:
        return self.received or "a signal on another process"

    def close(self) -> None:
        if self._pending is not None:  # finish the exchange in flight before the group goes
            try:
                self._pending[1].wait()
            except RuntimeError:  # the process group is gone already
                pass
            self._pending = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
