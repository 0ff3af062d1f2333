"""Weibo fan service (微博粉丝服务平台) message pushes -> canonical messages (pure).

One envelope holds one push body exactly as Weibo sent it, in the JSON format
(https://open.weibo.com/wiki/消息推送服务): ``{"type", "receiver_id", "sender_id",
"created_at", "text", "data"}``. What a fan does becomes a message:

- private messages: ``text``, ``position`` (``data.longitude`` / ``latitude``), ``voice`` and
  ``image`` (``data.vfid`` / ``tovfid``: file ids of Weibo's message store, kept in ``extra``);
- ``mention`` (the account was @-mentioned in a post or a comment; ``data.subtype``);
- ``event`` (``data.subtype``: subscribe, unsubscribe, follow, unfollow, scan, scan_follow, click,
  view; ``data.key``, ``data.ticket``) as ``kind="event"``.

Weibo asks receivers to ignore types they do not know ("当出现未知类型时可忽略此消息"): they yield
nothing. A push carries no message id, so the idempotency key is built from what identifies it:
type, sender, receiver, ``created_at`` (to the second) and a digest of the text and data, all
unchanged on Weibo's retries. Identity: the sender's uid (``weibo``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from core.errors import InvalidInput
from core.model import CanonicalMessage, Identity, IdentityKind, RawEnvelope

CHANNEL = "weibo"
MAX_DEPTH = 16
MESSAGE_TYPES = frozenset({"text", "position", "voice", "image", "mention"})
EVENT_TYPE = "event"


def parse_body(body: bytes) -> dict[str, Any]:
    """A push body as an object, nested at most ``MAX_DEPTH`` deep."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise InvalidInput("the push is not a JSON object")
    _check_depth(value, 0)
    return value


def _check_depth(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidInput("JSON nested too deeply")
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        _check_depth(child, depth + 1)


def _uid(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return str(value)
    if isinstance(value, str) and value.strip().isdigit():
        return value.strip()
    return None


def created_at(value: Any) -> datetime | None:
    """Weibo's ``created_at``: ``Mon Jul 16 18:09:20 +0800 2012``."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value.strip(), "%a %b %d %H:%M:%S %z %Y").astimezone(UTC)
    except ValueError:
        return None


def normalize(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    """Normalize one verified push; types Weibo may add later yield nothing."""
    body = parse_body(envelope.body)
    kind = body.get("type")
    if not isinstance(kind, str) or (kind not in MESSAGE_TYPES and kind != EVENT_TYPE):
        return []
    sender, receiver = _uid(body.get("sender_id")), _uid(body.get("receiver_id"))
    if sender is None:
        raise InvalidInput(f"{kind} push without a sender_id")
    data = body.get("data")
    data = data if isinstance(data, dict) else {}
    raw_text = body.get("text")
    text = raw_text if isinstance(raw_text, str) and raw_text else None
    sent = created_at(body.get("created_at"))
    extra: dict[str, Any] = {
        "type": kind,
        "account": envelope.meta.get("account"),
        "sender_id": sender,
        "receiver_id": receiver,
        "created_at": body.get("created_at"),
        "data": data,
    }
    if kind == EVENT_TYPE:
        subtype = str(data.get("subtype") or "").lower()
        extra.update(event=subtype, event_key=data.get("key"), ticket=data.get("ticket"))
        text = None
    elif kind == "position":
        extra.update(longitude=_float(data.get("longitude")), latitude=_float(data.get("latitude")))
    elif kind in ("voice", "image"):
        # File ids of Weibo's message store (fetched with the fan-service token, not done here).
        extra.update(vfid=data.get("vfid"), tovfid=data.get("tovfid"))
    elif kind == "mention":
        extra.update(subtype=data.get("subtype"))
    digest = hashlib.sha256(orjson.dumps([text, data], option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]
    stamp = int(sent.timestamp()) if sent is not None else str(body.get("created_at"))
    return [CanonicalMessage(
        channel=envelope.channel,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=None,
        received_at=envelope.received_at,
        sent_at=sent,
        kind="event" if kind == EVENT_TYPE else "message",
        identities=(Identity(kind=IdentityKind.WEIBO, value=sender, verified=envelope.signature_verified),),
        text=text,
        extra=extra,
        # No id in a push: what identifies it, unchanged on Weibo's retries.
        dedupe_key=f"{kind}:{sender}:{receiver}:{stamp}:{digest}",
    )]


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value) if isinstance(value, int | float | str) else None
    except ValueError:
        return None


def reply_quota_key(answering: Mapping[str, Any]) -> str | None:
    """The state key under which a mention's one reply is recorded; ``None`` for other types."""
    if answering.get("type") != "mention":
        return None
    basis = orjson.dumps([answering.get("sender_id"), answering.get("created_at"), answering.get("data")],
                         option=orjson.OPT_SORT_KEYS)
    return "mention-replied:" + hashlib.sha256(basis).hexdigest()[:32]


normalize_weibo = normalize
