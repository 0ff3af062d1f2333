"""The normalizer contract.

A normalizer is a pure, synchronous function: no I/O, no clock, no randomness. It raises
:class:`core.errors.InvalidInput` for a request the sender must fix (nothing is stored, the
channel answers 4xx) and :class:`core.errors.NormalizationError` for a verified message it cannot
understand (the message is quarantined with its raw bytes, and the channel answers success).
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import orjson

from core.channel import Normalizer
from core.errors import InvalidInput
from core.model import CanonicalMessage, plain_text, replace

__all__ = ["Normalizer", "json_object", "storable"]


def json_object(body: bytes) -> dict[str, Any]:
    """A webhook body that must be one JSON object; ``InvalidInput`` (400) otherwise."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("the body is not a JSON object")
    return data


def storable(message: CanonicalMessage) -> CanonicalMessage:
    """``message`` as every store keeps it: the one rule for text from any channel.

    NUL is removed from every text of the message (PostgreSQL cannot store it, and no customer
    means it), and lone surrogates become visible escapes (:func:`core.model.plain_text`): the raw
    bytes are archived as they came. An identity with NUL or any other control character cannot
    name anyone: ``InvalidInput`` (422), a permanent refusal, never a retry.
    """
    for identity in message.identities:
        for part in (identity.kind, identity.value):
            # isprintable() is False for every Cc and Cs character: the per-character look-up
            # runs only for the rare identity that has some non-printable character.
            if not part.isprintable() and any(unicodedata.category(c) in ("Cc", "Cs") for c in part):
                raise InvalidInput(
                    f"the customer's {identity.kind} contains control characters", status=422
                )
    cleaned = _clean(message)
    return cleaned if isinstance(cleaned, CanonicalMessage) else message


# Values with no text inside: returned as they are without further type tests.
_ATOMS = frozenset({type(None), bool, int, float, bytes, datetime})
# Per dataclass type, the function that cleans its fields (see _field_cleaner).
_CLEANERS: dict[type, Callable[[Any], Any]] = {}


def _field_cleaner(cls: type) -> Callable[[Any], Any]:
    """A function that cleans the fields of a ``cls`` instance: one block of lines per field.

    The usual field (an atom, ASCII text without NUL, an empty tuple or dict) is tested inline;
    anything else goes through :func:`_clean`. Written once per type, as dataclasses writes
    ``__init__``: a loop over the field names with ``getattr`` took ~5 us for a message's ~30.
    """
    scope: dict[str, Any] = {"_ATOMS": _ATOMS, "_clean": _clean, "replace": replace}
    lines = ["def clean(value):", "    changes = None"]
    for spec in dataclasses.fields(cls):
        name = spec.name
        lines += [
            f"    v = value.{name}",
            "    k = type(v)",
            "    if not (k in _ATOMS or (k is str and v.isascii() and '\\x00' not in v)"
            " or (not v and (k is tuple or k is dict))):",
            "        after = _clean(v)",
            "        if after is not v:",
            "            if changes is None:",
            "                changes = {}",
            f"            changes[{name!r}] = after",
        ]
    lines.append("    return value if changes is None else replace(value, **changes)")
    exec("\n".join(lines), scope)  # noqa: S102 - field names are identifiers of the class
    clean: Callable[[Any], Any] = scope["clean"]
    return clean


def _clean(value: Any) -> Any:
    """``value`` with its strings cleaned; the same object when nothing needed it (the usual case).

    Runs for every message on the event loop, so the usual types are tested by ``type() is`` first;
    subclasses (a str enum, an ``istr``) take the general path below, as before.
    """
    cls = type(value)
    if cls is str:
        # ASCII text has no lone surrogate (plain_text would return it unchanged).
        if value.isascii():
            return value.replace("\x00", "") if "\x00" in value else value
    elif cls in _ATOMS:
        return value
    elif cls is tuple or cls is list:
        items = [_clean(v) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return tuple(items) if cls is tuple else items
    elif cls is dict:
        pairs = [(_clean(k), _clean(v)) for k, v in value.items()]
        if all(k2 is k and v2 is v for (k2, v2), (k, v) in zip(pairs, value.items(), strict=True)):
            return value
        return dict(pairs)
    else:
        cleaner = _CLEANERS.get(cls)
        if cleaner is not None:
            return cleaner(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            cleaner = _CLEANERS[cls] = _field_cleaner(cls)
            return cleaner(value)
    return _clean_any(value)


def _clean_any(value: Any) -> Any:
    if isinstance(value, str):
        text = plain_text(value)
        return text.replace("\x00", "") if "\x00" in text else text
    if isinstance(value, tuple | list):
        items = [_clean(v) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, Mapping):
        pairs = [(_clean(k), _clean(v)) for k, v in value.items()]
        if all(k2 is k and v2 is v for (k2, v2), (k, v) in zip(pairs, value.items(), strict=True)):
            return value
        return dict(pairs)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes: dict[str, Any] = {}
        for spec in dataclasses.fields(value):
            before = getattr(value, spec.name)
            after = _clean(before)
            if after is not before:
                changes[spec.name] = after
        return replace(value, **changes) if changes else value
    return value
