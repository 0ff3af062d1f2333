"""Envelopes and messages cross to the normalizer process and back as equal objects of the same types."""

from __future__ import annotations

import dataclasses
import pickle
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from core.model import Attachment, CanonicalMessage, Entity, Identity, MediaRef, RawEnvelope, Routing
from gateway.offload_wire import decode_envelope, decode_message, encode_envelope, encode_message


def _through(value: Any, encode: Any, decode: Any) -> Any:
    """``value`` encoded, pickled, unpickled and decoded, as it travels."""
    return decode(pickle.loads(pickle.dumps(encode(value), protocol=pickle.HIGHEST_PROTOCOL)))


def _same(a: Any, b: Any) -> None:
    """Equal, and of the same types all the way down (a tuple stays a tuple, a tz keeps its name)."""
    assert type(a) is type(b)
    if dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            _same(getattr(a, field.name), getattr(b, field.name))
    elif isinstance(a, tuple | list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, datetime):
        assert (a, a.fold, a.tzinfo, repr(a.tzinfo)) == (b, b.fold, b.tzinfo, repr(b.tzinfo))
    else:
        assert a == b


class _Moment(datetime):
    pass


def _message(**changes: Any) -> CanonicalMessage:
    """A message with every field set to something other than its default."""
    full = CanonicalMessage(
        channel="email",
        tenant="t",
        inbox="support",
        external_id="<a@b>",
        received_at=datetime(2026, 12, 5, 9, 0, 0, 123456, tzinfo=UTC),
        sent_at=datetime(2026, 12, 5, 17, 0, tzinfo=timezone(timedelta(hours=8))),
        kind="voicemail_transcript",
        identities=(
            Identity(kind="email", value="a@example.com", verified=True),
            Identity(kind="phone", value="+1"),
        ),
        display_name="Ann",
        subject="Order 1",
        text="hello \udcff",
        html="<p>hello</p>",
        reply_text="hello",
        language="en",
        attachments=(
            Attachment(
                name="a.txt", content_type="text/plain", data=b"\x00abc", inline=True, content_id="c1"
            ),
        ),
        media=(MediaRef(kind="image", ref="m1", name="x.png", content_type="image/png"),),
        in_reply_to="<0@b>",
        references=("<0@b>", "<1@b>"),
        thread_ref="ticket:1",
        auto_generated="bounce",
        entities=(Entity(kind="order_number", value="12345"),),
        routing=Routing(priority="high", tags=("vip",), queue="q"),
        extra={"to": ["x@y"], "dsn": {"status": "5.1.1"}, "pair": (1, 2), "n": 3},
        dedupe_key="k",
        edit_of="e",
        delete_of="d",
    )
    return dataclasses.replace(full, **changes)


def test_every_field_of_a_message_travels() -> None:
    message = _message()
    assert all(getattr(message, f.name) != f.default for f in dataclasses.fields(message))
    _same(_through(message, encode_message, decode_message), message)


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 1, 1, 12, 0, 0, 1),  # naive
        datetime(2026, 1, 1, tzinfo=timezone.utc),  # noqa: UP017 - the same object as UTC, on purpose
        datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
        datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=1), "CET")),  # a named offset keeps its name
        datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York")),  # pickled as it is
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=23, minutes=59))),
        datetime(2026, 3, 1, fold=1),
    ],
)
def test_datetimes_keep_their_instant_zone_and_fold(moment: datetime) -> None:
    _same(_through(_message(sent_at=moment), encode_message, decode_message).sent_at, moment)


class _Kind(str):
    __slots__ = ()


def test_values_of_other_types_travel_as_they_are() -> None:
    # A list where a tuple is declared, a str subclass, a datetime subclass, no sent_at.
    odd = _message(
        identities=[Identity(kind="email", value="a@b")],
        references=["<x>"],
        kind=_Kind("message"),
        received_at=_Moment(2026, 1, 1, tzinfo=UTC),
        sent_at=None,
    )
    _same(_through(odd, encode_message, decode_message), odd)


def test_an_envelope_travels() -> None:
    envelope = RawEnvelope(
        channel="email",
        tenant="t",
        inbox="support",
        body=b"From: a@b\r\n\r\nhi\r\n",
        received_at=datetime(2026, 12, 5, 9, 0, tzinfo=UTC),
        content_type="message/rfc822",
        headers={"X-A": "1"},
        signature_verified=True,
        retry=2,
        remote="127.0.0.1",
        meta={"mail_from": "a@b", "rcpt_to": ["s@x"], "authentication": None},
        key_reuse="refuse",
    )
    _same(_through(envelope, encode_envelope, decode_envelope), envelope)


@pytest.mark.parametrize("cut", [1, -1])
def test_a_message_of_the_wrong_length_is_refused(cut: int) -> None:
    """A tuple with a field missing or one too many is an error, never a message with a field
    silently left unset or shifted (the child and the gateway run the same code, but not always
    the same version of it during an upgrade)."""
    encoded = encode_message(_message())
    wrong = encoded[:cut] if cut < 0 else (*encoded, None)
    with pytest.raises(ValueError, match="zip"):
        decode_message(wrong)
