"""Errors that mean "bad input": the CLI prints them as one line and exits with code 2 (code 1 for a
:class:`ResourceError`, a fault of the machine rather than of the input)."""

from __future__ import annotations


class MtxError(Exception):
    """A user-facing error. Its message is one line naming the file, tensor or option at fault.

    ``params`` are the Python parameter names the message mentions (``cache_capacity``); the CLI
    shows each as its flag (``--cache-capacity``), so the library never speaks in CLI flags.
    """

    exit_code: int = 2

    def __init__(self, message: str, *, params: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.params = params


class ConfigError(MtxError):
    """A config.json / params.json that mtx cannot use."""


class CheckpointError(MtxError):
    """A checkpoint whose tensors are missing, corrupt or of the wrong shape."""


class UsageError(MtxError):
    """A bad option or argument."""


class ResourceError(MtxError):
    """The machine cannot do it (out of memory): one line, exit code 1, the input may be fine."""

    exit_code = 1
