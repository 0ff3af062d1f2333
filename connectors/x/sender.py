"""Replies on X: a direct message from the inbox's account to the customer.

One ``POST /2/dm_conversations/with/{user}/messages`` per reply, signed with the account's OAuth
1.0a credentials. X has no idempotency key for DMs, so the sender is not idempotent (a crash
between X's acceptance and our commit can send a reply twice). Text only, up to 10,000 characters.
X's 429 is ``rate_limited`` with its retry-after or rate-limit reset; 401 ``auth``; 403 (the
customer does not accept DMs from the account, or blocked it) and 404 ``recipient_unreachable``;
other 4xx ``rejected``; 5xx, timeouts and an unreachable X are retried.
"""

from __future__ import annotations

from collections.abc import Mapping

from connectors.x.api import XApi, XApiError
from connectors.x.oauth import OAuth1
from core.channel import OutboundReply, SendError, Sent

MAX_TEXT = 10_000


class XSender:
    def __init__(self, api: XApi, auths: Mapping[str, OAuth1]) -> None:
        self._api = api
        self._auths = dict(auths)  # inbox -> the account's credentials

    async def send(self, reply: OutboundReply) -> Sent:
        auth = self._auths.get(reply.inbox)
        if auth is None:
            raise SendError("auth", f"inbox {reply.inbox!r} has no X account credentials", permanent=True)
        if reply.attachments:
            raise SendError("unsupported", "X replies carry text only here; attachments were not sent",
                            permanent=True)
        if not reply.text:
            raise SendError("unsupported", "the reply has no text", permanent=True)
        if len(reply.text) > MAX_TEXT:
            raise SendError("too_large", f"{len(reply.text)} characters; a DM takes {MAX_TEXT}",
                            permanent=True)
        to = reply.answering.get("to")
        participant = to if isinstance(to, str) and to.isdigit() else reply.recipient.value
        try:
            data = await self._api.send_dm(auth, participant, reply.text)
        except XApiError as exc:
            raise _send_error(exc) from exc
        event_id = data.get("dm_event_id")
        return Sent(
            provider_message_id=str(event_id) if event_id is not None else "unknown",
            detail={"dm_conversation_id": data.get("dm_conversation_id")},
        )


def _send_error(exc: XApiError) -> SendError:
    detail = f"{exc.status} {exc.detail}"
    if exc.status == 0:
        return SendError("timeout" if exc.timed_out else "provider_error", detail, permanent=False)
    if exc.status == 429:
        wait = exc.retry_after if exc.retry_after is not None else 60.0
        return SendError("rate_limited", detail, permanent=False, retry_after=wait)
    if exc.status >= 500:
        return SendError("provider_error", detail, permanent=False, retry_after=exc.retry_after)
    if exc.status == 401:
        return SendError("auth", detail, permanent=True)
    if exc.status in (403, 404):
        return SendError("recipient_unreachable", detail, permanent=True)
    if exc.status == 413:
        return SendError("too_large", detail, permanent=True)
    return SendError("rejected", detail, permanent=True)
