"""Errors a user can act on. The CLI prints them as one line and exits with a fixed code."""

from clustermix.config import ConfigError

__all__ = [
    "USER_ERRORS",
    "AccountingError",
    "ClustermixError",
    "ConfigError",
    "DataError",
    "InputError",
    "LakeBusyError",
    "StorageError",
]


class ClustermixError(Exception):
    """Base class: a problem the user can fix (bad config, bad input, a busy lake)."""

    exit_code = 1


class InputError(ClustermixError):
    """The input corpus cannot be read as configured (missing path, missing column)."""

    exit_code = 2


class DataError(ClustermixError):
    """What the data shows makes the configured run impossible (e.g. k > documents)."""

    exit_code = 2


class LakeBusyError(ClustermixError):
    """Another run holds the lake's lock."""

    exit_code = 3


class AccountingError(ClustermixError):
    """Records were lost: read != accepted + duplicates + quarantined."""

    exit_code = 4


class StorageError(ClustermixError):
    """The object store refuses the lake or input (no such bucket, no or wrong credentials, no
    endpoint): a permanent error, reported at once with the path, not retried."""

    exit_code = 2


# what the CLI prints as one line with the error's own exit code
USER_ERRORS = (ClustermixError, ConfigError)
