"""The way back of the API channel: a reply is POSTed to the inbox's callback URL, signed.

An app or call-center system that sends its customers' messages through ``POST /api/v1/messages``
gets the desk's replies at the ``callback_url`` of its inbox. The body is JSON (the reply, its
attachments inline as base64); the header ``Ticketgate-Signature: t=<unix time>,v1=<hex>`` carries
an HMAC-SHA256 of ``"<t>.<body>"`` under each of the inbox's callback secrets (one ``v1`` per secret,
so a secret is rotated by listing the new one first, moving the receiver to it, then dropping the
old one), the way Stripe signs its webhooks. The receiver checks one ``v1`` in constant time and
refuses a ``t`` outside its tolerance (replays). ``docs/channels/api.md`` documents it, with
verification code.

The app's answer decides the outcome: 2xx is sent (its ``id`` or ``message_id`` when it returns
one, else our reply id); 408, 429 and 5xx, a timeout or no connection are retried (after
``Retry-After`` when given), and so are 401/403 (``auth``: the secret is being fixed); any
other answer ends the reply (404/410 ``recipient_unreachable``, 413 ``too_large``, the rest
``rejected``). Redirects are not followed.
The app should drop a repeated ``reply_id`` (also sent as ``Idempotency-Key``): a crash between its
2xx and our commit sends the reply once more.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from core.channel import Blobs, Clock, HttpClient, OutboundReply, SendError, Sent
from core.model import IdentityKind

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "Ticketgate-Signature"
MAX_DETAIL = 300


def sign(secrets: Sequence[str], timestamp: int, body: bytes) -> str:
    """The ``Ticketgate-Signature`` value: ``t=<timestamp>`` and one ``v1=`` per secret."""
    signed = str(timestamp).encode() + b"." + body
    parts = [f"t={timestamp}"]
    parts += [f"v1={hmac.new(s.encode(), signed, hashlib.sha256).hexdigest()}" for s in secrets]
    return ",".join(parts)


def verify(header: str, body: bytes, secret: str, *, now: float, tolerance: float = 300.0) -> bool:
    """What a receiver does (and what our tests do): a ``v1`` matches ``secret`` and ``t`` is recent."""
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or abs(now - timestamp) > tolerance:
        return False
    expected = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


@dataclass(frozen=True, slots=True, kw_only=True)
class Callback:
    """One inbox's callback: where, and the secrets it is signed with (current first)."""

    url: str
    secrets: tuple[str, ...] = field(repr=False)


class CallbackSender:
    """POSTs replies to the callback URL of their inbox."""

    def __init__(
        self,
        callbacks: Mapping[str, Callback],
        http: HttpClient,
        *,
        blobs: Blobs,
        clock: Clock,
        timeout: float = 10.0,
    ) -> None:
        self.callbacks = dict(callbacks)
        self._http = http
        self._blobs = blobs
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def body(self, reply: OutboundReply) -> bytes:
        attachments = []
        for attachment in reply.attachments:
            data = await self._blobs.read(attachment.sha256)
            if data is None:
                raise SendError("rejected", f"attachment {attachment.name} is no longer in the blob store",
                                permanent=True)
            attachments.append({
                "name": attachment.name,
                "content_type": attachment.content_type,
                "size": attachment.size,
                "sha256": attachment.sha256,
                "data_base64": base64.b64encode(data).decode(),
            })
        recipient = reply.recipient
        prefix = f"{reply.inbox}:"
        external = (
            recipient.value[len(prefix):]
            if recipient.kind == IdentityKind.EXTERNAL and recipient.value.startswith(prefix)
            else None
        )
        payload: dict[str, Any] = {
            "type": "reply",
            "reply_id": reply.reply_id,
            "command_id": reply.command_id,
            "tenant": reply.tenant,
            "inbox": reply.inbox,
            "thread_id": reply.thread_id,
            "thread_number": reply.thread_number,
            "subject": reply.subject,
            "recipient": {"kind": recipient.kind, "value": recipient.value},
            "customer_external_id": external,
            "in_reply_to": reply.answering_external_id,
            "text": reply.text,
            "html": reply.html,
            "agent_name": reply.agent_name,
            "attachments": attachments,
            "attempt": reply.attempt,
            "created_at": datetime.fromtimestamp(self._clock.time(), UTC).isoformat().replace("+00:00", "Z"),
        }
        return orjson.dumps(payload)

    async def send(self, reply: OutboundReply) -> Sent:
        callback = self.callbacks.get(reply.inbox)
        if callback is None:
            raise SendError("unsupported", f"inbox {reply.inbox!r} has no callback_url", permanent=True)
        body = await self.body(reply)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "ticketgate-callback/1",
            "Idempotency-Key": reply.reply_id,
            SIGNATURE_HEADER: sign(callback.secrets, int(self._clock.time()), body),
        }
        try:
            async with self._http.session.post(
                callback.url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as resp:
                status = resp.status
                answer = await resp.content.read(64 * 1024)
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            raise SendError("timeout", "the callback did not answer in time", permanent=False) from None
        except aiohttp.ClientError as exc:
            raise SendError("provider_error", f"callback unreachable: {type(exc).__name__}",
                            permanent=False) from None
        if 200 <= status < 300:
            return Sent(provider_message_id=_their_id(answer) or reply.reply_id, detail={"status": status})
        detail = f"HTTP {status}: {answer[:MAX_DETAIL].decode('utf-8', 'replace')}"
        logger.warning("api %s: callback refused reply %s: HTTP %d", reply.inbox, reply.reply_id, status)
        if status == 429:
            raise SendError("rate_limited", detail, permanent=False, retry_after=retry_after)
        if status == 408:
            raise SendError("timeout", detail, permanent=False, retry_after=retry_after)
        if status >= 500:
            raise SendError("provider_error", detail, permanent=False, retry_after=retry_after)
        if status in (401, 403):
            # Retried: the app's secret (or its check) gets fixed, and the reply still goes.
            raise SendError("auth", detail, permanent=False, retry_after=retry_after or 300.0)
        if status in (404, 410):
            raise SendError("recipient_unreachable", detail, permanent=True)
        if status == 413:
            raise SendError("too_large", detail, permanent=True)
        raise SendError("rejected", detail, permanent=True)  # other 4xx, and redirects (not followed)


def _their_id(answer: bytes) -> str | None:
    try:
        value = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return None
    if isinstance(value, dict):
        for key in ("id", "message_id"):
            found = value.get(key)
            if isinstance(found, str | int) and not isinstance(found, bool) and str(found):
                return str(found)[:255]
    return None


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(min(int(value.strip()), 3600))
