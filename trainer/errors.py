"""Errors that stop a run before it starts, with a message meant for the user."""


class RunError(RuntimeError):
    """The run cannot start as asked (e.g. it would overwrite an earlier run)."""


PREEMPTED_EXIT_CODE = 75
"""EX_TEMPFAIL: the run stopped early on a signal but can be resumed."""


class Preempted(Exception):
    """SIGTERM or SIGUSR1 stopped the run after it saved a checkpoint."""

    def __init__(self, signal_name: str, step: int, checkpoint: str) -> None:
        super().__init__(f"stopped by {signal_name} at step {step} after saving {checkpoint}; continue with --resume")
