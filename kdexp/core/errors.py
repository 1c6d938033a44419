"""Errors kdexp raises for bad input.

Each message says what is wrong and how to fix it; the CLI prints it without a
traceback and the run record keeps it (status ``failed``).
"""

from __future__ import annotations


class KdexpError(Exception):
    """Base class: a problem the user can fix (config, files, data)."""


class ConfigError(KdexpError, ValueError):
    """A config value is out of range or two config groups do not fit together."""


class CheckpointError(KdexpError):
    """A checkpoint is missing or does not match the model it should load into."""


class DataUnavailableError(KdexpError):
    """A data set is not on disk and cannot be fetched (offline or extra missing)."""


class NonFiniteLossError(KdexpError):
    """The training loss became NaN or infinite; training was stopped."""


class RunExistsError(KdexpError):
    """The output folder already holds a finished run, which is never overwritten."""


class RunBusyError(KdexpError):
    """Another live process is running in the same output folder."""


class StorageError(KdexpError):
    """A file kdexp owns cannot be written (permissions, read-only or full disk)."""


class RunInterrupted(KdexpError):
    """The run was stopped by a signal (Ctrl-C, SIGTERM, a pre-emption) and can be resumed."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
