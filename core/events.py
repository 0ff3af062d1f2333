"""The event contract (v1): building ``ticketgate.event/1`` bodies and their AMQP envelope.

Pure functions. The JSON Schemas in ``docs/schema/`` describe exactly what is built here, and the
integration tests validate every consumed event against them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import orjson

from core.model import CanonicalMessage, Identity, Placement

SCHEMA = "ticketgate.event/1"

MESSAGE_RECEIVED = "message.received"
MESSAGE_QUARANTINED = "message.quarantined"
# A message the customer changed after sending (``CanonicalMessage.edit_of`` names the original).
MESSAGE_EDITED = "message.edited"
# A message the customer deleted (``CanonicalMessage.delete_of`` names it).
MESSAGE_DELETED = "message.deleted"
THREAD_MERGED = "thread.merged"
CUSTOMER_MERGED = "customer.merged"
CUSTOMER_UNMERGED = "customer.unmerged"
# A customer's personal data was erased (``ticketgate customer erase``, the desk API): desks erase too.
CUSTOMER_ERASED = "customer.erased"
# The way back: the outcome of a desk's reply command, and what the provider later reported.
REPLY_SENT = "reply.sent"
REPLY_FAILED = "reply.failed"
REPLY_DELIVERED = "reply.delivered"
REPLY_READ = "reply.read"
REPLY_TYPES = (REPLY_SENT, REPLY_FAILED, REPLY_DELIVERED, REPLY_READ)
EVENT_TYPES = (
    MESSAGE_RECEIVED,
    MESSAGE_QUARANTINED,
    THREAD_MERGED,
    CUSTOMER_MERGED,
    CUSTOMER_UNMERGED,
    MESSAGE_EDITED,
    MESSAGE_DELETED,
    *REPLY_TYPES,
    CUSTOMER_ERASED,
)

_uuid7_lock = threading.Lock()
_uuid7_state = [0, 0]  # last millisecond, counter


def new_event_id(now_ns: int | None = None) -> str:
    """A UUIDv7 (RFC 9562) in its canonical text form: time-ordered, unique across processes."""
    h = f"{uuid7_int(now_ns):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7_int(now_ns: int | None = None) -> int:
    """The 128 bits of a new UUIDv7.

    The 74 bits after the timestamp start random each millisecond and count up within it
    (RFC 9562 method 2), so ids of one process are strictly increasing even on a still clock.
    """
    ms = (now_ns if now_ns is not None else time.time_ns()) // 1_000_000
    with _uuid7_lock:
        last_ms, counter = _uuid7_state
        if ms > last_ms:
            # Top bit clear leaves room for 2**73 increments before the counter could overflow.
            last_ms, counter = ms, int.from_bytes(os.urandom(10)) >> 7
        else:
            counter += 1
        _uuid7_state[:] = [last_ms, counter]
    return (
        (last_ms << 80) | (0x7 << 76) | ((counter >> 62) << 64) | (0b10 << 62) | (counter & ((1 << 62) - 1))
    )


def isoformat(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def routing_key(tenant: str, channel: str, event_type: str) -> str:
    """``{tenant}.{channel}.{type}``; dots inside the parts would break bindings, so they become '-'."""
    return ".".join((tenant.replace(".", "-"), channel.replace(".", "-"), event_type))


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One event ready for the outbox: body bytes plus what the AMQP envelope needs."""

    event_id: str
    type: str
    tenant: str
    channel: str
    routing_key: str
    body: bytes = field(repr=False)
    thread_id: str | None = None
    sequence: int | None = None
    occurred_at: datetime

    def amqp_headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {"schema": SCHEMA, "tenant": self.tenant, "channel": self.channel}
        if self.sequence is not None:
            headers["sequence"] = self.sequence
        return headers


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomerView:
    """The customer as the event shows it (after identity resolution)."""

    id: str
    identities: tuple[Identity, ...]
    display_name: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredAttachment:
    name: str
    content_type: str
    size: int
    sha256: str
    inline: bool = False


def _event(
    *,
    event_type: str,
    tenant: str,
    channel: str,
    payload: Mapping[str, Any],
    occurred_at: datetime,
    thread_id: str | None = None,
    sequence: int | None = None,
    event_id: str | None = None,
) -> Event:
    event_id = event_id or new_event_id()
    body = {
        "schema": SCHEMA,
        "event_id": event_id,
        "type": event_type,
        "occurred_at": isoformat(occurred_at),
        "tenant": tenant,
        **payload,
    }
    return Event(
        event_id=event_id,
        type=event_type,
        tenant=tenant,
        channel=channel,
        routing_key=routing_key(tenant, channel, event_type),
        body=orjson.dumps(body),
        thread_id=thread_id,
        sequence=sequence,
        occurred_at=occurred_at,
    )


def attachment_url(public_url: str | None, sha256: str) -> str | None:
    return f"{public_url.rstrip('/')}/blobs/{sha256}" if public_url else None


def media_path(channel: str, inbox: str, ref: str) -> str:
    """The stable name of provider-held media (a WeChat media_id): ``{channel}/{inbox}/{ref}``, escaped."""
    return f"{channel}/{quote(inbox, safe='')}/{quote(ref, safe='')}"


def media_url(public_url: str | None, channel: str, inbox: str, ref: str) -> str | None:
    """Where the gateway serves a message's media once fetched (the connector fetches after commit)."""
    return f"{public_url.rstrip('/')}/media/{media_path(channel, inbox, ref)}" if public_url else None


def message_received(
    message: CanonicalMessage,
    *,
    placement: Placement,
    customer: CustomerView,
    thread_subject: str | None,
    raw_ref: str | None,
    signature_verified: bool,
    retry: int,
    public_url: str | None,
    occurred_at: datetime,
    duplicate_of: str | None = None,
    reply: Mapping[str, Any] | None = None,
    retry_reason: str | None = None,
) -> Event:
    """Build the ``message.received`` event for a message the store has just placed; for an edit
    (``message.edit_of`` set) the ``message.edited`` event, the same shape plus ``message.edit_of``; for
    a deletion (``message.delete_of`` set) ``message.deleted``, plus ``message.delete_of``.

    ``reply`` says how the thread can be answered (:func:`reply_options`); without it the event
    says no channel can answer. ``retry_reason`` is why the provider redelivered, when it says so
    (Slack's ``X-Slack-Retry-Reason``); ``provenance.retry_reason`` only appears then."""
    number = placement.thread_number
    payload = {
        "thread": {
            "id": placement.thread_id,
            "is_new": placement.is_new_thread,
            "sequence": placement.sequence,
            "subject": thread_subject,
            "previous_id": placement.previous_thread_id,
            "number": number,
            "tag": ticket_tag(number) if number is not None else None,
        },
        "reply": dict(reply) if reply is not None else {"default_channel": None, "channels": []},
        "customer": {
            "id": customer.id,
            "identities": [
                {"kind": i.kind, "value": i.value, "verified": i.verified} for i in customer.identities
            ],
            "display_name": customer.display_name,
        },
        "message": {
            "id": placement.message_id,
            "kind": message.kind,
            "channel": message.channel,
            "inbox": message.inbox,
            "external_id": message.external_id,
            "sent_at": isoformat(message.sent_at),
            "received_at": isoformat(message.received_at),
            "subject": message.subject,
            "text": message.text,
            "html": message.html,
            "reply_text": message.reply_text,
            "language": message.language,
            "attachments": [
                {
                    "name": a.name,
                    "content_type": a.content_type,
                    "size": a.size,
                    "sha256": a.sha256,
                    "inline": a.inline,
                    "url": attachment_url(public_url, a.sha256),
                }
                for a in message.attachments
            ],
            "media": [
                {
                    "kind": m.kind,
                    "ref": m.ref,
                    "name": m.name,
                    "content_type": m.content_type,
                    "url": media_url(public_url, message.channel, message.inbox, m.ref),
                }
                for m in message.media
            ],
            "entities": [{"kind": e.kind, "value": e.value} for e in message.entities],
            "in_reply_to": message.in_reply_to,
            "references": list(message.references),
            "auto_generated": message.auto_generated,
            # The engine puts it on the placement; an explicit argument overrides.
            "duplicate_of": duplicate_of if duplicate_of is not None else placement.duplicate_of,
            "extra": dict(message.extra),
            **({"edit_of": message.edit_of} if message.edit_of is not None else {}),
            **({"delete_of": message.delete_of} if message.delete_of is not None else {}),
        },
        "routing": {
            "priority": message.routing.priority,
            "tags": list(message.routing.tags),
            "queue": message.routing.queue,
        },
        "provenance": {
            "signature_verified": signature_verified,
            "retry": retry,
            "raw_ref": raw_ref,
            **({"retry_reason": retry_reason} if retry_reason else {}),
        },
    }
    return _event(
        event_type=_message_event_type(message),
        tenant=message.tenant,
        channel=message.channel,
        payload=payload,
        occurred_at=occurred_at,
        thread_id=placement.thread_id,
        sequence=placement.sequence,
    )


def _message_event_type(message: CanonicalMessage) -> str:
    if message.delete_of is not None:
        return MESSAGE_DELETED
    return MESSAGE_RECEIVED if message.edit_of is None else MESSAGE_EDITED


def ticket_tag(number: int) -> str:
    """The subject tag of thread ``number``, which an email (or any text) refers to it by."""
    return f"[#TG-{number}]"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyChannel:
    """A channel that can answer: its sender's window (``None``: none) and the identity kinds it
    sends to."""

    name: str
    window: float | None
    identity_kinds: frozenset[str]


def reply_options(
    message: CanonicalMessage, customer: CustomerView, channels: Sequence[ReplyChannel]
) -> dict[str, Any]:
    """``message.received``'s ``reply`` block: the channels that can answer this customer (a sender
    and an identity the channel sends to; the message's own channel first) with the window's end
    where one applies (known for the message's own channel: it counts from this message), and the
    channel a reply without ``channel`` goes out on."""
    kinds = {i.kind for i in (*customer.identities, *message.identities)}
    found: list[dict[str, Any]] = []
    for channel in sorted(channels, key=lambda c: (c.name != message.channel, c.name)):
        own = channel.name == message.channel
        if not own and not kinds & channel.identity_kinds:
            continue
        ends = None
        if own and channel.window is not None:
            ends = isoformat(message.received_at + timedelta(seconds=channel.window))
        found.append(
            {
                "channel": channel.name,
                "inbox": message.inbox if own else None,
                "window_seconds": channel.window,
                "window_ends_at": ends,
            }
        )
    return {"default_channel": found[0]["channel"] if found else None, "channels": found}


def message_quarantined(
    *,
    quarantine_id: str,
    tenant: str,
    channel: str,
    inbox: str,
    reason: str,
    raw_ref: str,
    size: int,
    received_at: datetime,
    occurred_at: datetime,
) -> Event:
    payload = {
        "quarantine": {
            "id": quarantine_id,
            "channel": channel,
            "inbox": inbox,
            "reason": reason,
            "raw_ref": raw_ref,
            "size": size,
            "received_at": isoformat(received_at),
        }
    }
    return _event(
        event_type=MESSAGE_QUARANTINED,
        tenant=tenant,
        channel=channel,
        payload=payload,
        occurred_at=occurred_at,
    )


def thread_merged(
    *,
    tenant: str,
    channel: str,
    surviving_thread: str,
    merged_threads: Sequence[str],
    reason: str,
    occurred_at: datetime,
) -> Event:
    payload = {"thread": {"id": surviving_thread, "merged": list(merged_threads), "reason": reason}}
    return _event(
        event_type=THREAD_MERGED,
        tenant=tenant,
        channel=channel,
        payload=payload,
        occurred_at=occurred_at,
        thread_id=surviving_thread,
    )


def customer_merged(
    *,
    tenant: str,
    surviving_customer: str,
    merged_customers: Sequence[str],
    evidence: Mapping[str, Any],
    merge_id: str,
    occurred_at: datetime,
    unmerge: bool = False,
) -> Event:
    payload = {
        "customer": {"id": surviving_customer, "merged": list(merged_customers)},
        "merge": {"id": merge_id, "evidence": dict(evidence)},
    }
    return _event(
        event_type=CUSTOMER_UNMERGED if unmerge else CUSTOMER_MERGED,
        tenant=tenant,
        channel="identity",
        payload=payload,
        occurred_at=occurred_at,
    )


def customer_erased(
    *,
    tenant: str,
    customer_id: str,
    merged_customers: Sequence[str],
    threads: Sequence[str],
    erasure_id: str,
    counts: Mapping[str, int],
    digest: str,
    occurred_at: datetime,
) -> Event:
    """``customer.erased``: the gateway erased a customer; names only ids, never personal data."""
    payload = {
        "customer": {"id": customer_id, "merged": list(merged_customers)},
        "erasure": {"id": erasure_id, "threads": list(threads), "counts": dict(counts), "digest": digest},
    }
    return _event(
        event_type=CUSTOMER_ERASED,
        tenant=tenant,
        channel="identity",
        payload=payload,
        occurred_at=occurred_at,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyView:
    """A reply as its events show it (the ledger's row, at the moment of the event)."""

    id: str
    command_id: str
    tenant: str
    thread_id: str
    thread_number: int | None
    customer_id: str | None
    channel: str | None
    inbox: str | None
    attempts: int
    requested_at: datetime
    provider_message_id: str | None = None
    fallback_of: str | None = None


def reply_event(
    event_type: str,
    reply: ReplyView,
    *,
    occurred_at: datetime,
    reason: str | None = None,
    detail: str | None = None,
    at: datetime | None = None,
) -> Event:
    """``reply.sent`` / ``reply.failed`` / ``reply.delivered`` / ``reply.read`` for one reply.

    ``at`` is when the provider says it happened (a delivery report), ``occurred_at`` when the
    gateway recorded it. A reply that never reached a channel (refused, unreachable) is routed as
    channel ``desk``.
    """
    if event_type not in REPLY_TYPES:
        raise ValueError(f"not a reply event: {event_type}")
    payload = {
        "reply": {
            "id": reply.id,
            "command_id": reply.command_id,
            "channel": reply.channel,
            "inbox": reply.inbox,
            "attempts": reply.attempts,
            "requested_at": isoformat(reply.requested_at),
            "provider_message_id": reply.provider_message_id,
            "at": isoformat(at or occurred_at),
            **({"reason": reason, "detail": detail} if event_type == REPLY_FAILED else {}),
            **({"fallback_of": reply.fallback_of} if reply.fallback_of is not None else {}),
        },
        "thread": {"id": reply.thread_id, "number": reply.thread_number},
        "customer": {"id": reply.customer_id},
    }
    return _event(
        event_type=event_type,
        tenant=reply.tenant,
        channel=reply.channel or "desk",
        payload=payload,
        occurred_at=occurred_at,
        thread_id=reply.thread_id,
    )
