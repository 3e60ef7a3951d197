"""Errors that mean "bad input": the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class MtxError(Exception):
    """A user-facing error. Its message is one line naming the file, tensor or option at fault."""

    exit_code: int = 2


class ConfigError(MtxError):
    """A config.json / params.json that mtx cannot use."""


class CheckpointError(MtxError):
    """A checkpoint whose tensors are missing, corrupt or of the wrong shape."""


class UsageError(MtxError):
    """A bad option or argument."""
