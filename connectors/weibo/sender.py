"""Replies on Weibo: the fan-service reply API, ``POST /2/messages/reply.json`` (form-encoded:
``access_token``, ``type=text``, ``data`` = the URL-encoded JSON ``{"text": ...}``,
``receiver_id``, ``save_sender_box``; https://open.weibo.com/wiki/C/2/messages/reply).

Weibo allows replies for 48 hours after a fan's message or event, and to a mention only once in
that time ("For user mentioning event, developers can reply only one time within 48 hours"). The
48 hours are the gateway's window (``SenderSpec.window``); the one reply to a mention is recorded in
the channel's state after Weibo accepts it, and a second is ``window_closed`` without a call.
Errors come as ``{"error", "error_code", "request"}`` with an HTTP 4xx/5xx; Weibo's common codes
are mapped (token expired or invalid, missing permission, rate limits, busy, unknown user).
Weibo has no idempotency key. Text only, at most ``MAX_TEXT`` characters (``too_large`` past it;
a conservative bound of ours, not a documented platform limit).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from connectors.weibo.account import Account
from core.channel import ChannelState, HttpClient, OutboundReply, ReplyFailure, SendError, Sent
from normalizers.html import to_text
from normalizers.weibo import reply_quota_key

logger = logging.getLogger(__name__)

REPLY_PATH = "/2/messages/reply.json"
MAX_TEXT = 300
# Weibo's error codes (https://open.weibo.com/wiki/Error_code): code -> (reason, permanent, retry_after).
ERRORS: Mapping[int, tuple[ReplyFailure, bool, float | None]] = {
    10001: ("provider_error", False, 5.0),  # system error
    10009: ("provider_error", False, 5.0),  # too many pending tasks, system is busy
    10014: ("auth", True, None),  # insufficient app permissions
    10022: ("rate_limited", False, 3600.0),  # IP requests out of rate limit (hourly)
    10023: ("rate_limited", False, 3600.0),  # user requests out of rate limit
    10024: ("rate_limited", False, 3600.0),  # user requests for this API out of rate limit
    20003: ("recipient_unreachable", True, None),  # user does not exist
    21301: ("auth", True, None),  # auth failed
    21314: ("auth", True, None),  # token used
    21315: ("auth", True, None),  # token expired
    21316: ("auth", True, None),  # token revoked
    21317: ("auth", True, None),  # token rejected
    21327: ("auth", True, None),  # expired token
    21332: ("auth", True, None),  # invalid access token
}


class WeiboSender:
    """One provider call per reply."""

    def __init__(self, accounts: Mapping[str, Account], http: HttpClient, state: ChannelState) -> None:
        self._accounts = dict(accounts)
        self._http = http
        self._state = state

    async def send(self, reply: OutboundReply) -> Sent:
        account = self._account(reply)
        if reply.attachments:
            raise SendError("unsupported", "Weibo replies carry text only here", permanent=True)
        text = reply.text or (to_text(reply.html) if reply.html else "")
        if not text.strip():
            raise SendError("rejected", "the reply has no text", permanent=True)
        if len(text) > MAX_TEXT:
            raise SendError("too_large", f"{len(text)} characters; Weibo takes {MAX_TEXT}", permanent=True)
        receiver = reply.answering.get("sender_id") or reply.recipient.value
        if not isinstance(receiver, str) or not receiver.isdigit():
            raise SendError("recipient_unreachable", "no Weibo uid for this fan", permanent=True)
        quota = reply_quota_key(reply.answering)
        if quota is not None and await self._state.get(quota) is not None:
            raise SendError("window_closed", "a mention may be answered once (already answered)",
                            permanent=True)
        form = {
            "access_token": account.access_token or "",
            "type": "text",
            "data": orjson.dumps({"text": text}).decode(),
            "receiver_id": receiver,
            "save_sender_box": "1",
        }
        answer = await self._post(account, form)
        if quota is not None:
            await self._state.put(quota, reply.reply_id.encode())
        provider_id = answer.get("idstr") or answer.get("id") or reply.reply_id
        return Sent(provider_message_id=str(provider_id), detail={"account": account.name})

    def _account(self, reply: OutboundReply) -> Account:
        named = reply.answering.get("account")
        account = self._accounts.get(named) if isinstance(named, str) else None
        if account is None or account.inbox != reply.inbox:
            account = next((a for a in self._accounts.values() if a.inbox == reply.inbox), None)
        if account is None:
            raise SendError("auth", f"no Weibo account with an access token for inbox {reply.inbox!r}",
                            permanent=True)
        return account

    async def _post(self, account: Account, form: Mapping[str, str]) -> dict[str, Any]:
        try:
            async with self._http.session.post(self._http.url(REPLY_PATH), data=dict(form)) as resp:
                raw, status = await resp.read(), resp.status
        except TimeoutError:
            raise SendError("timeout", "messages/reply: no answer", permanent=False) from None
        except aiohttp.ClientError as exc:
            detail = f"messages/reply: {type(exc).__name__}"
            raise SendError("provider_error", detail, permanent=False) from None
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            if status >= 500 or status == 200:
                raise SendError("provider_error", f"messages/reply: HTTP {status}, not JSON", permanent=False)
            raise SendError("rejected", f"messages/reply: HTTP {status}", permanent=True)
        code = answer.get("error_code")
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            words = str(answer.get("error") or "")
            logger.warning("weibo %s: reply refused: %d %s", account.name, code, words)
            default: tuple[ReplyFailure, bool, float | None] = (
                ("provider_error", False, None) if status >= 500 else ("rejected", True, None)
            )
            reason, permanent, wait = ERRORS.get(code, default)
            raise SendError(reason, f"error_code {code}: {words}", permanent=permanent, retry_after=wait)
        if status >= 500:
            raise SendError("provider_error", f"messages/reply: HTTP {status}", permanent=False)
        if status >= 400:
            raise SendError("rejected", f"messages/reply: HTTP {status}", permanent=True)
        return answer
