"""The gateway's error hierarchy.

Each class also inherits the standard exception it resembles, so callers that only know the stdlib
(``except ValueError``) still catch the right thing.
"""

from __future__ import annotations

from typing import Any


class TicketgateError(Exception):
    """Base of every error raised on purpose by ticketgate."""


class ConfigError(TicketgateError, ValueError):
    """The configuration is invalid; the message names the file and the key."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        where = ", ".join(part for part in (file, f"key {key!r}" if key else None) if part)
        super().__init__(f"{where}: {message}" if where else message)


class VerificationError(TicketgateError, PermissionError):
    """A request failed signature, token or origin verification. Never parse what raised this."""


class InvalidInput(TicketgateError, ValueError):
    """The sender's request is malformed in a way they can fix; answer 4xx, store nothing."""

    def __init__(self, reason: str, *, status: int = 400) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with its status (it crosses from the normalizer process; TooLarge's __init__
        # takes only the reason): rebuilt from the reason, then the attributes restored.
        return (type(self), (self.reason,), self.__dict__)


class TooLarge(InvalidInput):
    """A bounded quantity (body, part count, header count, depth) was exceeded."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, status=413)


class NormalizationError(TicketgateError, ValueError):
    """A verified message could not be normalized; it is quarantined with its raw bytes."""


class RetryableError(TicketgateError):
    """A transient fault: the sender should retry later (HTTP 503, SMTP 451)."""

    def __init__(self, reason: str, *, retry_after: float = 5.0) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


class BacklogFull(RetryableError):
    """The outbox holds as many unpublished events as configured (or the disk is low)."""


class StoreError(RetryableError, OSError):
    """The store could not commit; nothing was acknowledged."""


class PublishError(RetryableError, ConnectionError):
    """A publish was not confirmed by the broker (nack, return, timeout or lost connection)."""
