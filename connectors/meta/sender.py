"""Replies through the Graph API: WhatsApp's Cloud API and the Send API of Messenger and Instagram.

WhatsApp: ``POST /{phone-number-id}/messages`` from the number that received the customer's last
message (``answering.phone_number_id``). Text, and media uploaded first (``POST /{id}/media``). In
the 24 hours after the customer's last message anything may be sent; after that only an approved
template (``options.template``: ``{"name", "language", "components"}``): the gateway fails other
replies with ``window_closed`` without calling, and WhatsApp's own 131047 says the same.

Messenger and Instagram: ``POST /{page-or-account-id}/messages``, ``messaging_type = RESPONSE`` inside
the 24-hour standard messaging window; after it only with a message tag (``options.tag``, e.g.
``HUMAN_AGENT``, 7 days, which the page must be approved for), sent as ``MESSAGE_TAG``. Messenger
attachments go as multipart uploads; Instagram's Send API takes attachments by public URL only, so
an Instagram reply with attachments is ``unsupported``.

Neither API takes an idempotency key: a crash between Meta's acceptance and our commit can send a
reply twice (``SenderSpec.idempotent`` is false). A reply with attachments is several calls; the
provider message id reported is the last one's (the text's, when there is text).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from connectors.meta.graph import GraphApi, GraphError
from core.channel import Blobs, Clock, OutboundAttachment, OutboundReply, SendError, SenderSpec, Sent
from core.model import IdentityKind

logger = logging.getLogger(__name__)

DAY = 86400.0
# Message tags that Meta lets a page use outside the standard messaging window.
MESSAGE_TAGS = frozenset({"HUMAN_AGENT", "CONFIRMED_EVENT_UPDATE", "POST_PURCHASE_UPDATE", "ACCOUNT_UPDATE"})
TEXT_LIMIT = {"whatsapp": 4096, "messenger": 2000, "instagram": 1000}


def _kind(content_type: str) -> str:
    major = content_type.split("/", 1)[0]
    return major if major in ("image", "video", "audio") else "document"


def _has_template(reply: OutboundReply) -> bool:
    return isinstance(reply.options.get("template"), Mapping)


def _has_tag(reply: OutboundReply) -> bool:
    return str(reply.options.get("tag") or "") in MESSAGE_TAGS


class WhatsAppSender:
    """One WhatsApp reply: a template, or text and media, from the number the customer wrote to."""

    def __init__(
        self,
        apis: Mapping[str, GraphApi],
        numbers: Mapping[str, str | None],
        blobs: Blobs | None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self._apis = dict(apis)
        self._numbers = dict(numbers)  # inbox -> configured phone_number_id (None: the app's others)
        self._blobs = blobs
        self._clock = clock

    async def send(self, reply: OutboundReply) -> Sent:
        api = self._apis.get(reply.inbox)
        if api is None:
            raise SendError("unsupported", f"inbox {reply.inbox!r} has no WhatsApp number", permanent=True)
        number = reply.answering.get("phone_number_id") or self._numbers.get(reply.inbox)
        if not isinstance(number, str) or not number:
            raise SendError(
                "unsupported",
                "no phone_number_id to send from (no message from the customer yet)",
                permanent=True,
            )
        to = _wa_id(reply)
        base: dict[str, Any] = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": to}
        if reply.answering_external_id and reply.options.get("quote") is True:
            base["context"] = {"message_id": reply.answering_external_id}
        path = f"{number}/messages"
        ids: list[str] = []
        try:
            template = reply.options.get("template")
            if isinstance(template, Mapping):
                ids.append(
                    await _sent_id(
                        api.send(path, {**base, "type": "template", "template": _template(template)})
                    )
                )
                return Sent(provider_message_id=ids[-1], detail={"type": "template"})
            caption_used = False
            for index, attachment in enumerate(reply.attachments):
                data = await self._read(attachment)
                media_id = await api.upload(
                    number, data, content_type=attachment.content_type, name=attachment.name
                )
                kind = _kind(attachment.content_type)
                media: dict[str, Any] = {"id": media_id}
                if kind == "document":
                    media["filename"] = attachment.name
                if index == 0 and reply.text and kind != "audio" and len(reply.text) <= 1024:
                    media["caption"] = reply.text
                    caption_used = True
                ids.append(await _sent_id(api.send(path, {**base, "type": kind, kind: media})))
            if reply.text and not caption_used:
                text = reply.text[: TEXT_LIMIT["whatsapp"]]
                ids.append(
                    await _sent_id(
                        api.send(path, {**base, "type": "text", "text": {"body": text, "preview_url": False}})
                    )
                )
        except GraphError as exc:
            raise exc.send_error() from exc
        if not ids:
            raise SendError(
                "unsupported", "nothing to send (no text, attachment or template)", permanent=True
            )
        return Sent(provider_message_id=ids[-1], detail={"messages": ids} if len(ids) > 1 else {})

    async def _read(self, attachment: OutboundAttachment) -> bytes:
        data = await self._blobs.read(attachment.sha256) if self._blobs is not None else None
        if data is None:
            raise SendError(
                "unsupported", f"attachment {attachment.name!r} is not in the blob store", permanent=True
            )
        return data


class SendApiSender:
    """One Messenger or Instagram reply through the Send API."""

    def __init__(
        self, channel: str, apis: Mapping[str, GraphApi], pages: Mapping[str, str | None], blobs: Blobs | None
    ) -> None:
        self._channel = channel
        self._apis = dict(apis)
        self._pages = dict(pages)
        self._blobs = blobs

    async def send(self, reply: OutboundReply) -> Sent:
        api = self._apis.get(reply.inbox)
        if api is None:
            raise SendError(
                "unsupported", f"inbox {reply.inbox!r} has no {self._channel} page", permanent=True
            )
        page = (
            reply.answering.get("page_id")
            or reply.answering.get("account_id")
            or self._pages.get(reply.inbox)
            or "me"
        )
        if self._channel == "instagram" and reply.attachments:
            raise SendError(
                "unsupported", "Instagram's Send API takes attachments by public URL only", permanent=True
            )
        tag = str(reply.options.get("tag") or "")
        envelope: dict[str, Any] = {"recipient": {"id": reply.recipient.value}}
        if tag in MESSAGE_TAGS:
            envelope.update(messaging_type="MESSAGE_TAG", tag=tag)
        else:
            envelope["messaging_type"] = "RESPONSE"
        path = f"{page}/messages"
        ids: list[str] = []
        try:
            for attachment in reply.attachments:
                ids.append(await _sent_id(self._attachment(api, path, envelope, attachment)))
            if reply.text:
                text = reply.text[: TEXT_LIMIT[self._channel]]
                ids.append(await _sent_id(api.send(path, {**envelope, "message": {"text": text}})))
        except GraphError as exc:
            raise exc.send_error() from exc
        if not ids:
            raise SendError("unsupported", "nothing to send (no text or attachment)", permanent=True)
        return Sent(provider_message_id=ids[-1], detail={"messages": ids} if len(ids) > 1 else {})

    async def _attachment(
        self, api: GraphApi, path: str, envelope: dict[str, Any], attachment: OutboundAttachment
    ) -> dict[str, Any]:
        data = await self._blobs.read(attachment.sha256) if self._blobs is not None else None
        if data is None:
            raise SendError(
                "unsupported", f"attachment {attachment.name!r} is not in the blob store", permanent=True
            )
        kind = _kind(attachment.content_type)
        message = {
            "attachment": {"type": "file" if kind == "document" else kind, "payload": {"is_reusable": False}}
        }
        form = aiohttp.FormData()
        for key, value in envelope.items():
            form.add_field(key, orjson.dumps(value).decode() if isinstance(value, dict) else str(value))
        form.add_field("message", orjson.dumps(message).decode())
        form.add_field("filedata", data, filename=attachment.name, content_type=attachment.content_type)
        return await api.call("send", "POST", path, data=form)


async def _sent_id(call: Any) -> str:
    answer = await call
    messages = answer.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        message_id = messages[0].get("id")  # WhatsApp: {"messages": [{"id": "wamid..."}]}
    else:
        message_id = answer.get("message_id")  # Send API: {"recipient_id", "message_id"}
    if not isinstance(message_id, str) or not message_id:
        raise GraphError("send", 502, None, None, "the answer names no message id")
    return message_id


def _wa_id(reply: OutboundReply) -> str:
    recipient = reply.recipient
    if recipient.kind == IdentityKind.PHONE:
        return recipient.value.lstrip("+")
    wa_id = reply.answering.get("wa_id")
    if recipient.kind == IdentityKind.WHATSAPP and recipient.value.isdigit():
        return recipient.value
    if isinstance(wa_id, str) and wa_id:
        return wa_id
    return recipient.value


def _template(template: Mapping[str, Any]) -> dict[str, Any]:
    name = template.get("name")
    if not isinstance(name, str) or not name:
        raise SendError("rejected", "options.template needs a name", permanent=True)
    language = template.get("language") or "en_US"
    built: dict[str, Any] = {
        "name": name,
        "language": language if isinstance(language, Mapping) else {"code": str(language)},
    }
    if template.get("components"):
        built["components"] = template["components"]
    return built


def whatsapp_spec(sender: WhatsAppSender) -> SenderSpec:
    """24-hour customer-service window; outside it, approved templates only."""
    return SenderSpec(sender=sender, window=DAY, outside_window=_has_template, rate=20.0, burst=20)


def send_api_spec(sender: SendApiSender) -> SenderSpec:
    """24-hour standard messaging window; outside it, a message tag (Meta enforces the tag's own window)."""
    return SenderSpec(sender=sender, window=DAY, outside_window=_has_tag, rate=10.0, burst=10)
