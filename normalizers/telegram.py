"""Telegram Bot API updates -> canonical messages (pure).

One envelope holds one ``Update`` object exactly as the Bot API sent it (a webhook body, or one
element of a ``getUpdates`` result). ``message`` and ``channel_post`` become a message;
``edited_message`` and ``edited_channel_post`` become an edit (``CanonicalMessage.edit_of`` names
the message it edits, so its event is ``message.edited``). Every other update kind (callback_query,
inline_query, my_chat_member, chat_member, chat_join_request, poll, poll_answer, message_reaction,
shipping and pre-checkout queries, business updates ...) is not a customer message: it yields
nothing, and the connector answers 200 so that Telegram does not redeliver it.

Idempotency: message ids are unique within a chat, so ``{chat.id}:{message_id}`` is the external
id, and a redelivered update (same ``update_id``) or the same message arriving in another update
claims the same key. An edit is keyed by its ``edit_date`` on top, so each edit is one event.

Identity: the sender's Telegram user id (or the ``sender_chat`` posting as a channel or an anonymous
admin), verified because the connector verified the bot's secret token (or polled the Bot API
itself). A shared ``contact`` gives a verified E.164 phone only when its ``user_id`` is the sender
(Telegram's "share my phone number" button); anybody else's contact card is content.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict, cast

import phonenumbers

from core.errors import NormalizationError
from core.model import CanonicalMessage, Identity, IdentityKind, MediaRef, RawEnvelope
from normalizers.base import json_object

CHANNEL = "telegram"
# The Bot API serves files of at most 20 MB through getFile; bigger ones cannot be fetched at all.
MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024
MESSAGE_UPDATES = ("message", "edited_message", "channel_post", "edited_channel_post")
GROUP_CHATS = frozenset({"group", "supergroup", "channel"})


class User(TypedDict, total=False):
    id: int
    is_bot: bool
    first_name: str
    last_name: str
    username: str
    language_code: str


class Chat(TypedDict, total=False):
    id: int
    type: str
    title: str
    username: str
    first_name: str
    last_name: str
    is_forum: bool


class FileInfo(TypedDict, total=False):
    """The fields every Bot API file object shares (PhotoSize, Document, Voice, Audio, Video ...)."""

    file_id: str
    file_unique_id: str
    file_size: int
    file_name: str
    mime_type: str
    width: int
    height: int
    duration: int
    title: str
    performer: str
    emoji: str
    is_animated: bool
    is_video: bool


class Location(TypedDict, total=False):
    latitude: float
    longitude: float
    horizontal_accuracy: float


class Venue(TypedDict, total=False):
    location: Location
    title: str
    address: str
    foursquare_id: str
    google_place_id: str


class Contact(TypedDict, total=False):
    phone_number: str
    first_name: str
    last_name: str
    user_id: int
    vcard: str


class Message(TypedDict, total=False):
    message_id: int
    message_thread_id: int
    is_topic_message: bool
    date: int
    edit_date: int
    chat: Chat
    sender_chat: Chat
    reply_to_message: Message
    media_group_id: str
    text: str
    caption: str
    photo: list[FileInfo]
    document: FileInfo
    animation: FileInfo
    audio: FileInfo
    video: FileInfo
    video_note: FileInfo
    voice: FileInfo
    sticker: FileInfo
    location: Location
    venue: Venue
    contact: Contact


# ``from`` is a keyword, so the sender's field is declared functionally.
Sender = TypedDict("Sender", {"from": User}, total=False)


class Update(TypedDict, total=False):
    update_id: int
    message: Message
    edited_message: Message
    channel_post: Message
    edited_channel_post: Message


MediaKind = Literal["image", "file", "video", "audio", "voice", "sticker"]
# (field, our kind, default content type); ``animation`` before ``document``: Telegram sends both for a GIF.
_MEDIA_FIELDS: tuple[tuple[str, MediaKind, str | None], ...] = (
    ("animation", "video", "video/mp4"),
    ("document", "file", None),
    ("audio", "audio", None),
    ("video", "video", "video/mp4"),
    ("video_note", "video", "video/mp4"),
    ("voice", "voice", "audio/ogg"),
    ("sticker", "sticker", None),
)


def parse_update(body: bytes) -> Update:
    """The update object; ``InvalidInput`` (400) when the body is not a JSON object at all."""
    return cast(Update, json_object(body))


def update_kind(update: Update) -> str:
    """The update's kind: the one field besides ``update_id`` (``unknown`` for an empty update)."""
    return next((name for name in update if name != "update_id"), "unknown")


def normalize(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    """Normalize one verified update; unsupported kinds yield nothing."""
    update = parse_update(envelope.body)
    update_id = update.get("update_id")
    if not _is_int(update_id):
        raise NormalizationError("the update has no integer update_id")
    kind = update_kind(update)
    if kind not in MESSAGE_UPDATES:
        return ()
    message = _object(update.get(kind), kind)
    return (_to_canonical(envelope, cast(Message, message), kind=kind, update_id=cast(int, update_id)),)


def _to_canonical(envelope: RawEnvelope, message: Message, *, kind: str, update_id: int) -> CanonicalMessage:
    message_id, date = message.get("message_id"), message.get("date")
    chat = cast(Chat, _object(message.get("chat"), f"{kind}.chat"))
    chat_id = chat.get("id")
    if not (_is_int(message_id) and _is_int(date) and _is_int(chat_id)):
        raise NormalizationError(f"{kind} lacks an integer message_id, date or chat.id")
    sender = cast(Sender, message).get("from")
    sender_chat = message.get("sender_chat")
    verified = envelope.signature_verified
    identities: list[Identity] = []
    display_name: str | None = None
    # A message posted as a chat (a channel post, an anonymous admin) carries a placeholder ``from``.
    if isinstance(sender_chat, dict) and _is_int(sender_chat.get("id")):
        identities.append(
            Identity(kind=IdentityKind.TELEGRAM, value=str(sender_chat["id"]), verified=verified)
        )
        display_name = _chat_name(sender_chat)
    elif isinstance(sender, dict) and _is_int(sender.get("id")):
        identities.append(Identity(kind=IdentityKind.TELEGRAM, value=str(sender["id"]), verified=verified))
        display_name = _person_name(sender.get("first_name"), sender.get("last_name"))
    extra: dict[str, Any] = {
        "update_id": update_id,
        "update_type": kind,
        "message_id": message_id,
        "chat": _chat_extra(chat),
    }
    if isinstance(sender, dict):
        extra["from"] = {k: sender[k] for k in ("id", "is_bot", "username", "language_code") if k in sender}
    phone = _contact(message, sender, extra)
    if phone is not None:
        identities.append(Identity(kind=IdentityKind.PHONE, value=phone, verified=verified))
    media = _media(message, extra)
    text = message.get("text") or message.get("caption")
    venue = _venue(message, extra)
    _location(message, extra)
    if message.get("media_group_id"):
        extra["media_group_id"] = message["media_group_id"]
    reply = message.get("reply_to_message")
    in_reply_to = None
    topic = message.get("message_thread_id") if message.get("is_topic_message") else None
    # In a forum, a message that answers nobody in particular "replies" to its topic's first message.
    if isinstance(reply, dict) and _is_int(reply.get("message_id")) and reply.get("message_id") != topic:
        in_reply_to = f"{chat_id}:{reply['message_id']}"
        extra["reply_to_message_id"] = reply["message_id"]
    thread_ref = None
    if chat.get("type") in GROUP_CHATS:
        thread_ref = f"chat:{chat_id}"
        if _is_int(topic):
            thread_ref += f":topic:{topic}"
    canonical = CanonicalMessage(
        channel=envelope.channel,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=f"{chat_id}:{message_id}",
        received_at=envelope.received_at,
        sent_at=_timestamp(cast(int, date)),
        identities=tuple(identities),
        display_name=display_name,
        text=text if isinstance(text, str) and text else venue,
        media=media,
        in_reply_to=in_reply_to,
        thread_ref=thread_ref,
        auto_generated="bot" if _from_bot(sender) and not sender_chat else None,
        extra=extra,
    )
    if not kind.startswith("edited_"):
        return canonical
    edit_date = message.get("edit_date")
    if not _is_int(edit_date):
        raise NormalizationError(f"{kind} has no integer edit_date")
    extra["edit_date"] = edit_date
    # The original's id is deterministic, so the edit can name it without a lookup.
    return replace(
        canonical,
        edit_of=canonical.message_id(),
        sent_at=_timestamp(cast(int, edit_date)),
        dedupe_key=f"edit:{chat_id}:{message_id}:{edit_date}",
    )


def _media(message: Message, extra: dict[str, Any]) -> tuple[MediaRef, ...]:
    """The files to fetch; files over the Bot API's download limit are listed in ``extra`` instead."""
    found: list[tuple[MediaKind, FileInfo, str | None]] = []
    photos = message.get("photo")
    if isinstance(photos, list) and photos:
        # Telegram lists the sizes smallest first: the last is the original.
        found.append(("image", photos[-1], "image/jpeg"))
    for name, kind, default_type in _MEDIA_FIELDS:
        info = message.get(name)
        if isinstance(info, dict):
            content_type = _sticker_type(info) if name == "sticker" else default_type
            found.append((kind, cast(FileInfo, info), content_type))
            if name == "animation":
                break  # its ``document`` twin describes the same file
    refs: list[MediaRef] = []
    skipped: list[dict[str, Any]] = []
    for kind, info, default_type in found:
        file_id = info.get("file_id")
        if not isinstance(file_id, str) or not file_id:
            continue
        size = info.get("file_size")
        if _is_int(size) and cast(int, size) > MAX_DOWNLOAD_BYTES:
            skipped.append({
                "kind": kind, "file_unique_id": info.get("file_unique_id"), "size": size,
                "name": info.get("file_name"), "reason": "too_big",
            })
            continue
        content_type = info.get("mime_type") or default_type
        refs.append(MediaRef(kind=kind, ref=file_id, name=info.get("file_name"), content_type=content_type))
    if skipped:
        extra["media_skipped"] = skipped
    sticker = message.get("sticker")
    if isinstance(sticker, dict) and sticker.get("emoji"):
        extra["sticker_emoji"] = sticker["emoji"]
    return tuple(refs)


def _sticker_type(info: Mapping[str, Any]) -> str:
    if info.get("is_animated"):
        return "application/x-tgsticker"
    return "video/webm" if info.get("is_video") else "image/webp"


def _contact(message: Message, sender: User | None, extra: dict[str, Any]) -> str | None:
    """Keep a shared contact as content; its E.164 phone when it is the sender's own number."""
    contact = message.get("contact")
    if not isinstance(contact, dict):
        return None
    extra["contact"] = {
        k: contact[k] for k in ("phone_number", "first_name", "last_name", "user_id") if k in contact
    }
    owner = contact.get("user_id")
    sender_id = sender.get("id") if isinstance(sender, dict) else None
    if not (_is_int(owner) and owner == sender_id):
        return None
    return _e164(contact.get("phone_number"))


def _e164(value: object) -> str | None:
    """Telegram gives international numbers, usually without the ``+``."""
    if not isinstance(value, str) or not value.strip():
        return None
    digits = value.strip()
    try:
        number = phonenumbers.parse(digits if digits.startswith("+") else f"+{digits}", None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _location(message: Message, extra: dict[str, Any]) -> None:
    location = message.get("location")
    if isinstance(location, dict) and "venue" not in message:
        extra["location"] = _coordinates(location)


def _venue(message: Message, extra: dict[str, Any]) -> str | None:
    """Keep a venue in ``extra``; its title and address are the message's text."""
    venue = message.get("venue")
    if not isinstance(venue, dict):
        return None
    location = venue.get("location")
    extra["venue"] = {
        "title": venue.get("title"),
        "address": venue.get("address"),
        "location": _coordinates(location) if isinstance(location, dict) else None,
    }
    parts = [venue.get("title"), venue.get("address")]
    return "\n".join(p for p in parts if isinstance(p, str) and p) or None


def _coordinates(location: Location) -> dict[str, Any]:
    return {"latitude": location.get("latitude"), "longitude": location.get("longitude")}


def _chat_extra(chat: Chat) -> dict[str, Any]:
    return {k: chat[k] for k in ("id", "type", "title", "username") if k in chat}


def _chat_name(chat: Chat) -> str | None:
    title = chat.get("title")
    if isinstance(title, str) and title:
        return title
    return _person_name(chat.get("first_name"), chat.get("last_name"))


def _person_name(first: object, last: object) -> str | None:
    return " ".join(p for p in (first, last) if isinstance(p, str) and p) or None


def _from_bot(sender: User | None) -> bool:
    return isinstance(sender, dict) and sender.get("is_bot") is True


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise NormalizationError(f"{where} is not an object")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _timestamp(seconds: int) -> datetime | None:
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


# The name quarantine replay and the descriptor use.
normalize_telegram = normalize
