"""Errors that end a stage with one clear message (no traceback) and exit code 2."""


class DataError(RuntimeError):
    """A dataset could not be put in place or is malformed; the message says what to do."""


class StageError(RuntimeError):
    """A stage cannot run as configured; the message says why and what to do."""
