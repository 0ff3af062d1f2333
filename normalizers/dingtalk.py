"""DingTalk (钉钉) robot messages -> canonical messages (pure).

One envelope holds one robot message callback as DingTalk sent it: the body of an HTTP callback
(``meta.transport = "http"``), or the ``data`` of one Stream mode ``CALLBACK`` frame on the topic
``/v1.0/im/bot/messages/get`` (``"stream"``): the same JSON either way.

What becomes a message: a message to the robot in a single chat (``conversationType = "1"``), and
in a group when the robot was @mentioned (``isInAtList``; DingTalk delivers group messages to a
robot only then). Types: ``text``, ``richText`` (its text and pictures), ``picture``, ``file``,
``audio`` (DingTalk's ``recognition`` as the text), ``video``, and the rest as a short
description. Pictures, files, audio and video are media refs ``{robotCode}:{downloadCode}``, fetched
after the commit through the robot file download API.

Idempotency: ``msgId``, so a Stream redelivery and the same message over HTTP make one ticket.

Identity: ``dingtalk_staff_id`` ``{senderCorpId}:{senderStaffId}`` (the organisation's employee id,
present for the organisation's own members) and ``dingtalk_sender_id`` ``{corp}:{senderId}``,
both verified (the callback was signed, or came over our authenticated stream). The employee's work
email is linked by the connector after the commit, from the organisation's directory.

``extra`` keeps what the way back needs: ``conversation_id``, ``conversation_type``,
``robot_code``, ``session_webhook`` and its expiry ``session_webhook_expires`` (milliseconds; the
sender posts to it only under the configured ``oapi_base``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypedDict, cast

import orjson

from core.errors import InvalidInput, NormalizationError
from core.model import CanonicalMessage, Identity, IdentityKind, MediaRef, RawEnvelope

CHANNEL = "dingtalk"
TOPIC = "/v1.0/im/bot/messages/get"
MEDIA_KINDS = {"picture": "image", "file": "file", "audio": "voice", "video": "video"}
_CODE = re.compile(r"^[A-Za-z0-9_\-+/=$:.#]{1,4096}$")


class Robot(TypedDict, total=False):
    msgId: str
    msgtype: str
    conversationId: str
    conversationType: str
    conversationTitle: str
    chatbotCorpId: str
    chatbotUserId: str
    robotCode: str
    senderId: str
    senderNick: str
    senderCorpId: str
    senderStaffId: str
    isInAtList: bool
    createAt: int
    sessionWebhook: str
    sessionWebhookExpiredTime: int
    text: dict[str, Any]
    content: Any


def parse(body: bytes) -> Robot:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput("the body is not JSON") from exc
    if not isinstance(data, dict):
        raise InvalidInput("the body is not a JSON object")
    return cast(Robot, data)


def normalize(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    try:
        robot = parse(envelope.body)
    except InvalidInput as exc:
        raise NormalizationError(exc.reason) from exc
    msg_id = robot.get("msgId")
    if not isinstance(msg_id, str) or not msg_id or len(msg_id) > 256:
        raise NormalizationError("a robot message without a msgId")
    group = robot.get("conversationType") == "2"
    if group and robot.get("isInAtList") is False:
        return ()  # a group message that does not address the robot
    corp = robot.get("senderCorpId") or robot.get("chatbotCorpId") or ""
    identities: list[Identity] = []
    staff, sender = robot.get("senderStaffId"), robot.get("senderId")
    if isinstance(staff, str) and staff and corp:
        identities.append(
            Identity(kind=IdentityKind.DINGTALK_STAFF_ID, value=f"{corp}:{staff}", verified=True)
        )
    if isinstance(sender, str) and sender and corp:
        identities.append(
            Identity(kind=IdentityKind.DINGTALK_SENDER_ID, value=f"{corp}:{sender}", verified=True)
        )
    if not identities:
        raise NormalizationError("a robot message whose sender has no id")
    robot_code = str(robot.get("robotCode") or "")
    kind = str(robot.get("msgtype") or "")
    text, media, detail = _content(kind, robot, robot_code)
    extra: dict[str, Any] = {
        "message_id": msg_id,
        "msgtype": kind,
        "conversation_id": robot.get("conversationId"),
        "conversation_type": "group" if group else "single",
        "robot_code": robot_code,
        "corp_id": corp,
        **detail,
    }
    if group and robot.get("conversationTitle"):
        extra["conversation_title"] = robot.get("conversationTitle")
    if isinstance(staff, str) and staff:
        extra["staff_id"] = staff
    webhook, expires = robot.get("sessionWebhook"), robot.get("sessionWebhookExpiredTime")
    if isinstance(webhook, str) and webhook.startswith(("https://", "http://")) and isinstance(expires, int):
        extra["session_webhook"] = webhook
        extra["session_webhook_expires"] = expires
    nick = robot.get("senderNick")
    return (
        CanonicalMessage(
            channel=CHANNEL,
            tenant=envelope.tenant,
            inbox=envelope.inbox,
            external_id=msg_id,
            received_at=envelope.received_at,
            sent_at=_millis(robot.get("createAt")),
            identities=tuple(identities),
            display_name=nick if isinstance(nick, str) and nick else None,
            text=text,
            media=media,
            extra=extra,
        ),
    )


def _content(
    kind: str, robot: Robot, robot_code: str
) -> tuple[str | None, tuple[MediaRef, ...], dict[str, Any]]:
    content = robot.get("content")
    body: dict[str, Any] = content if isinstance(content, dict) else {}
    if kind == "text":
        text = robot.get("text")
        value = text.get("content") if isinstance(text, dict) else None
        return (value.strip() or None) if isinstance(value, str) else None, (), {}
    if kind == "richText":
        lines: list[str] = []
        media: list[MediaRef] = []
        for part in body.get("richText") or []:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                lines.append(part["text"])
            code = part.get("downloadCode")
            if part.get("type") == "picture" and _usable(code):
                media.append(MediaRef(kind="image", ref=f"{robot_code}:{code}"))
        return "\n".join(lines).strip() or None, tuple(media), {}
    if kind in MEDIA_KINDS:
        code = body.get("downloadCode")
        detail: dict[str, Any] = {}
        if isinstance(body.get("duration"), int):
            detail["duration_ms"] = body["duration"]
        text = (
            body.get("recognition") if kind == "audio" and isinstance(body.get("recognition"), str) else None
        )
        if not _usable(code) or not robot_code:
            return text, (), {**detail, "unfetchable": True}
        name = body.get("fileName") if isinstance(body.get("fileName"), str) else None
        return text, (MediaRef(kind=MEDIA_KINDS[kind], ref=f"{robot_code}:{code}", name=name),), detail
    return f"[{kind or 'unknown'} message]", (), {}


def _usable(value: object) -> bool:
    return isinstance(value, str) and bool(_CODE.match(value))


def _millis(value: object) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(str(value)) / 1000, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


normalize_dingtalk = normalize
