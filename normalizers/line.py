"""LINE Messaging API webhook deliveries -> canonical messages (pure).

One envelope holds one webhook request body exactly as LINE sent it: ``{"destination": bot user
id, "events": [...]}``. Every event of the batch is looked at; the ones that are a customer's
doing become messages:

- ``message`` (text, image, video, audio, file, location, sticker; any other type is kept as a
  message with ``extra.unsupported``) and ``messageEdited`` (a ``message.edited`` event whose
  ``edit_of`` is the original's deterministic id);
- ``unsend`` as a deletion (``message.deleted``, ``delete_of`` the unsent message's id);
- ``postback``, ``follow``, ``unfollow``, ``join``, ``leave``, ``memberJoined`` and ``memberLeft``
  as ``kind="event"`` with ``extra.event`` saying which;
- every other type (beacon, accountLink, videoPlayComplete, things, membership, activated ... and
  types LINE adds later) yields nothing: understood, not a ticket.

The console's "Verify" request (an empty ``events`` list, or the old dummy events whose reply
token is all ``0`` or all ``f``) yields nothing either.

Idempotency: a message event is keyed by the provider's ``message.id`` (one message, one id, on
every redelivery; edits and unsends name it, so their ``edit_of`` and ``delete_of`` are
computable); every other event by its ``webhookEventId``, which LINE keeps on redelivery.
``deliveryContext.isRedelivery`` is kept per event in ``extra.redelivery``.

Identity: ``source.userId`` (``line``, verified because the connector checked
``X-Line-Signature``); a group or room event without a user id names the group (``C...``) or room
(``R...``) instead. Groups and rooms are the thread reference (``group:{id}`` / ``room:{id}``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict, cast

from core.errors import InvalidInput, NormalizationError
from core.model import CanonicalMessage, Identity, IdentityKind, MediaRef, RawEnvelope
from normalizers.base import json_object

CHANNEL = "line"
MESSAGE_TYPES = frozenset({"text", "image", "video", "audio", "file", "location", "sticker"})
EVENT_TYPES = frozenset({
    "unsend", "postback", "follow", "unfollow", "join", "leave", "memberJoined", "memberLeft",
})
TICKET_EVENTS = EVENT_TYPES | {"message", "messageEdited"}
# The console's "Verify" button sent these dummy reply tokens before it sent an empty list.
VERIFY_TOKENS = frozenset({"0" * 32, "f" * 32})
_MEDIA_KINDS: dict[str, Literal["image", "video", "audio", "file"]] = {
    "image": "image", "video": "video", "audio": "audio", "file": "file",
}
_DEFAULT_TYPES = {"image": "image/jpeg", "video": "video/mp4", "audio": "audio/m4a"}
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Source(TypedDict, total=False):
    type: str
    userId: str
    groupId: str
    roomId: str


class DeliveryContext(TypedDict, total=False):
    isRedelivery: bool


class ContentProvider(TypedDict, total=False):
    type: str
    originalContentUrl: str
    previewImageUrl: str


class Message(TypedDict, total=False):
    id: str
    type: str
    text: str
    quoteToken: str
    quotedMessageId: str
    markAsReadToken: str
    emojis: list[dict[str, Any]]
    mention: dict[str, Any]
    contentProvider: ContentProvider
    imageSet: dict[str, Any]
    duration: int
    fileName: str
    fileSize: int
    title: str
    address: str
    latitude: float
    longitude: float
    packageId: str
    stickerId: str
    stickerResourceType: str
    keywords: list[str]


class Event(TypedDict, total=False):
    type: str
    mode: str
    timestamp: int
    source: Source
    webhookEventId: str
    deliveryContext: DeliveryContext
    replyToken: str
    message: Message
    unsend: dict[str, Any]
    postback: dict[str, Any]
    follow: dict[str, Any]
    joined: dict[str, Any]
    left: dict[str, Any]


class Delivery(TypedDict, total=False):
    destination: str
    events: list[Event]


def parse_delivery(body: bytes) -> Delivery:
    """The request object; ``InvalidInput`` (400) when the body is not a JSON object with an
    ``events`` list."""
    data = json_object(body)
    if not isinstance(data.get("events"), list):
        raise InvalidInput("the body has no events list")
    return cast(Delivery, data)


def is_verify_request(delivery: Delivery) -> bool:
    """The console's "Verify" button: no events, or only the dummy reply tokens."""
    events = delivery.get("events") or []
    return all(isinstance(e, dict) and e.get("replyToken") in VERIFY_TOKENS for e in events)


def is_redelivery(delivery: Delivery) -> bool:
    """Whether LINE says it delivers (some of) these events again."""
    return any(
        isinstance(e, dict) and isinstance(e.get("deliveryContext"), dict)
        and e["deliveryContext"].get("isRedelivery") is True
        for e in delivery.get("events") or []
    )


def normalize(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    """Every customer event of one verified delivery, in the order LINE sent them."""
    delivery = parse_delivery(envelope.body)
    if is_verify_request(delivery):
        return ()
    destination = delivery.get("destination")
    messages: list[CanonicalMessage] = []
    for index, raw in enumerate(delivery.get("events") or []):
        if not isinstance(raw, dict):
            raise NormalizationError(f"events[{index}] is not an object")
        message = _event(envelope, raw, index, destination)
        if message is not None:
            messages.append(message)
    return tuple(messages)


def _event(
    envelope: RawEnvelope, event: Event, index: int, destination: object
) -> CanonicalMessage | None:
    kind = event.get("type")
    if kind not in TICKET_EVENTS:
        return None
    where = f"events[{index}]"
    event_id, timestamp = event.get("webhookEventId"), event.get("timestamp")
    if not (isinstance(event_id, str) and _ID.match(event_id)):
        raise NormalizationError(f"{where} has no usable webhookEventId")
    if not _is_int(timestamp):
        raise NormalizationError(f"{where} has no integer timestamp")
    source = event.get("source")
    if not isinstance(source, dict):
        raise NormalizationError(f"{where} has no source")
    identities, thread_ref, target = _source(envelope, source, where)
    delivery_context = event.get("deliveryContext")
    extra: dict[str, Any] = {
        "event": kind,
        "webhook_event_id": event_id,
        "redelivery": isinstance(delivery_context, dict) and delivery_context.get("isRedelivery") is True,
        "mode": event.get("mode"),
        "timestamp": timestamp,
        "source": {k: source[k] for k in ("type", "userId", "groupId", "roomId") if k in source},
        # Where a reply goes (push ``to``), and the reply token while it lasts: the sender's inputs.
        "to": target,
    }
    if isinstance(destination, str):
        extra["destination"] = destination
    token = event.get("replyToken")
    if isinstance(token, str) and token:
        extra["reply_token"] = token
    base = CanonicalMessage(
        channel=envelope.channel,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=None,
        received_at=envelope.received_at,
        sent_at=_timestamp(cast(int, timestamp)),
        identities=identities,
        thread_ref=thread_ref,
        extra=extra,
    )
    if kind in ("message", "messageEdited"):
        return _message(base, event, where, edited=kind == "messageEdited")
    return _other(base, event, kind, event_id)



def _source(
    envelope: RawEnvelope, source: Source, where: str
) -> tuple[tuple[Identity, ...], str | None, str]:
    verified = envelope.signature_verified
    kind = source.get("type")
    user, group, room = source.get("userId"), source.get("groupId"), source.get("roomId")
    if kind == "group" and _usable(group):
        thread_ref, target = f"group:{group}", cast(str, group)
    elif kind == "room" and _usable(room):
        thread_ref, target = f"room:{room}", cast(str, room)
    elif kind == "user" and _usable(user):
        thread_ref, target = None, cast(str, user)
    else:
        raise NormalizationError(f"{where}.source has no usable user, group or room id")
    # The person when LINE names them; else the group or room is who can be answered.
    value = cast(str, user) if _usable(user) else target
    return (Identity(kind=IdentityKind.LINE, value=value, verified=verified),), thread_ref, target


def _message(base: CanonicalMessage, event: Event, where: str, *, edited: bool) -> CanonicalMessage:
    raw = event.get("message")
    if not isinstance(raw, dict):
        raise NormalizationError(f"{where} has no message object")
    message = raw
    message_id, message_type = message.get("id"), message.get("type")
    if not (isinstance(message_id, str) and _ID.match(message_id)) or not isinstance(message_type, str):
        raise NormalizationError(f"{where}.message has no usable id or type")
    extra = dict(base.extra)
    extra["message_id"] = message_id
    extra["message_type"] = message_type
    for key, name in (("quoteToken", "quote_token"), ("markAsReadToken", "mark_as_read_token")):
        if isinstance(message.get(key), str):
            extra[name] = message[key]  # type: ignore[literal-required]
    text: str | None = None
    media: tuple[MediaRef, ...] = ()
    if message_type == "text":
        text = message.get("text") if isinstance(message.get("text"), str) else None
        for key in ("emojis", "mention"):
            if key in message:
                extra[key] = message[key]  # type: ignore[literal-required]
    elif message_type in _MEDIA_KINDS:
        media = _media(message, message_id, message_type, extra)
    elif message_type == "location":
        text = _location(message, extra)
    elif message_type == "sticker":
        extra["sticker"] = {
            k: v for k, v in message.items()
            if k in ("packageId", "stickerId", "stickerResourceType", "keywords", "text")
        }
        sticker_text = message.get("text")
        text = sticker_text if isinstance(sticker_text, str) and sticker_text else None
    else:
        # A type LINE added after this was written: kept, marked, never dropped.
        extra["unsupported"] = True
        extra["message"] = dict(message)
    quoted = message.get("quotedMessageId")
    in_reply_to = quoted if isinstance(quoted, str) and quoted else None
    canonical = replace(
        base, external_id=message_id, text=text, media=media, in_reply_to=in_reply_to, extra=extra
    )
    if not edited:
        return canonical
    # The original's id is deterministic (keyed by message.id), so the edit names it without a lookup.
    return replace(
        canonical, edit_of=canonical.message_id(), dedupe_key=f"edit:{base.extra['webhook_event_id']}"
    )


def _media(
    message: Message, message_id: str, message_type: str, extra: dict[str, Any]
) -> tuple[MediaRef, ...]:
    kind = _MEDIA_KINDS[message_type]
    for key, field in (("duration", "duration_ms"), ("fileSize", "file_size"), ("imageSet", "image_set")):
        if key in message:
            extra[field] = message[key]  # type: ignore[literal-required]
    provider = message.get("contentProvider")
    if isinstance(provider, dict) and provider.get("type") == "external":
        # The sender's own server holds it (a LIFF app, another bot): the content API has nothing.
        extra["external_content"] = {
            k: v for k, v in provider.items() if k in ("originalContentUrl", "previewImageUrl")
        }
        return ()
    file_name = message.get("fileName")
    name = file_name if isinstance(file_name, str) and file_name else None
    if name:
        extra["file_name"] = name
    return (MediaRef(kind=kind, ref=message_id, name=name, content_type=_DEFAULT_TYPES.get(message_type)),)


def _location(message: Message, extra: dict[str, Any]) -> str | None:
    extra["location"] = {
        "title": message.get("title"), "address": message.get("address"),
        "latitude": message.get("latitude"), "longitude": message.get("longitude"),
    }
    parts = [message.get("title"), message.get("address")]
    return "\n".join(p for p in parts if isinstance(p, str) and p) or None


def _other(base: CanonicalMessage, event: Event, kind: str, event_id: str) -> CanonicalMessage:
    extra = dict(base.extra)
    if kind == "unsend":
        unsend = event.get("unsend")
        unsent = unsend.get("messageId") if isinstance(unsend, dict) else None
        if isinstance(unsent, str) and _ID.match(unsent):
            # The deterministic id of the message taken back, as its message.received named it:
            # the deletion is a message.deleted event in that message's thread.
            deleted = replace(base, external_id=unsent).message_id()
            extra["unsend"] = {"message_id": unsent, "message": deleted}
            return replace(base, extra=extra, delete_of=deleted, dedupe_key=f"event:{event_id}")
    elif kind == "postback":
        postback = event.get("postback")
        if isinstance(postback, dict):
            extra["postback"] = {k: postback[k] for k in ("data", "params") if k in postback}
    elif kind == "follow":
        follow = event.get("follow")
        if isinstance(follow, dict) and "isUnblocked" in follow:
            extra["follow"] = {"is_unblocked": follow["isUnblocked"]}
    elif kind in ("memberJoined", "memberLeft"):
        members = event.get("joined" if kind == "memberJoined" else "left")
        found = members.get("members") if isinstance(members, dict) else None
        if isinstance(found, list):
            extra["members"] = [
                m["userId"] for m in found if isinstance(m, dict) and isinstance(m.get("userId"), str)
            ]
    return replace(base, kind="event", extra=extra, dedupe_key=f"event:{event_id}")


def _usable(value: object) -> bool:
    return isinstance(value, str) and bool(_ID.match(value))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _timestamp(milliseconds: int) -> datetime | None:
    try:
        return datetime.fromtimestamp(milliseconds / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None


# The name quarantine replay and the descriptor use.
normalize_line = normalize
