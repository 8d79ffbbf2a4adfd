"""Errors for unreadable or malformed data, always naming the file and the row."""


class DataError(ValueError):
    """Training or evaluation data could not be read; the message says where and why."""
