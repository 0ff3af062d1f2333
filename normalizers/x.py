"""X (Twitter) Account Activity API deliveries -> canonical messages (pure).

One envelope holds one webhook body exactly as X sent it: ``for_user_id`` (the subscribed account
the activity concerns) and one array of activities. ``direct_message_events`` of type
``message_create`` become messages, every one of the array; a message our own account sent (its
``sender_id`` is ``for_user_id``: a reply from the desk, or someone writing from the X app) is our
own echo and yields nothing. Every other activity (tweets, favorites, follows, typing, read
receipts, blocks ...) is not a direct message: it yields nothing, and the connector answers 200.

Idempotency: the DM event ``id`` is the external id; X redelivers the same id.

Identity: the sender's X user id (``x``, verified because the connector checked
``x-twitter-webhooks-signature``), with the name and handle X includes in ``users``.

Text: t.co links are expanded to the URLs they stand for (``entities.urls``), and the t.co link of
attached media is removed (the media itself is fetched). Media: a photo by its
``media_url_https`` (ton.twitter.com, fetched with the account's OAuth 1.0a credentials), a video or
GIF by its best MP4 variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypedDict, cast

from core.errors import NormalizationError
from core.model import CanonicalMessage, Identity, IdentityKind, MediaRef, RawEnvelope
from normalizers.base import json_object

CHANNEL = "x"
DM_EVENTS = "direct_message_events"


class UrlEntity(TypedDict, total=False):
    url: str
    expanded_url: str
    display_url: str
    indices: list[int]


class Variant(TypedDict, total=False):
    bitrate: int
    content_type: str
    url: str


class Media(TypedDict, total=False):
    id_str: str
    type: str
    media_url_https: str
    url: str
    video_info: dict[str, Any]


class MessageData(TypedDict, total=False):
    text: str
    entities: dict[str, Any]
    attachment: dict[str, Any]
    quick_reply_response: dict[str, Any]


class MessageCreate(TypedDict, total=False):
    target: dict[str, Any]
    sender_id: str
    source_app_id: str
    message_data: MessageData


class DmEvent(TypedDict, total=False):
    type: str
    id: str
    created_timestamp: str
    message_create: MessageCreate


class Delivery(TypedDict, total=False):
    for_user_id: str
    direct_message_events: list[DmEvent]
    users: dict[str, dict[str, Any]]
    apps: dict[str, dict[str, Any]]


def parse_delivery(body: bytes) -> Delivery:
    """The request object; ``InvalidInput`` (400) when the body is not a JSON object."""
    return cast(Delivery, json_object(body))


def activities(delivery: Delivery) -> list[str]:
    """The activity arrays a delivery carries (``direct_message_events``, ``tweet_create_events`` ...)."""
    return [key for key, value in delivery.items() if key.endswith("_events") and isinstance(value, list)]


def normalize(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    """Every direct message of one verified delivery that our account did not send."""
    delivery = parse_delivery(envelope.body)
    account = delivery.get("for_user_id")
    if not isinstance(account, str) or not account.isdigit():
        raise NormalizationError("the delivery has no for_user_id")
    events = delivery.get(DM_EVENTS)
    if events is None:
        return ()
    if not isinstance(events, list):
        raise NormalizationError(f"{DM_EVENTS} is not a list")
    messages: list[CanonicalMessage] = []
    for index, raw in enumerate(events):
        if not isinstance(raw, dict):
            raise NormalizationError(f"{DM_EVENTS}[{index}] is not an object")
        message = _dm(envelope, delivery, cast(DmEvent, raw), account, index)
        if message is not None:
            messages.append(message)
    return tuple(messages)


def _dm(
    envelope: RawEnvelope, delivery: Delivery, event: DmEvent, account: str, index: int
) -> CanonicalMessage | None:
    where = f"{DM_EVENTS}[{index}]"
    if event.get("type") != "message_create":
        return None
    event_id, created = event.get("id"), event.get("created_timestamp")
    create = event.get("message_create")
    if not (isinstance(event_id, str) and event_id.isdigit()) or not isinstance(create, dict):
        raise NormalizationError(f"{where} has no id or message_create")
    sender = create.get("sender_id")
    if not (isinstance(sender, str) and sender.isdigit()):
        raise NormalizationError(f"{where} has no sender_id")
    if sender == account:
        return None  # our own account's message: an echo, not the customer
    data = create.get("message_data")
    data = data if isinstance(data, dict) else {}
    target = create.get("target")
    recipient = target.get("recipient_id") if isinstance(target, dict) else None
    extra: dict[str, Any] = {
        "for_user_id": account,
        "event_id": event_id,
        "sender_id": sender,
        "recipient_id": recipient,
        # Where a reply goes: the DM conversation with this user.
        "to": sender,
    }
    user = (delivery.get("users") or {}).get(sender)
    display_name = None
    if isinstance(user, dict):
        display_name = user.get("name") if isinstance(user.get("name"), str) else None
        if isinstance(user.get("screen_name"), str):
            extra["screen_name"] = user["screen_name"]
    if isinstance(create.get("source_app_id"), str):
        extra["source_app_id"] = create["source_app_id"]
    reply = data.get("quick_reply_response")
    if isinstance(reply, dict):
        extra["quick_reply_response"] = reply
    media, media_link = _media(data, extra)
    text = _text(data, extra, media_link)
    return CanonicalMessage(
        channel=envelope.channel,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=event_id,
        received_at=envelope.received_at,
        sent_at=_timestamp(created),
        identities=(Identity(kind=IdentityKind.X, value=sender, verified=envelope.signature_verified),),
        display_name=display_name,
        text=text,
        media=media,
        extra=extra,
    )


def _text(data: MessageData, extra: dict[str, Any], media_link: str | None) -> str | None:
    """The text with t.co links expanded, working from the end so earlier indices stay right."""
    text = data.get("text")
    if not isinstance(text, str):
        return None
    entities = data.get("entities")
    urls = entities.get("urls") if isinstance(entities, dict) else None
    expanded: list[str] = []
    for entity in sorted(
        (u for u in urls or [] if isinstance(u, dict)), key=lambda u: _start(u), reverse=True
    ):
        short, long = entity.get("url"), entity.get("expanded_url")
        if not isinstance(short, str) or not short:
            continue
        replacement = "" if short == media_link else (long if isinstance(long, str) and long else short)
        if short != media_link:
            expanded.append(replacement)
        start = _start(entity)
        if start >= 0 and text[start:start + len(short)] == short:
            text = text[:start] + replacement + text[start + len(short):]
        else:
            text = text.replace(short, replacement)
    if expanded:
        extra["urls"] = list(reversed(expanded))
    return text.strip() or None


def _start(entity: UrlEntity | dict[str, Any]) -> int:
    indices = entity.get("indices")
    if isinstance(indices, list) and indices and isinstance(indices[0], int):
        return indices[0]
    return -1


def _media(data: MessageData, extra: dict[str, Any]) -> tuple[tuple[MediaRef, ...], str | None]:
    attachment = data.get("attachment")
    if not isinstance(attachment, dict) or attachment.get("type") != "media":
        return (), None
    media = attachment.get("media")
    if not isinstance(media, dict):
        return (), None
    kind = media.get("type")
    extra["media"] = {"id": media.get("id_str"), "type": kind}
    link = media.get("url") if isinstance(media.get("url"), str) else None
    if kind in ("video", "animated_gif"):
        video_info = media.get("video_info")
        variants = video_info.get("variants") if isinstance(video_info, dict) else None
        mp4 = [
            v for v in variants or []
            if isinstance(v, dict) and v.get("content_type") == "video/mp4" and isinstance(v.get("url"), str)
        ]
        if mp4:
            best = max(mp4, key=_bitrate)
            return (MediaRef(kind="video", ref=best["url"], content_type="video/mp4"),), link
    url = media.get("media_url_https")
    if isinstance(url, str) and url.startswith(("https://", "http://")):
        return (MediaRef(kind="image", ref=url, content_type=None),), link
    extra["media"]["unfetchable"] = True
    return (), link


def _bitrate(variant: dict[str, Any]) -> int:
    bitrate = variant.get("bitrate")
    return bitrate if isinstance(bitrate, int) else 0


def _timestamp(milliseconds: object) -> datetime | None:
    if not isinstance(milliseconds, str) or not milliseconds.isdigit():
        return None
    try:
        return datetime.fromtimestamp(int(milliseconds) / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None


# The name quarantine replay and the descriptor use.
normalize_x = normalize
