"""Feishu / Lark event subscription v2 callbacks -> canonical messages (pure).

One envelope holds one event callback as plaintext JSON: the request body when Feishu sent it in
the clear, else the decrypted ``encrypt`` field (the connector verified the signature first and
keeps ``meta.encrypted = true``); a long-connection event's payload is the same JSON
(``meta.transport = "ws"``).

What becomes a message: ``im.message.receive_v1`` from a person (``sender_type = "user"``) in a
private chat with the bot (``chat_type = "p2p"``), and in a group when the bot is mentioned (Feishu
only delivers group messages that mention the bot unless the app holds the "read all group
messages" scope; with ``meta.bot_open_id`` the normalizer checks the mention itself). Message types:
``text``, ``post`` (rich text: its text, links and images), ``image``, ``file``, ``audio``,
``media``, ``sticker``, ``interactive`` (a card: its title and text), ``merge_forward`` (the
forwarded messages are kept by reference), and the rest as a short description. Images and files
are media refs ``{message_id}:{key}`` fetched after the commit through the message-resource API.
Everything else (the bot added to a chat, reactions, read receipts) yields nothing.

Idempotency: ``message_id`` (``om_…``) is the external id, so every redelivery of an event
(``header.event_id``) and the same message over HTTP and the long connection make one ticket.

Identity: ``feishu_open_id`` ``{app_id}:{open_id}``, ``feishu_union_id`` and ``feishu_user_id``
``{tenant_key}:{user_id}`` of the sender, verified (the callback was signed). The employee's work
email is not read here: the connector links it to the customer after the commit, from the tenant's
directory (the contact API), so that every redelivery of a message carries the same identities.

Threads: a group message's thread is ``{chat_id}:{thread}`` (its topic thread, the root of its
reply chain, or the message itself); a private chat joins the employee's open thread by the window,
unless the message answers inside a Feishu thread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypedDict, cast

import orjson

from core.errors import InvalidInput, NormalizationError
from core.model import CanonicalMessage, Identity, IdentityKind, MediaRef, RawEnvelope

CHANNEL = "feishu"
MESSAGE_EVENT = "im.message.receive_v1"
MEDIA_TYPES = {"image": "image", "file": "file", "audio": "voice", "media": "video", "sticker": "image"}
_PLACEHOLDER = re.compile(r"@_user_\d+")
_ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


class SenderId(TypedDict, total=False):
    open_id: str
    union_id: str
    user_id: str


class Sender(TypedDict, total=False):
    sender_id: SenderId
    sender_type: str
    tenant_key: str


class Mention(TypedDict, total=False):
    key: str
    id: SenderId
    name: str
    tenant_key: str


class Message(TypedDict, total=False):
    message_id: str
    root_id: str
    parent_id: str
    thread_id: str
    create_time: str
    chat_id: str
    chat_type: str
    message_type: str
    content: str
    mentions: list[Mention]


class Event(TypedDict, total=False):
    sender: Sender
    message: Message


class Header(TypedDict, total=False):
    event_id: str
    event_type: str
    create_time: str
    token: str
    app_id: str
    tenant_key: str


class Callback(TypedDict, total=False):
    schema: str
    type: str
    challenge: str
    token: str
    encrypt: str
    header: Header
    event: Event


def parse(body: bytes) -> Callback:
    """The callback object, or :class:`InvalidInput` for a body that is not one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput("the body is not JSON") from exc
    if not isinstance(data, dict):
        raise InvalidInput("the body is not a JSON object")
    return cast(Callback, data)


def normalize(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    try:
        callback = parse(envelope.body)
    except InvalidInput as exc:
        raise NormalizationError(exc.reason) from exc
    header = callback.get("header")
    if not isinstance(header, dict) or header.get("event_type") != MESSAGE_EVENT:
        return ()  # not a message event (or a schema 1.0 callback): nothing to ticket
    event = callback.get("event")
    if not isinstance(event, dict):
        raise NormalizationError("im.message.receive_v1 without an event")
    sender, message = event.get("sender"), event.get("message")
    if not isinstance(sender, dict) or not isinstance(message, dict):
        raise NormalizationError("im.message.receive_v1 without sender or message")
    if sender.get("sender_type") != "user":
        return ()  # an app's message (our own replies included): never a ticket
    message_id = message.get("message_id")
    chat_id = message.get("chat_id")
    if not isinstance(message_id, str) or not isinstance(chat_id, str) or not (
        _usable(message_id) and _usable(chat_id)
    ):
        raise NormalizationError("a message without a usable message_id or chat_id")
    chat_type = message.get("chat_type")
    mentions = [m for m in message.get("mentions") or [] if isinstance(m, dict)]
    bot = envelope.meta.get("bot_open_id")
    addressed = not (isinstance(bot, str) and bot) or any(_open_id(m.get("id")) == bot for m in mentions)
    if chat_type != "p2p" and not addressed:
        return ()  # a group message that does not address the bot
    app_id = header.get("app_id") or ""
    tenant_key = sender.get("tenant_key") or header.get("tenant_key") or ""
    identities = _identities(sender.get("sender_id"), str(app_id), str(tenant_key))
    if not identities:
        raise NormalizationError("a message whose sender has no id")
    message_type = str(message.get("message_type") or "")
    try:
        content = orjson.loads(message.get("content") or "{}")
    except orjson.JSONDecodeError as exc:
        raise NormalizationError("message.content is not JSON") from exc
    if not isinstance(content, dict):
        raise NormalizationError("message.content is not a JSON object")
    names = {m["key"]: m.get("name") or "" for m in mentions if isinstance(m.get("key"), str)}
    text, media, detail = _content(message_type, content, message_id, names)
    extra: dict[str, Any] = {
        "app_id": app_id, "tenant_key": tenant_key, "event_id": header.get("event_id"),
        "message_id": message_id, "chat_id": chat_id, "chat_type": chat_type, "message_type": message_type,
        **{k: message[k] for k in ("root_id", "parent_id", "thread_id") if message.get(k)},
        **detail,
    }
    if envelope.meta.get("host"):
        extra["host"] = envelope.meta["host"]
    if mentions:
        extra["mentions"] = [{"name": m.get("name"), "open_id": _open_id(m.get("id"))} for m in mentions]
    thread = message.get("thread_id") or message.get("root_id")
    thread_ref = None
    if chat_type != "p2p":
        thread_ref = f"{chat_id}:{thread or message_id}"
    elif thread:
        thread_ref = f"{chat_id}:{thread}"
    return (CanonicalMessage(
        channel=CHANNEL,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=message_id,
        received_at=envelope.received_at,
        sent_at=_millis(message.get("create_time")),
        identities=identities,
        text=text,
        media=media,
        thread_ref=thread_ref,
        extra=extra,
    ),)


def _identities(ids: object, app_id: str, tenant_key: str) -> tuple[Identity, ...]:
    if not isinstance(ids, dict):
        return ()
    found: list[Identity] = []
    open_id, union_id, user_id = ids.get("open_id"), ids.get("union_id"), ids.get("user_id")
    if _usable(open_id) and app_id:
        found.append(Identity(kind=IdentityKind.FEISHU_OPEN_ID, value=f"{app_id}:{open_id}", verified=True))
    if _usable(union_id):
        found.append(Identity(kind=IdentityKind.FEISHU_UNION_ID, value=str(union_id), verified=True))
    if _usable(user_id) and tenant_key:
        found.append(Identity(kind=IdentityKind.FEISHU_USER_ID, value=f"{tenant_key}:{user_id}",
                              verified=True))
    return tuple(found)


def _content(
    kind: str, content: dict[str, Any], message_id: str, names: Mapping[str, str]
) -> tuple[str | None, tuple[MediaRef, ...], dict[str, Any]]:
    """The text, media and extra details of one message's ``content``."""
    detail: dict[str, Any] = {}
    if kind == "text":
        return _mentions(str(content.get("text") or ""), names) or None, (), detail
    if kind == "post":
        return _post(content, message_id, names)
    if kind in MEDIA_TYPES:
        key = content.get("image_key") if kind == "image" else content.get("file_key")
        if not _usable(key):
            return None, (), {"unfetchable": True}
        name = content.get("file_name") if isinstance(content.get("file_name"), str) else None
        if isinstance(content.get("duration"), int):
            detail["duration_ms"] = content["duration"]
        if kind == "media" and _usable(content.get("image_key")):
            detail["cover_image_key"] = content["image_key"]
        ref = MediaRef(kind=MEDIA_TYPES[kind], ref=f"{message_id}:{key}", name=name,
                       content_type="image/png" if kind == "image" else None)
        return None, (ref,), detail
    if kind == "interactive":
        return _card(content) or "[card]", (), detail
    if kind == "merge_forward":
        detail["merge_forward"] = True  # the forwarded messages: GET /im/v1/messages/{message_id}
        return "[merged and forwarded messages]", (), detail
    if kind == "share_chat":
        detail["shared_chat_id"] = content.get("chat_id")
        return "[shared a group]", (), detail
    if kind == "share_user":
        detail["shared_user_id"] = content.get("user_id")
        return "[shared a contact]", (), detail
    if kind == "location":
        detail["location"] = {k: content.get(k) for k in ("name", "latitude", "longitude")}
        return str(content.get("name") or "[location]"), (), detail
    return f"[{kind or 'unknown'} message]", (), detail


def _post(
    content: dict[str, Any], message_id: str, names: Mapping[str, str]
) -> tuple[str | None, tuple[MediaRef, ...], dict[str, Any]]:
    body = content
    if "content" not in body:  # a post with locales ({"zh_cn": {...}}): take the first
        body = next((v for v in content.values() if isinstance(v, dict) and "content" in v), {})
    lines: list[str] = []
    title = body.get("title")
    if isinstance(title, str) and title:
        lines.append(title)
    media: list[MediaRef] = []
    for paragraph in body.get("content") or []:
        if not isinstance(paragraph, list):
            continue
        parts: list[str] = []
        for node in paragraph:
            if not isinstance(node, dict):
                continue
            tag = node.get("tag")
            if tag in ("text", "md", "code_block"):
                parts.append(_mentions(str(node.get("text") or ""), names))
            elif tag == "a":
                label, href = str(node.get("text") or ""), str(node.get("href") or "")
                parts.append(f"{label} ({href})" if label and href and label != href else label or href)
            elif tag == "at":
                parts.append("@" + str(node.get("user_name") or node.get("user_id") or ""))
            elif tag == "emotion":
                parts.append(f":{node.get('emoji_type')}:")
            elif tag == "img" and _usable(node.get("image_key")):
                media.append(MediaRef(kind="image", ref=f"{message_id}:{node['image_key']}",
                                      content_type="image/png"))
            elif tag == "media" and _usable(node.get("file_key")):
                media.append(MediaRef(kind="video", ref=f"{message_id}:{node['file_key']}"))
        if parts:
            lines.append("".join(parts))
    return "\n".join(lines) or None, tuple(media), {}


def _card(content: dict[str, Any]) -> str:
    """The readable words of an interactive card (its title and text elements)."""
    words: list[str] = []

    def walk(node: object, depth: int) -> None:
        if depth > 12 or len(words) > 200:
            return
        if isinstance(node, dict):
            for key in ("title", "content", "text"):
                value = node.get(key)
                if isinstance(value, str) and value.strip():
                    words.append(value.strip())
            for key, value in node.items():
                if key not in ("title", "content", "text") or not isinstance(value, str):
                    walk(value, depth + 1)
        elif isinstance(node, list):
            for item in node:
                walk(item, depth + 1)

    walk(content, 0)
    return "\n".join(dict.fromkeys(words))


def _mentions(text: str, names: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: f"@{names[m.group(0)]}" if names.get(m.group(0)) else m.group(0), text)


def _open_id(ids: object) -> str | None:
    return ids.get("open_id") if isinstance(ids, dict) and isinstance(ids.get("open_id"), str) else None


def _usable(value: object) -> bool:
    return isinstance(value, str) and bool(_ID.match(value))


def _millis(value: object) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(str(value)) / 1000, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


normalize_feishu = normalize
