"""The gateway's error hierarchy.

Each class also inherits the standard exception it resembles, so callers that only know the stdlib
(``except ValueError``) still catch the right thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


# What a field's pattern means, by field name; a raw regular expression helps no caller.
_PATTERN_MEANS = {
    "email": "not an email address",
    "content_type": "not a media type such as image/png",
    "recording_url": "not an http(s) URL",
}
_TYPE_MEANS = {
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
    "missing": "required",
    "extra_forbidden": "not a known field",
    "timezone_aware": "needs a time zone, e.g. 2026-11-22T08:30:00+08:00",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
}


def validation_reason(errors: Sequence[Mapping[str, Any]]) -> str:
    """``"field.path: what is wrong"`` for the first of pydantic's ``ValidationError.errors()``,
    worded for the caller, not in pydantic's terms (no class names, no regular expressions)."""
    first = errors[0]
    path = [str(part) for part in first.get("loc", ())]
    where = ".".join(path) or "body"
    kind = str(first.get("type", ""))
    name = next((part for part in reversed(path) if not part.isdigit()), "")
    if kind == "string_pattern_mismatch":
        return f"{where}: {_PATTERN_MEANS.get(name, 'has an unexpected format')}"
    if kind in _TYPE_MEANS:
        return f"{where}: {_TYPE_MEANS[kind]}"
    message = str(first.get("msg", "is not valid")).removeprefix("Value error, ")
    return f"{where}: {message[:1].lower()}{message[1:]}"
