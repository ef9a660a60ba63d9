"""Errors a user can act on. The CLI prints them as one line and exits with a fixed code."""


class ClustermixError(Exception):
    """Base class: a problem the user can fix (bad config, bad input, a busy lake)."""

    exit_code = 1


class ConfigError(ClustermixError):
    """A config key has a wrong name, type or value. Raised before any work is done."""

    exit_code = 2

    def __init__(self, key: str, value: object, problem: str) -> None:
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"config error: {key}={value!r}: {problem}")


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
