"""Errors that the CLI turns into one clear line (exit code 2 for usage errors)."""


class HftBenchError(Exception):
    """Base class: the message is shown to the user as-is, without a traceback."""

    exit_code = 1


class UsageError(HftBenchError):
    """Bad input from the user: an unknown name, a malformed value, a missing file."""

    exit_code = 2


class DataMissingError(HftBenchError):
    """A dataset could not be found (neither in the offline mirror nor on the hub) or read (a malformed row)."""

    exit_code = 2


class PluginError(HftBenchError):
    """A plugin broke the contract (duplicate name, bad registration)."""

    exit_code = 2


class StorageError(HftBenchError):
    """A folder or file could not be written (permissions, a read-only or immutable file system, a full disk): the
    environment's fault, not the input's, so exit code 1."""
