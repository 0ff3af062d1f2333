"""Replies to Feishu / Lark: one message per reply, with the app's tenant_access_token.

The way back comes from the employee's latest message (``OutboundReply.answering``): a group message
is answered with ``POST /open-apis/im/v1/messages/{message_id}/reply`` (in its Feishu thread when
``reply_in_thread``), a private chat with ``POST /open-apis/im/v1/messages?receive_id_type=chat_id``
into the chat; without a message to answer, to the employee's ``open_id``. The reply's ``reply_id``
is Feishu's ``uuid`` (Feishu sends one message per uuid within an hour), so a retry after a lost
answer sends nothing twice (``idempotent``). Attachments are uploaded (``/im/v1/images`` for images up
to 10 MB, ``/im/v1/files`` for the rest, at most 30 MB) and sent as one message each after the text,
each with its own uuid derived from the reply id.

Errors for the dispatcher: 429 and the frequency-limit codes are ``rate_limited`` (after the pause
Feishu asks for); a refused token is ``auth`` (retried: the secret can be fixed); a bot no longer in
the chat, a chat or message that is gone is ``recipient_unreachable``; content Feishu refuses is
``rejected``; 5xx and an unreachable API are retried.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from connectors.feishu.api import CREDENTIALS_REFUSED, RATE_LIMITED, TOKEN_INVALID, FeishuApi, FeishuError
from connectors.feishu.app import App
from core.channel import Blobs, OutboundReply, SendError, SenderSpec, Sent
from core.model import IdentityKind
from normalizers.html import to_text

# The bot is not in the chat, the chat or user is gone or out of the app's range, the message was
# withdrawn or deleted.
UNREACHABLE = frozenset({230001, 230002, 230006, 230013, 230017, 230011, 230034, 230035, 230099, 232009})
TOO_LARGE = frozenset({230025, 230028})  # content past Feishu's size limit
MAX_TEXT = 30_000
MAX_IMAGE = 10 * 1024 * 1024  # larger images go as files
MAX_FILE = 30 * 1024 * 1024


class FeishuSender:
    def __init__(
        self, apis: Mapping[str, FeishuApi], apps: Mapping[str, App], blobs: Blobs | None = None
    ) -> None:
        self._apis = apis
        self._apps = apps
        self._blobs = blobs

    @classmethod
    def spec(
        cls,
        apis: Mapping[str, FeishuApi],
        apps: Mapping[str, App],
        *,
        rate: float,
        blobs: Blobs | None = None,
    ) -> SenderSpec:
        return SenderSpec(sender=cls(apis, apps, blobs), rate=rate, burst=max(1, int(rate)), idempotent=True)

    async def send(self, reply: OutboundReply) -> Sent:
        api, app = self._apis.get(reply.inbox), self._apps.get(reply.inbox)
        if api is None or app is None:
            raise SendError(
                "unsupported", f"inbox {reply.inbox!r} has no Feishu app credentials", permanent=True
            )
        text = reply.text or (to_text(reply.html) if reply.html else None)
        if (not text or not text.strip()) and not reply.attachments:
            raise SendError("rejected", "the reply has no text", permanent=True)
        if text and len(text) > MAX_TEXT:
            raise SendError("too_large", f"Feishu takes at most {MAX_TEXT} characters", permanent=True)
        for attachment in reply.attachments:
            if attachment.size > MAX_FILE:
                raise SendError("too_large", f"{attachment.name!r} is over Feishu's 30 MB", permanent=True)
        # One message per part (the text, then each attachment), each with its own uuid derived from
        # the reply id: a retry after a partial send repeats none of the parts Feishu took.
        parts: list[tuple[str, dict[str, Any]]] = []
        if text and text.strip():
            parts.append(("text", {"text": text}))
        sent_ids: list[str] = []
        last: dict[str, Any] = {}
        try:
            for attachment in reply.attachments:
                data = await self._blobs.read(attachment.sha256) if self._blobs is not None else None
                if data is None:
                    raise SendError(
                        "rejected", f"attachment {attachment.name!r} is not in the blob store", permanent=True
                    )
                image = attachment.content_type.startswith("image/") and attachment.size <= MAX_IMAGE
                key = await api.upload(
                    "image" if image else "file", attachment.name, attachment.content_type, data
                )
                parts.append(("image", {"image_key": key}) if image else ("file", {"file_key": key}))
            for n, (msg_type, content) in enumerate(parts):
                uuid = reply.reply_id[:50] if n == 0 else f"{reply.reply_id[:44]}-{n}"
                last = await self._post(api, app, reply, msg_type, content, uuid)
                if isinstance(last.get("message_id"), str):
                    sent_ids.append(last["message_id"])
        except FeishuError as exc:
            raise _send_error(exc) from None
        if len(sent_ids) != len(parts):
            raise SendError("provider_error", "Feishu answered code 0 without a message_id", permanent=False)
        detail: dict[str, Any] = {"chat_id": last.get("chat_id"), "thread_id": last.get("thread_id")}
        if len(sent_ids) > 1:
            detail["message_ids"] = sent_ids
        return Sent(provider_message_id=sent_ids[0], detail=detail)

    async def _post(
        self,
        api: FeishuApi,
        app: App,
        reply: OutboundReply,
        msg_type: str,
        content: dict[str, Any],
        uuid: str,
    ) -> dict[str, Any]:
        answering = reply.answering
        message_id, chat_id = answering.get("message_id"), answering.get("chat_id")
        body: dict[str, Any] = {"msg_type": msg_type, "content": orjson.dumps(content).decode(), "uuid": uuid}
        if isinstance(message_id, str) and message_id and answering.get("chat_type") != "p2p":
            body["reply_in_thread"] = app.reply_in_thread
            data = await api.call("POST", f"/open-apis/im/v1/messages/{message_id}/reply", json=body)
        else:
            receive_type, receive_id = "chat_id", chat_id
            if not isinstance(receive_id, str) or not receive_id:
                receive_type, receive_id = "open_id", _open_id(reply, app)
            body["receive_id"] = receive_id
            data = await api.call(
                "POST", "/open-apis/im/v1/messages", json=body, params={"receive_id_type": receive_type}
            )
        answer = data.get("data")
        return answer if isinstance(answer, dict) else {}


def _open_id(reply: OutboundReply, app: App) -> str:
    recipient = reply.recipient
    prefix = f"{app.app_id}:"
    if recipient.kind == IdentityKind.FEISHU_OPEN_ID and recipient.value.startswith(prefix):
        return recipient.value[len(prefix) :]
    raise SendError("recipient_unreachable", "no Feishu chat or open_id of this app", permanent=True)


def _send_error(exc: FeishuError) -> SendError:
    detail = str(exc)
    if exc.status == 429 or exc.code in RATE_LIMITED:
        return SendError("rate_limited", detail, permanent=False, retry_after=exc.retry_after or 1.0)
    if exc.code in TOKEN_INVALID or exc.code in CREDENTIALS_REFUSED:
        return SendError("auth", detail, permanent=False)
    if exc.code in UNREACHABLE:
        return SendError("recipient_unreachable", detail, permanent=True)
    if exc.code in TOO_LARGE:
        return SendError("too_large", detail, permanent=True)
    if exc.transient:
        return SendError(
            "provider_error" if exc.code != -1 else "timeout",
            detail,
            permanent=False,
            retry_after=exc.retry_after,
        )
    if 400 <= exc.status < 500 or exc.code > 0:
        return SendError("rejected", detail, permanent=True)
    return SendError("provider_error", detail, permanent=False)
