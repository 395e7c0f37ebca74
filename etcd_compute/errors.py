"""Errors a user can act on, each with its own exit code.

Every failure that reaches the command line is one of these: the CLI prints the
message on one line and exits with the code, so scripts can tell "no capacity"
from "Placement is down" without parsing text.
"""


class ECError(Exception):
    """Base class: a one-line, user-facing reason and an exit code."""

    exit_code = 1


class UsageError(ECError):
    """Malformed input: a query string, a uuid, a config file."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file that cannot be used; the message names file and key."""


class NoCapacity(ECError):
    exit_code = 3


class PlacementUnavailable(ECError):
    """Placement could not be reached (after retrying connection errors)."""

    exit_code = 4


class PlacementNoAnswer(PlacementUnavailable):
    """The request may have reached Placement, but no answer came back (timeout, dropped
    connection): whatever it asked for may or may not have been done."""


class PlacementError(ECError):
    """Placement answered with an error; carries its status and error code."""

    exit_code = 4

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class EtcdUnavailable(ECError):
    exit_code = 5


class UnknownInstance(ECError):
    exit_code = 6


class InvalidState(ECError):
    """The request makes no sense for the instance's current state."""

    exit_code = 7


class WaitFailed(ECError):
    """--wait ended without the wanted state: timeout, or the instance went to ERROR."""

    exit_code = 8


class QuotaExceeded(ECError):
    """The project's quota has no room for the request; the message names the limit."""

    exit_code = 9


class Forbidden(ECError):
    """The caller's token may not do this (an admin's operation, or no valid token)."""

    exit_code = 10


class Unauthenticated(Forbidden):
    """No token, or one that is unknown or revoked."""
