"""Messenger and Instagram messaging webhooks -> canonical messages (pure).

One envelope holds a Meta webhook body (``"object": "page"`` for Messenger, ``"instagram"`` for
Instagram) exactly as signed, or the part of one that a single inbox (page or Instagram account)
receives. Every ``entry`` and every item of its ``messaging`` and ``standby`` lists (``standby``:
the thread is controlled by another app through the handover protocol, and the customer still
wrote to us) is read.

- ``message``: text, attachments (image, video, audio, file: provider-held at a URL, fetched after
  the commit; stickers, shares, reels, story mentions), quick replies, replies (``reply_to.mid``),
  Instagram story replies (``reply_to.story``), referrals. ``is_echo`` (the page's own message, from
  our replies or another tool) is ignored, or kept as ``agent_message`` when configured (never
  when its ``app_id`` is one of ours: our replies are already ``reply.sent``).
  ``is_deleted`` and ``is_unsupported`` (Instagram) become ``event`` messages.
- ``postback`` (a button tapped), ``referral`` (an m.me link, an ad), ``reaction`` and
  ``message_edit`` are kept: the first three as ``event`` messages, an edit as ``message.edited``.
- ``delivery`` and ``read`` report on our own replies: the connector handles them; nothing here.
  ``optin``, handover and account-linking items are not customer messages.

Idempotency: the ``mid`` is the external id. Items without one (a referral, an old postback, a
reaction) are keyed by what identifies them: sender, timestamp and content.

Identity: the sender's page-scoped id (PSID, ``messenger_psid``) or Instagram-scoped id (IGSID,
``instagram_igsid``), verified because Meta signed the body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal, TypedDict, cast

from core.errors import NormalizationError
from core.model import CanonicalMessage, Identity, IdentityKind, MediaRef, RawEnvelope
from normalizers.whatsapp import parse_body

MESSENGER, INSTAGRAM = "messenger", "instagram"
OBJECTS = {MESSENGER: "page", INSTAGRAM: "instagram"}
IDENTITY = {MESSENGER: IdentityKind.MESSENGER_PSID, INSTAGRAM: IdentityKind.INSTAGRAM_IGSID}
Echoes = Literal["ignore", "record"]

# attachment type -> (our media kind, default content type); fetched from payload.url.
MEDIA_ATTACHMENTS: dict[str, tuple[str, str | None]] = {
    "image": ("image", "image/jpeg"),
    "video": ("video", "video/mp4"),
    "audio": ("audio", "audio/mp4"),
    "file": ("file", None),
    "story_mention": ("image", None),
    "ig_reel": ("video", "video/mp4"),
    "reel": ("video", "video/mp4"),
}
# Items that are not customer content (delivery/read receipts go to the connector).
NOT_MESSAGES = (
    "delivery",
    "read",
    "optin",
    "account_linking",
    "pass_thread_control",
    "take_thread_control",
    "request_thread_control",
    "app_roles",
    "policy_enforcement",
    "messaging_feedback",
    "game_play",
    "checkout_update",
    "payment",
)


class Party(TypedDict, total=False):
    id: str


class Attachment(TypedDict, total=False):
    type: str
    payload: dict[str, Any]
    title: str
    url: str


class Message(TypedDict, total=False):
    mid: str
    text: str
    is_echo: bool
    app_id: int
    is_deleted: bool
    is_unsupported: bool
    quick_reply: dict[str, Any]
    reply_to: dict[str, Any]
    attachments: list[Attachment]
    referral: dict[str, Any]


class Messaging(TypedDict, total=False):
    sender: Party
    recipient: Party
    timestamp: int
    message: Message
    postback: dict[str, Any]
    referral: dict[str, Any]
    reaction: dict[str, Any]
    message_edit: dict[str, Any]


class Entry(TypedDict, total=False):
    id: str
    time: int
    messaging: list[Messaging]
    standby: list[Messaging]


def items(body: dict[str, Any]) -> Iterator[tuple[Entry, Messaging, bool]]:
    """Every (entry, messaging item, is_standby) of the body; a malformed shape is quarantined."""
    entries = body.get("entry")
    if not isinstance(entries, list):
        raise NormalizationError("the webhook has no entry list")
    for entry in entries:
        if not isinstance(entry, dict):
            raise NormalizationError("an entry is not an object")
        for key in ("messaging", "standby"):
            listed = entry.get(key, [])
            if not isinstance(listed, list):
                raise NormalizationError(f"an entry's {key} is not a list")
            for item in listed:
                if not isinstance(item, dict):
                    raise NormalizationError(f"a {key} item is not an object")
                yield cast(Entry, entry), cast(Messaging, item), key == "standby"


def normalize(
    envelope: RawEnvelope,
    *,
    channel: str = MESSENGER,
    echoes: Echoes = "ignore",
    own_apps: frozenset[str] = frozenset(),
) -> Sequence[CanonicalMessage]:
    """Every customer message of a verified Messenger or Instagram webhook body."""
    body = cast(dict[str, Any], parse_body(envelope.body))
    expected = OBJECTS[channel]
    if body.get("object") != expected:
        raise NormalizationError(f"not a {channel} webhook (object {body.get('object')!r})")
    out: list[CanonicalMessage] = []
    for entry, item, standby in items(body):
        message = _item(envelope, channel, entry, item, standby, echoes, own_apps)
        if message is not None:
            out.append(message)
    return out


def configure(
    channel: str, echoes: Echoes, own_apps: frozenset[str] = frozenset()
) -> Callable[[RawEnvelope], Sequence[CanonicalMessage]]:
    return partial(normalize, channel=channel, echoes=echoes, own_apps=own_apps)


def _item(
    envelope: RawEnvelope,
    channel: str,
    entry: Entry,
    item: Messaging,
    standby: bool,
    echoes: Echoes,
    own_apps: frozenset[str],
) -> CanonicalMessage | None:
    sender = (item.get("sender") or {}).get("id")
    recipient = (item.get("recipient") or {}).get("id")
    timestamp = item.get("timestamp")
    message = item.get("message")
    echo = isinstance(message, dict) and message.get("is_echo") is True
    if echo and echoes == "ignore":
        return None
    if echo and str(cast(Message, message).get("app_id")) in own_apps:
        return None  # our own reply: reply.sent said it already
    if not any(k in item for k in ("message", "postback", "referral", "reaction", "message_edit")):
        return None  # receipts, optins, handover: not a customer message
    # An echo is the page writing to the customer: the customer is the recipient.
    customer = recipient if echo else sender
    if not isinstance(customer, str | int) or not str(customer):
        raise NormalizationError(f"a {channel} item names no sender")
    customer = str(customer)
    extra: dict[str, Any] = {
        "page_id" if channel == MESSENGER else "account_id": str(entry.get("id") or recipient or ""),
        "sender_id": customer,
    }
    if standby:
        extra["standby"] = True
    base = CanonicalMessage(
        channel=envelope.channel,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=None,
        received_at=envelope.received_at,
        sent_at=_timestamp(timestamp),
        identities=(Identity(kind=IDENTITY[channel], value=customer, verified=envelope.signature_verified),),
        extra=extra,
    )
    if isinstance(message, dict):
        canonical = _message(base, message, extra)
        return replace(canonical, kind="agent_message") if echo and canonical.kind == "message" else canonical
    stamp = f"{customer}:{timestamp}"
    if isinstance(item.get("message_edit"), dict):
        return _edit(base, item["message_edit"], extra)
    if isinstance(item.get("postback"), dict):
        postback = item["postback"]
        extra["event"] = "postback"
        extra["postback"] = postback
        mid = postback.get("mid")
        return replace(
            base,
            kind="event",
            text=postback.get("title") or None,
            external_id=mid if isinstance(mid, str) and mid else None,
            dedupe_key=None
            if isinstance(mid, str) and mid
            else f"postback:{stamp}:{postback.get('payload')}",
        )
    if isinstance(item.get("reaction"), dict):
        reaction = item["reaction"]
        action = reaction.get("action")
        target = reaction.get("mid")
        extra["event"] = "reaction_removed" if action == "unreact" else "reaction"
        extra["reaction"] = reaction
        return replace(
            base,
            kind="event",
            text=reaction.get("emoji") if action != "unreact" else None,
            in_reply_to=target if isinstance(target, str) and target else None,
            dedupe_key=f"reaction:{stamp}:{target}:{action}:{reaction.get('reaction')}",
        )
    referral = item.get("referral")
    extra["event"] = "referral"
    extra["referral"] = referral
    ref = referral.get("ref") if isinstance(referral, dict) else None
    return replace(base, kind="event", dedupe_key=f"referral:{stamp}:{ref}")


def _message(base: CanonicalMessage, message: Message, extra: dict[str, Any]) -> CanonicalMessage:
    mid = message.get("mid")
    if not isinstance(mid, str) or not mid:
        raise NormalizationError("a message has no mid")
    base = replace(base, external_id=mid)
    if message.get("is_echo"):
        extra["echo"] = True
        if message.get("app_id") is not None:
            extra["app_id"] = message["app_id"]  # which app (ours or another tool) sent it
    if message.get("is_deleted"):
        extra["event"] = "message_deleted"
        extra["deletes"] = {"external_id": mid, "message_id": base.message_id()}
        return replace(
            base, kind="event", in_reply_to=mid, dedupe_key=f"deleted:{mid}", delete_of=base.message_id()
        )
    if message.get("is_unsupported"):
        extra["event"] = "unsupported"
        extra["unsupported"] = {"type": "unsupported"}
        return replace(base, kind="event")
    if isinstance(message.get("quick_reply"), dict):
        extra["quick_reply"] = message["quick_reply"]
    if isinstance(message.get("referral"), dict):
        extra["referral"] = message["referral"]
    in_reply_to = None
    reply_to = message.get("reply_to")
    if isinstance(reply_to, dict):
        if isinstance(reply_to.get("story"), dict):
            extra["story_reply"] = reply_to["story"]  # an Instagram story the customer answered
        elif isinstance(reply_to.get("mid"), str):
            in_reply_to = reply_to["mid"]
            extra["reply_to"] = {"mid": in_reply_to}
    media: list[MediaRef] = []
    kept: list[dict[str, Any]] = []
    for attachment in cast(list[Any], message.get("attachments") or []):
        if not isinstance(attachment, dict):
            continue
        kind = str(attachment.get("type") or "")
        payload = attachment.get("payload") if isinstance(attachment.get("payload"), dict) else {}
        url = (payload or {}).get("url")
        kept.append({k: v for k, v in attachment.items() if k in ("type", "payload", "title", "url")})
        if kind == "story_mention":
            extra["story_mention"] = True
        if kind in MEDIA_ATTACHMENTS and isinstance(url, str) and url.startswith(("https://", "http://")):
            our_kind, content_type = MEDIA_ATTACHMENTS[kind]
            if kind == "image" and payload and payload.get("sticker_id"):
                our_kind = "sticker"
            media.append(MediaRef(kind=our_kind, ref=url, content_type=content_type))
    if kept:
        extra["attachments"] = kept
    text = message.get("text")
    return replace(
        base,
        text=text if isinstance(text, str) and text else None,
        media=tuple(media),
        in_reply_to=in_reply_to,
    )


def _edit(base: CanonicalMessage, edit: dict[str, Any], extra: dict[str, Any]) -> CanonicalMessage:
    mid = edit.get("mid")
    if not isinstance(mid, str) or not mid:
        raise NormalizationError("a message_edit has no mid")
    extra["edit"] = {"num_edit": edit.get("num_edit")}
    original = replace(base, external_id=mid)
    return replace(
        original,
        text=edit.get("text") or None,
        edit_of=original.message_id(),
        dedupe_key=f"edit:{mid}:{edit.get('num_edit')}",
    )


def _timestamp(value: object) -> datetime | None:
    """Messenger timestamps are milliseconds since the epoch."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return datetime.fromtimestamp(value / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None


normalize_messenger = partial(normalize, channel=MESSENGER)
normalize_instagram = partial(normalize, channel=INSTAGRAM)
