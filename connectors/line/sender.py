"""Replies on LINE: the event's reply token while it lasts, else a push message.

A reply token is free (it does not count in the monthly message quota) but single-use and valid
for about a minute, and LINE has no idempotency key for it; so it is used only on the first attempt
of a reply, within ``reply_token_ttl`` of the customer's event, and not for a redelivered event.
A refused token (used already, expired) falls back to push at once. A push carries
``X-Line-Retry-Key`` derived from ``reply_id``: LINE drops a repeat (409 with the accepted request's
id), so a retried push never reaches the customer twice.

Text only, in up to five text messages of 5,000 characters (LINE's limits for one request).
Attachments need public HTTPS URLs LINE fetches itself: refused as ``unsupported``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from connectors.line.api import LineApi, LineApiError, SendResult
from core.channel import OutboundReply, SendError, Sent

logger = logging.getLogger(__name__)

MAX_TEXT = 5000
MAX_MESSAGES = 5
# Namespace for retry keys derived from reply ids that are not UUIDs themselves.
RETRY_NAMESPACE = uuid.UUID("8a6f0f55-1f57-4d38-9a1e-5b7c0d2e4f61")


def retry_key(reply_id: str) -> str:
    """``X-Line-Retry-Key`` must be a UUID: ``reply_id`` when it is one, else one derived from it
    (the same on every attempt)."""
    try:
        return str(uuid.UUID(reply_id))
    except ValueError:
        return str(uuid.uuid5(RETRY_NAMESPACE, reply_id))


def text_messages(text: str) -> list[dict[str, Any]]:
    """``text`` as LINE text messages; ``too_large`` past five of them."""
    chunks = [text[i:i + MAX_TEXT] for i in range(0, len(text), MAX_TEXT)] or [""]
    if len(chunks) > MAX_MESSAGES:
        raise SendError(
            "too_large", f"{len(text)} characters; LINE takes {MAX_TEXT * MAX_MESSAGES} in one reply",
            permanent=True,
        )
    return [{"type": "text", "text": chunk} for chunk in chunks]


class LineSender:
    """One provider call per reply (two when a refused reply token falls back to push)."""

    def __init__(
        self, apis: Mapping[str, LineApi], *, reply_with_token: Mapping[str, bool], token_ttl: float,
        now: Callable[[], datetime],
    ) -> None:
        self._apis = dict(apis)
        self._reply_with_token = dict(reply_with_token)
        self._ttl = token_ttl
        self._now = now

    async def send(self, reply: OutboundReply) -> Sent:
        api = self._apis.get(reply.inbox)
        if api is None:
            raise SendError("auth", f"inbox {reply.inbox!r} has no channel access token", permanent=True)
        if reply.attachments:
            raise SendError("unsupported", "LINE replies carry text only here; attachments were not sent",
                            permanent=True)
        if not reply.text:
            raise SendError("unsupported", "the reply has no text", permanent=True)
        messages = text_messages(reply.text)
        answering = reply.answering
        token = self._usable_token(reply)
        if token is not None:
            try:
                return _sent(await api.reply(token, messages), via="reply", fallback=None)
            except LineApiError as exc:
                if exc.status != 400:
                    raise _send_error(exc) from exc
                # Used already or expired: the push below reaches the customer all the same.
                logger.info("line %s: reply token refused (%s); pushing instead", reply.inbox, exc.message)
        to = answering.get("to") if isinstance(answering.get("to"), str) else reply.recipient.value
        key = retry_key(reply.reply_id)
        try:
            result = await api.push(str(to), messages, retry_key=key)
        except LineApiError as exc:
            if exc.status == 409 and exc.accepted_request_id:
                # An earlier attempt was accepted (our commit of it was lost): nothing is sent twice.
                return Sent(provider_message_id=exc.accepted_request_id,
                            detail={"via": "push", "already_accepted": True, "retry_key": key})
            raise _send_error(exc) from exc
        return _sent(result, via="push", fallback=key)

    def _usable_token(self, reply: OutboundReply) -> str | None:
        answering = reply.answering
        token, timestamp = answering.get("reply_token"), answering.get("timestamp")
        if not self._reply_with_token.get(reply.inbox, False) or reply.attempt != 1:
            return None
        if not isinstance(token, str) or not token or answering.get("redelivery") is True:
            return None
        if not isinstance(timestamp, int) or isinstance(timestamp, bool):
            return None
        age = self._now().timestamp() - timestamp / 1000
        return token if 0 <= age < self._ttl else None


def _sent(result: SendResult, *, via: str, fallback: str | None) -> Sent:
    ids = [str(m["id"]) for m in result.sent_messages if m.get("id") is not None]
    provider_id = ids[0] if ids else result.request_id or fallback or "unknown"
    return Sent(provider_message_id=provider_id,
                detail={"via": via, "request_id": result.request_id, "sent_message_ids": ids})


def _send_error(exc: LineApiError) -> SendError:
    """LINE's answer as a reply outcome: permanent unless waiting can change it."""
    detail = exc.describe()
    if exc.status == 0:
        return SendError("timeout" if exc.timed_out else "provider_error", detail, permanent=False)
    if exc.status == 429:
        # Per-second limits clear at once; the monthly quota ("You have reached your monthly
        # limit") only next month, so it is not hammered.
        monthly = "monthly limit" in exc.message.lower()
        wait = exc.retry_after if exc.retry_after is not None else (3600.0 if monthly else 1.0)
        return SendError("rate_limited", detail, permanent=False, retry_after=wait)
    if exc.status >= 500:
        return SendError("provider_error", detail, permanent=False, retry_after=exc.retry_after)
    if exc.status == 401:
        return SendError("auth", detail, permanent=True)
    if exc.status == 404:
        return SendError("recipient_unreachable", detail, permanent=True)
    if exc.status == 413:
        return SendError("too_large", detail, permanent=True)
    return SendError("rejected", detail, permanent=True)
