"""What crosses to the normalizer process and back: envelopes and canonical messages as flat tuples.

Pickle handles the frozen, slotted dataclasses of ``core.model`` through Python-level reduce calls
(copyreg and dataclasses' ``__getstate__``), and an aware datetime through its timezone's reduce
in Python: ~7 us for one ``datetime.now(UTC)``, ~25 us for a mail's message and ~16 us for its
envelope, paid in both processes. Here each of those types becomes a tuple of its fields (nested
ones too) and a datetime its own pickle state, so that pickle itself runs in C; decoding calls the
constructors. The round trip gives equal objects of the same types: a value of any other type (a
subclass, a list where a tuple is declared, a tzinfo that is not a fixed offset) is left as it is
and pickled as before, exact and only slower.

A type without ``__post_init__`` whose fields are all ``__init__`` slots (the canonical message,
attachments, entities, routing) is decoded slot by slot, not through ``__init__`` with keywords:
the same object, ~11 -> ~5 us for a mail's message in the gateway's event loop.
"""

from __future__ import annotations

import dataclasses
import operator
import types
from collections.abc import Callable
from datetime import UTC, datetime, timezone
from typing import Any, Final, cast

from core.model import Attachment, CanonicalMessage, Entity, Identity, MediaRef, RawEnvelope, Routing

__all__ = ["decode_envelope", "decode_message", "encode_envelope", "encode_message"]

_Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]


def _encode_datetime(value: Any) -> Any:
    """A datetime as ``(state,)`` (naive), ``(state, None)`` (UTC) or ``(state, (offset, name?))``.

    ``state`` is what the datetime pickles as (fold included); a timezone is its constructor's
    arguments. Anything else is returned as it is.
    """
    if type(value) is not datetime:
        return value
    args: tuple[Any, ...] = cast(tuple[Any, Any], value.__reduce_ex__(4))[1]
    if len(args) == 1:
        return args
    state, tz = args
    if tz is UTC:
        return (state, None)
    if type(tz) is timezone:
        return (state, tz.__getinitargs__())  # type: ignore[attr-defined]
    return value


# datetime(state[, tzinfo]) is how a datetime unpickles; the stubs know only the public signature.
_from_state: Final[Callable[..., datetime]] = datetime


def _decode_datetime(value: Any) -> Any:
    if type(value) is not tuple:
        return value
    if len(value) == 1:
        return _from_state(value[0])
    state, tz = value
    return _from_state(state, UTC if tz is None else timezone(*tz))


def _slot_setters(cls: type) -> tuple[Callable[[object, object], None], ...] | None:
    """The setters of ``cls``'s fields in declaration order, when setting every slot is what its
    ``__init__`` does with all fields given (no ``__post_init__``, every field an ``__init__``
    argument kept in a slot); else ``None``."""
    fields = dataclasses.fields(cls)
    slot = types.MemberDescriptorType
    slots = all(field.init and isinstance(cls.__dict__.get(field.name), slot) for field in fields)
    if hasattr(cls, "__post_init__") or not slots:
        return None
    # A slot's member descriptor sets it without the frozen class's __setattr__.
    return tuple(cls.__dict__[field.name].__set__ for field in fields)


def _struct(cls: type, nested: dict[str, _Codec] | None = None) -> _Codec:
    """Encoder and decoder of the dataclass ``cls``: a tuple of its fields in declaration order,
    the fields named in ``nested`` through their own codecs."""
    names = tuple(field.name for field in dataclasses.fields(cls))
    values_of = operator.attrgetter(*names)
    codecs = [(names.index(name), codec) for name, codec in (nested or {}).items()]
    setters = _slot_setters(cls)
    new = object.__new__

    def encode(value: Any) -> Any:
        if type(value) is not cls:
            return value
        if not codecs:
            return values_of(value)
        values = list(values_of(value))
        for index, (enc, _) in codecs:
            values[index] = enc(values[index])
        return tuple(values)

    def decode(value: Any) -> Any:
        if type(value) is not tuple:
            return value
        if codecs:
            value = list(value)
            for index, (_, dec) in codecs:
                value[index] = dec(value[index])
        if setters is None:
            return cls(**dict(zip(names, value, strict=True)))
        made: Any = new(cls)
        for setter, item in zip(setters, value, strict=True):
            setter(made, item)
        return made

    return encode, decode


def _items(codec: _Codec) -> _Codec:
    """A tuple of values, each through ``codec``."""
    enc, dec = codec

    def encode(value: Any) -> Any:
        return tuple([enc(item) for item in value]) if type(value) is tuple and value else value

    def decode(value: Any) -> Any:
        return tuple([dec(item) for item in value]) if type(value) is tuple and value else value

    return encode, decode


_DATETIME: Final[_Codec] = (_encode_datetime, _decode_datetime)

encode_message, decode_message = _struct(
    CanonicalMessage,
    {
        "received_at": _DATETIME,
        "sent_at": _DATETIME,
        "identities": _items(_struct(Identity)),
        "attachments": _items(_struct(Attachment)),
        "media": _items(_struct(MediaRef)),
        "entities": _items(_struct(Entity)),
        "routing": _struct(Routing),
    },
)
encode_envelope, decode_envelope = _struct(RawEnvelope, {"received_at": _DATETIME})
