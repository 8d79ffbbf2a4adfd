"""Errors that stop a run before it starts, with a message meant for the user."""


class RunError(RuntimeError):
    """The run cannot start as asked (e.g. it would overwrite an earlier run)."""


PREEMPTED_EXIT_CODE = 75
"""EX_TEMPFAIL: the run stopped early on a signal but can be resumed."""


class Preempted(Exception):
    """SIGTERM or SIGUSR1 stopped the run; whatever there was to keep is in a checkpoint."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None) -> None:
        if checkpoint is None:
            message = (
                f"stopped by {signal_name} before training started; nothing new to save; "
                "run the same command again (with --resume, as a resubmitted job does)"
            )
        else:
            message = f"stopped by {signal_name} at step {step} after saving {checkpoint}; continue with --resume"
        super().__init__(message)
