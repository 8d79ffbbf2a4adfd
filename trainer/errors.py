"""Errors that stop a run before it starts, with a message meant for the user."""


class RunError(RuntimeError):
    """The run cannot start as asked (e.g. it would overwrite an earlier run)."""
