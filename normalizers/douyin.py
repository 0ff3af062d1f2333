"""Douyin Open Platform (抖音开放平台) webhook events -> canonical messages (pure).

One envelope holds one webhook body exactly as Douyin sent it: ``{"event", "client_key",
"from_user_id", "to_user_id", "content", "log_id"}`` (https://developer.open-douyin.com/docs/
resource/zh-CN/dop/develop/webhooks/summarize). ``content`` is an object for the IM events and a
JSON string for some others; both are read.

What a customer does to the brand account becomes a message:

- ``im_receive_msg`` (接收私信: the account received a private message): text, emoji, image,
  user_local_image, video, user_local_video, retain_consult_card and other; Douyin gives no URL
  for images and shared videos ("需到抖音端内 APP 内查看"), so they are kept as references in
  ``extra``, not fetched;
- ``im_enter_direct_msg`` (the user opened the account's private-message page) as an event;
- ``item_comment_reply`` (a comment on one of the account's videos) as a message whose way back
  is the comment-reply API.

``im_send_msg`` (the account's own messages, ours included), recalls and every other event are
understood and yield nothing. Idempotency: a private message by its ``server_message_id``; a
comment by its ``comment_id``; the enter event by Douyin's ``Msg-Id`` header (kept by the
connector in ``meta["msg_id"]``; "同一实体下同一action的msg_id相同"), since Douyin promises neither
order nor uniqueness. Identity: the sender's ``open_id`` (per app: ``{client_key}:{open_id}``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from core.errors import InvalidInput
from core.model import CanonicalMessage, Identity, IdentityKind, RawEnvelope

CHANNEL = "douyin"
MAX_DEPTH = 16
TICKET_EVENTS = frozenset({"im_receive_msg", "im_enter_direct_msg", "item_comment_reply"})
VERIFY_EVENT = "verify_webhook"


def parse_body(body: bytes) -> dict[str, Any]:
    """A verified webhook body as an object, nested at most ``MAX_DEPTH`` deep."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise InvalidInput("the webhook body is not a JSON object")
    _check_depth(value, 0)
    return value


def _check_depth(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidInput("JSON nested too deeply")
    if isinstance(value, dict):
        for item in value.values():
            _check_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_depth(item, depth + 1)


def content_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The event's ``content``: an object, or a JSON string holding one."""
    content = body.get("content")
    if isinstance(content, str) and content.strip():
        try:
            content = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise InvalidInput("content is neither an object nor a JSON object string") from None
        _check_depth(content, 1)
    return content if isinstance(content, dict) else {}


def _str(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return str(int(value))
    return value.strip() or None if isinstance(value, str) else None


def _at(millis: Any) -> datetime | None:
    """``create_time``: 13-digit milliseconds in the IM events, seconds in some others."""
    if isinstance(millis, bool) or not isinstance(millis, int | float | str):
        return None
    try:
        value = float(millis)
    except ValueError:
        return None
    if value > 1e11:
        value /= 1000
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def normalize(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    """Normalize one verified webhook body; events that are not a customer's doing yield nothing."""
    body = parse_body(envelope.body)
    event = body.get("event")
    if not isinstance(event, str) or event not in TICKET_EVENTS:
        return []
    content = content_of(body)
    client_key = str(envelope.meta.get("client_key") or body.get("client_key") or "")
    msg_id = envelope.meta.get("msg_id")
    extra: dict[str, Any] = {
        "event": event,
        "account": envelope.meta.get("account"),
        "client_key": client_key,
        "log_id": _str(body.get("log_id")),
        "msg_id": msg_id,
    }
    if event == "item_comment_reply":
        return [_comment(envelope, body, content, client_key, extra)]
    sender = _str(body.get("from_user_id"))
    if sender is None:
        raise InvalidInput(f"{event} without from_user_id")
    extra.update(
        from_user_id=sender,
        to_user_id=_str(body.get("to_user_id")),
        conversation_short_id=_str(content.get("conversation_short_id")),
        conversation_type=content.get("conversation_type"),
        user=_user(content, sender),
    )
    if event == "im_enter_direct_msg":
        # No message id: Douyin's Msg-Id names the event on every retry.
        basis = msg_id or f"{sender}:{content.get('create_time') or body.get('log_id')}"
        return [_message(envelope, client_key, sender, kind="event", text=None, extra=extra,
                         external_id=None, dedupe_key=f"enter:{basis}",
                         sent_at=_at(content.get("create_time")))]
    message_type = _str(content.get("message_type")) or "other"
    server_id = _str(content.get("server_message_id"))
    extra.update(server_message_id=server_id, message_type=message_type, source=_str(content.get("source")))
    text = _text_of(message_type, content, extra)
    return [_message(
        envelope, client_key, sender, kind="message", text=text, extra=extra,
        external_id=server_id, dedupe_key=None if server_id else f"im:{msg_id or body.get('log_id')}",
        sent_at=_at(content.get("create_time")),
    )]


def _text_of(message_type: str, content: Mapping[str, Any], extra: dict[str, Any]) -> str | None:
    text = content.get("text")
    if message_type in ("text", "emoji"):
        return text if isinstance(text, str) and text else None
    # Images and shared videos come without a URL Douyin lets us fetch: kept as references.
    for name in ("resource_url", "resource_type", "item_id", "resource_width", "resource_height",
                 "card_id", "card_status", "card_data"):
        if name in content:
            extra[name] = content[name]
    extra["unfetched_media"] = message_type in ("image", "user_local_image", "video", "user_local_video")
    return text if isinstance(text, str) and text else None


def _user(content: Mapping[str, Any], open_id: str) -> dict[str, Any] | None:
    infos = content.get("user_infos")
    if isinstance(infos, list):
        for info in infos:
            if isinstance(info, dict) and info.get("open_id") == open_id:
                return {"nick_name": _str(info.get("nick_name")), "avatar": _str(info.get("avatar"))}
    return None


def _comment(
    envelope: RawEnvelope, body: Mapping[str, Any], content: Mapping[str, Any], client_key: str,
    extra: dict[str, Any],
) -> CanonicalMessage:
    comment_id = _str(content.get("comment_id"))
    author = _str(content.get("comment_user_id")) or _str(body.get("from_user_id"))
    if comment_id is None or author is None:
        raise InvalidInput("item_comment_reply without comment_id or comment_user_id")
    text = content.get("content")
    extra.update(
        source="comment",
        from_user_id=author,
        to_user_id=_str(body.get("to_user_id")),
        comment_id=comment_id,
        item_id=_str(content.get("reply_to_item_id")) or _str(content.get("item_id")),
        reply_to_comment_id=_str(content.get("reply_to_comment_id")),
        user={"nick_name": _str(content.get("nick_name")), "avatar": _str(content.get("avatar"))},
    )
    text = text if isinstance(text, str) else None
    return _message(envelope, client_key, author, kind="message", text=text,
                    extra=extra, external_id=f"comment:{comment_id}", dedupe_key=None,
                    sent_at=_at(content.get("create_time")))


def _message(
    envelope: RawEnvelope, client_key: str, open_id: str, *, kind: str, text: str | None,
    extra: dict[str, Any], external_id: str | None, dedupe_key: str | None, sent_at: datetime | None,
) -> CanonicalMessage:
    user = extra.get("user")
    name = user.get("nick_name") if isinstance(user, dict) else None
    return CanonicalMessage(
        channel=envelope.channel,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=external_id,
        received_at=envelope.received_at,
        sent_at=sent_at,
        kind=kind,
        identities=(Identity(kind=IdentityKind.DOUYIN_OPEN_ID, value=f"{client_key}:{open_id}",
                             verified=envelope.signature_verified),),
        display_name=name if isinstance(name, str) else None,
        text=text,
        extra=extra,
        dedupe_key=dedupe_key,
    )


normalize_douyin = normalize
