"""Every event built by core/events.py validates against docs/schema; broken ones do not."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import orjson
import pytest

from core import events
from core.events import CustomerView, Event
from core.model import Attachment, CanonicalMessage, Entity, Identity, MediaRef, Placement, Routing
from tests.support.schema import SCHEMA_DIR, validate_event

NOW = datetime(2026, 11, 22, 9, 30, tzinfo=UTC)


def _full_message() -> Event:
    message = CanonicalMessage(
        channel="email", tenant="acme", inbox="support@acme.test", external_id="<m1@example.test>",
        received_at=NOW, sent_at=NOW, subject="Where is order 1234?", text="Hi, where is it?",
        html="<p>Hi</p>", reply_text="Hi, where is it?", language="en",
        identities=(Identity(kind="email", value="ana@example.test", verified=True),),
        attachments=(Attachment(name="a.pdf", content_type="application/pdf", data=b"%PDF"),),
        media=(MediaRef(kind="image", ref="media-1"),),
        in_reply_to="<m0@acme.test>", references=("<m0@acme.test>",), auto_generated=None,
        entities=(Entity(kind="order", value="1234"),), routing=Routing(priority="high", tags=("vip",)),
        extra={"spam_score": 0.1, "nested": {"any": ["thing"]}},
    )
    placement = Placement(message_id=message.message_id(), thread_id="th-1", customer_id="c-1", sequence=3,
                          is_new_thread=False)
    customer = CustomerView(id="c-1", identities=message.identities, display_name="Ana")
    return events.message_received(
        message, placement=placement, customer=customer, thread_subject="Order", raw_ref="sha256:ab",
        signature_verified=True, retry=2, public_url="https://gw.acme.test", occurred_at=NOW,
        retry_reason="http_timeout",
        duplicate_of=None,
    )


def _minimal_message(message: CanonicalMessage | None = None) -> Event:
    message = message or CanonicalMessage(
        channel="wechat", tenant="acme", inbox="wx1", external_id=None, received_at=NOW
    )
    placement = Placement(message_id=message.message_id(), thread_id="th-2", customer_id="c-2", sequence=1,
                          is_new_thread=True)
    return events.message_received(
        message, placement=placement, customer=CustomerView(id="c-2", identities=(), display_name=None),
        thread_subject=None, raw_ref=None, signature_verified=False, retry=0, public_url=None,
        occurred_at=NOW,
    )


def _edited_message() -> Event:
    original = CanonicalMessage(
        channel="telegram", tenant="acme", inbox="bot", external_id="42:7", received_at=NOW, text="helo"
    )
    edit = replace(original, text="hello", edit_of=original.message_id(), dedupe_key="edit:42:7:1764000000")
    return _minimal_message(edit)


def _deleted_message() -> Event:
    original = CanonicalMessage(
        channel="slack", tenant="acme", inbox="ws", external_id="C1:1764000000.000100", received_at=NOW,
    )
    deletion = replace(original, delete_of=original.message_id(), dedupe_key="delete:C1:1764000000.000100")
    return _minimal_message(deletion)


REPLY = events.ReplyView(
    id="rpl_019a0000000070008000000000000001", command_id="desk-42", tenant="acme", thread_id="th-1",
    thread_number=7, customer_id="c-1", channel="email", inbox="support", attempts=1, requested_at=NOW,
    provider_message_id="rpl_019a0000000070008000000000000001@acme.test",
)
REFUSED = replace(REPLY, thread_number=None, customer_id=None, channel=None, inbox=None, attempts=0,
                  provider_message_id=None)


BUILDERS: dict[str, Callable[[], Event]] = {
    "reply.sent": lambda: events.reply_event(events.REPLY_SENT, REPLY, occurred_at=NOW),
    "reply.failed": lambda: events.reply_event(
        events.REPLY_FAILED, REPLY, occurred_at=NOW, reason="window_closed", detail="48 h passed"
    ),
    "reply.failed (refused command)": lambda: events.reply_event(
        events.REPLY_FAILED, REFUSED, occurred_at=NOW, reason="recipient_unreachable", detail="unknown thread"
    ),
    "reply.delivered": lambda: events.reply_event(events.REPLY_DELIVERED, REPLY, occurred_at=NOW, at=NOW),
    "reply.read": lambda: events.reply_event(events.REPLY_READ, REPLY, occurred_at=NOW, at=NOW),
    "message.received (full)": _full_message,
    "message.received (minimal)": _minimal_message,
    "message.edited": _edited_message,
    "message.deleted": _deleted_message,
    "message.quarantined": lambda: events.message_quarantined(
        quarantine_id="q-1", tenant="acme", channel="whatsapp", inbox="+15550100", reason="bad json",
        raw_ref="sha256:cd", size=123, received_at=NOW, occurred_at=NOW,
    ),
    "thread.merged": lambda: events.thread_merged(
        tenant="acme", channel="email", surviving_thread="th-1", merged_threads=["th-9"], reason="reference",
        occurred_at=NOW,
    ),
    "customer.merged": lambda: events.customer_merged(
        tenant="acme", surviving_customer="c-1", merged_customers=["c-2"], evidence={"unionid": "u1"},
        merge_id="m-1", occurred_at=NOW,
    ),
    "customer.unmerged": lambda: events.customer_merged(
        tenant="acme", surviving_customer="c-1", merged_customers=["c-2"], evidence={}, merge_id="m-1",
        occurred_at=NOW, unmerge=True,
    ),
    "customer.erased": lambda: events.customer_erased(
        tenant="acme", customer_id="c-1", merged_customers=["c-2"], threads=["th-1"], erasure_id="era-1",
        counts={"messages": 3, "identities": 2}, digest="0" * 64, occurred_at=NOW,
    ),
}


def test_every_schema_file_is_a_valid_2020_12_schema() -> None:
    files = sorted(SCHEMA_DIR.glob("*.json"))
    assert {f.stem for f in files} >= {*events.EVENT_TYPES, "event", "envelope"}
    for path in files:
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text(encoding="utf-8")))


def test_every_event_type_has_a_builder_here() -> None:
    built = {BUILDERS[name]().type for name in BUILDERS}
    assert built == set(events.EVENT_TYPES)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_built_events_validate(name: str) -> None:
    event = BUILDERS[name]()
    body = validate_event(event.body)
    assert body["type"] == event.type
    assert body["event_id"] == event.event_id


def _broken(mutate: Callable[[dict[str, Any]], None], build: Callable[[], Event] = _full_message) -> bytes:
    body = orjson.loads(build().body)
    mutate(body)
    return orjson.dumps(body)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = body
        for part in parents:
            node = node[part]
        node[last] = value
    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = body
        for part in parents:
            node = node[part]
        del node[last]
    return mutate


@pytest.mark.parametrize(
    ("case", "mutate"),
    [
        ("unknown type", _set("type", "message.exploded")),
        ("wrong schema version", _set("schema", "ticketgate.event/2")),
        ("event_id not a uuid", _set("event_id", "42")),
        ("occurred_at not a date-time", _set("occurred_at", "yesterday")),
        ("missing tenant", _drop("tenant")),
        ("unknown top-level field", _set("surprise", 1)),
        ("unknown message field", _set("message.body", "x")),
        ("missing thread sequence", _drop("thread.sequence")),
        ("sequence zero", _set("thread.sequence", 0)),
        ("attachment bytes on the bus", _set("message.attachments", [{"name": "a", "data": "AAAA"}])),
        ("bad sha256", lambda body: body["message"]["attachments"][0].update(sha256="XYZ")),
        ("identity without verified", _set("customer.identities", [{"kind": "email", "value": "a@b"}])),
        ("type disagrees with payload", _set("type", "thread.merged")),
    ],
)
def test_broken_events_do_not_validate(case: str, mutate: Callable[[dict[str, Any]], None]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate_event(_broken(mutate))


def test_an_edit_names_the_message_it_edits_and_a_received_message_cannot() -> None:
    body = validate_event(_edited_message().body)
    assert body["type"] == "message.edited"
    assert body["message"]["edit_of"] != body["message"]["id"]
    with pytest.raises(jsonschema.ValidationError):
        validate_event(_broken(_drop("message.edit_of"), _edited_message))
    with pytest.raises(jsonschema.ValidationError):
        validate_event(_broken(_set("message.edit_of", body["message"]["edit_of"])))


def test_a_deletion_names_the_message_it_deletes_and_nothing_else_can() -> None:
    body = validate_event(_deleted_message().body)
    assert body["type"] == "message.deleted"
    assert body["message"]["delete_of"] != body["message"]["id"]
    with pytest.raises(jsonschema.ValidationError):
        validate_event(_broken(_drop("message.delete_of"), _deleted_message))
    with pytest.raises(jsonschema.ValidationError):
        validate_event(_broken(_set("message.delete_of", body["message"]["delete_of"]), _edited_message))


def test_a_deletion_fingerprint_differs_but_older_fingerprints_do_not_move() -> None:
    message = CanonicalMessage(channel="slack", tenant="acme", inbox="ws", external_id="x", received_at=NOW)
    assert replace(message, delete_of="d").fingerprint() != message.fingerprint()
    # The field joins the digest only when set: a key claimed before it existed still matches.
    assert message.fingerprint() == replace(message, delete_of=None).fingerprint()


def test_extra_is_open_but_other_objects_are_closed() -> None:
    validate_event(_broken(_set("message.extra", {"anything": {"goes": [1, 2]}})))
    with pytest.raises(jsonschema.ValidationError):
        validate_event(_broken(_set("routing.weight", 3)))


def test_a_body_that_is_not_an_object_is_rejected() -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate_event(b"[]")


def test_schema_directory_is_where_the_docs_say() -> None:
    assert Path(__file__).resolve().parent.parent / "docs" / "schema" == SCHEMA_DIR
