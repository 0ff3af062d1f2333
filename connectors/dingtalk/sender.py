"""Replies to DingTalk: through the message's session webhook while it is valid, else the robot send API.

The way back comes from the employee's latest message (``OutboundReply.answering``): its
``session_webhook`` is used until a minute before ``session_webhook_expires`` (DingTalk gives it
about 90 minutes), and only when it lies under the configured ``oapi_base`` (the URL came in a
message; the gateway posts nowhere else). Past that, a single chat is answered with
``/v1.0/robot/oToMessages/batchSend`` to the employee's staff id and a group with
``/v1.0/robot/groupMessages/send`` to its ``openConversationId``, with the app's access token.

DingTalk takes no idempotency key, so a crash between its acceptance and our commit can send a reply
twice (``idempotent = False``). Errors: 429 and ``Throttling`` are ``rate_limited``; a refused token
``auth`` (retried); an unknown staff id or conversation ``recipient_unreachable``; 5xx and an
unreachable API are retried; other refusals are ``rejected``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from connectors.dingtalk.api import TOKEN_REFUSED, DingTalkApi, DingTalkError
from connectors.dingtalk.bot import Bot
from core.channel import Clock, OutboundReply, SendError, SenderSpec, Sent
from core.model import IdentityKind
from normalizers.html import to_text

WEBHOOK_MARGIN_MS = 60_000
UNREACHABLE = (
    "staffId.notExisted",
    "resource.not.found",
    "invalidParameter.userIds",
    "chatbot.notFound",
    "robot.not.in.group",
    "openConversationId",
)
MAX_TEXT = 20_000


class DingTalkSender:
    def __init__(
        self, apis: Mapping[str, DingTalkApi], bots: Mapping[str, Bot], *, oapi_base: str, clock: Clock
    ) -> None:
        self._apis = apis
        self._bots = bots
        self._oapi_base = oapi_base.rstrip("/") + "/"
        self._clock = clock

    @classmethod
    def spec(
        cls,
        apis: Mapping[str, DingTalkApi],
        bots: Mapping[str, Bot],
        *,
        oapi_base: str,
        clock: Clock,
        rate: float,
    ) -> SenderSpec:
        return SenderSpec(
            sender=cls(apis, bots, oapi_base=oapi_base, clock=clock),
            rate=rate,
            burst=max(1, int(rate * 5)),
            idempotent=False,
        )

    async def send(self, reply: OutboundReply) -> Sent:
        api, bot = self._apis.get(reply.inbox), self._bots.get(reply.inbox)
        if api is None or bot is None:
            raise SendError("unsupported", f"inbox {reply.inbox!r} has no DingTalk robot", permanent=True)
        if reply.attachments:
            raise SendError(
                "unsupported", "DingTalk replies with attachments are not supported yet", permanent=True
            )
        text = reply.text or (to_text(reply.html) if reply.html else None)
        if not text or not text.strip():
            raise SendError("rejected", "the reply has no text", permanent=True)
        if len(text) > MAX_TEXT:
            raise SendError("too_large", f"DingTalk takes at most {MAX_TEXT} characters", permanent=True)
        answering = reply.answering
        webhook, expires = answering.get("session_webhook"), answering.get("session_webhook_expires")
        now_ms = int(self._clock.time() * 1000)
        try:
            if (
                isinstance(webhook, str)
                and webhook.startswith(self._oapi_base)
                and isinstance(expires, int)
                and expires - WEBHOOK_MARGIN_MS > now_ms
            ):
                await api.request(
                    api.oapi, "POST", webhook, token=None, json={"msgtype": "text", "text": {"content": text}}
                )
                return Sent(
                    provider_message_id=f"session:{reply.reply_id}", detail={"via": "session_webhook"}
                )
            data = await self._robot_send(api, bot, reply, text)
        except DingTalkError as exc:
            raise _send_error(exc) from None
        key = data.get("processQueryKey")
        if not isinstance(key, str) or not key:
            raise SendError("provider_error", "DingTalk answered without a processQueryKey", permanent=False)
        return Sent(provider_message_id=key, detail={"via": "robot_api"})

    async def _robot_send(
        self, api: DingTalkApi, bot: Bot, reply: OutboundReply, text: str
    ) -> dict[str, Any]:
        answering = reply.answering
        param = orjson.dumps({"content": text}).decode()
        conversation = answering.get("conversation_id")
        if answering.get("conversation_type") == "group" and isinstance(conversation, str) and conversation:
            return await api.call(
                "POST",
                "/v1.0/robot/groupMessages/send",
                json={
                    "robotCode": bot.robot_code,
                    "openConversationId": conversation,
                    "msgKey": "sampleText",
                    "msgParam": param,
                },
            )
        staff = answering.get("staff_id")
        if not isinstance(staff, str) or not staff:
            recipient = reply.recipient
            if recipient.kind == IdentityKind.DINGTALK_STAFF_ID and ":" in recipient.value:
                staff = recipient.value.split(":", 1)[1]
        if not isinstance(staff, str) or not staff:
            raise SendError(
                "recipient_unreachable", "no DingTalk staff id or conversation to answer", permanent=True
            )
        return await api.call(
            "POST",
            "/v1.0/robot/oToMessages/batchSend",
            json={"robotCode": bot.robot_code, "userIds": [staff], "msgKey": "sampleText", "msgParam": param},
        )


def _send_error(exc: DingTalkError) -> SendError:
    detail = str(exc)
    if exc.status == 429 or exc.code in ("Throttling", "90018", "130101"):
        return SendError("rate_limited", detail, permanent=False, retry_after=exc.retry_after or 2.0)
    if exc.code in TOKEN_REFUSED or exc.status in (401, 403):
        return SendError("auth", detail, permanent=False)
    if any(part in exc.code for part in UNREACHABLE):
        return SendError("recipient_unreachable", detail, permanent=True)
    if exc.transient:
        return SendError(
            "timeout" if exc.status == 0 else "provider_error",
            detail,
            permanent=False,
            retry_after=exc.retry_after,
        )
    return SendError("rejected", detail, permanent=True)
