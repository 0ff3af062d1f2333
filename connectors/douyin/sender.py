"""Replies on Douyin: the private-message API for private messages, the comment-reply API for
comments, with the brand account's ``access-token``.

* Private message: ``POST /im/send/msg/?open_id={account}`` with the conversation and the message
  being answered, both kept by the normalizer (``conversation_short_id``, ``server_message_id``),
  and the customer's open_id (https://developer.open-douyin.com/docs/resource/zh-CN/dop/develop/
  openapi/search-management/private-message/send-msg; scope ``im.direct_message``). Text only.
  Within ``reply_window`` of the customer's last message (``SenderSpec.window``).
* Comment: ``POST /item/comment/reply/?open_id={account}`` with the video and the comment
  (scope ``item.comment``); no window, so :meth:`DouyinSender.outside_window` lets it go.

Douyin answers HTTP 200 with an error code: ``data.error_code`` (older APIs, with
``data.description``) or ``err_no`` / ``err_msg``. Codes of the platform's common table are mapped
(token invalid or expired, scope not granted, busy, parameters, banned user); an unknown one is a
provider error the gateway retries. Douyin has no idempotency key for sends: ``idempotent`` stays
false. Every send is one attempt; the gateway retries.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from connectors.douyin.account import App
from core.channel import HttpClient, OutboundReply, ReplyFailure, SendError, Sent
from core.http import parse_retry_after
from normalizers.html import to_text

logger = logging.getLogger(__name__)

# Our bound on one reply's characters (refused past it, not cut): a conservative choice, not a
# documented platform limit.
MAX_TEXT = 500
# Douyin's common error codes (状态码排查 / OpenAPI 通用错误码): code -> (reason, permanent,
# retry_after). Only codes whose meaning the platform's table states; any other code is a provider
# error the gateway retries and then gives up on.
ERRORS: Mapping[int, tuple[ReplyFailure, bool, float | None]] = {
    2190002: ("auth", True, None),  # access_token invalid
    2190008: ("auth", True, None),  # access_token expired: the account must authorize again
    2190015: ("auth", True, None),  # access_token and open_id do not match
    2190004: ("auth", True, None),  # the app has not been granted this capability (scope)
    2100004: ("provider_error", False, 5.0),  # system busy
    2100005: ("rejected", True, None),  # invalid parameter
    2100009: ("blocked", True, None),  # the user is banned from this operation
}


class DouyinSender:
    """One provider call per reply."""

    def __init__(self, apps: Mapping[str, App], http: HttpClient) -> None:
        self._apps = dict(apps)
        self._http = http

    @staticmethod
    def outside_window(reply: OutboundReply) -> bool:
        """A comment reply has no window (only private messages do)."""
        return reply.answering.get("source") == "comment"

    async def send(self, reply: OutboundReply) -> Sent:
        app = self._app(reply)
        if reply.attachments:
            raise SendError("unsupported", "Douyin replies carry text only here", permanent=True)
        text = reply.text or (to_text(reply.html) if reply.html else "")
        if not text.strip():
            raise SendError("rejected", "the reply has no text", permanent=True)
        if len(text) > MAX_TEXT:
            raise SendError("too_large", f"{len(text)} characters; Douyin takes {MAX_TEXT}", permanent=True)
        answering = reply.answering
        brand = answering.get("to_user_id")
        if isinstance(brand, str) and brand and app.account_open_id and brand != app.account_open_id:
            # One app may be authorized by several accounts; only the configured one can answer
            # (another account's conversation would be refused as 2190015 anyway).
            raise SendError("unsupported", f"the customer wrote to Douyin account {brand}, not to "
                            f"{app.account_open_id} whose token is configured", permanent=True)
        body: dict[str, Any]
        if answering.get("source") == "comment":
            path, body = "/item/comment/reply/", {
                "item_id": _need(answering, "item_id"), "comment_id": _need(answering, "comment_id"),
                "content": text,
            }
        else:
            to = answering.get("from_user_id") or _open_id(reply.recipient.value)
            path, body = "/im/send/msg/", {
                "msg_id": _need(answering, "server_message_id"),
                "conversation_id": _need(answering, "conversation_short_id"),
                "to_user_id": to,
                "content": {"msg_type": 1, "text": {"text": text}},
            }
        answer = await self._post(app, path, body)
        data = answer.get("data")
        data = data if isinstance(data, dict) else {}
        provider_id = data.get("msg_id") or data.get("comment_id") or reply.reply_id
        return Sent(provider_message_id=str(provider_id), detail={"app": app.name, "api": path})

    def _app(self, reply: OutboundReply) -> App:
        named = reply.answering.get("account")
        app = self._apps.get(named) if isinstance(named, str) else None
        if app is None or app.inbox != reply.inbox:
            app = next((a for a in self._apps.values() if a.inbox == reply.inbox), None)
        if app is None:
            raise SendError("auth", f"no Douyin app with an access token for inbox {reply.inbox!r}",
                            permanent=True)
        return app

    async def _post(self, app: App, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        headers = {"access-token": app.access_token or "", "Content-Type": "application/json"}
        try:
            async with self._http.session.post(
                self._http.url(path), params={"open_id": app.account_open_id or ""},
                data=orjson.dumps(body), headers=headers,
            ) as resp:
                raw, status = await resp.read(), resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            raise SendError("timeout", f"POST {path}: no answer", permanent=False) from None
        except aiohttp.ClientError as exc:
            raise SendError("provider_error", f"POST {path}: {type(exc).__name__}", permanent=False) from None
        if status == 429:
            raise SendError("rate_limited", f"POST {path}: HTTP 429", permanent=False,
                            retry_after=retry_after or 60.0)
        if status >= 500:
            raise SendError("provider_error", f"POST {path}: HTTP {status}", permanent=False,
                            retry_after=retry_after)
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise SendError("provider_error", f"POST {path}: HTTP {status}, not JSON",
                            permanent=False) from None
        if not isinstance(answer, dict):
            raise SendError("provider_error", f"POST {path}: not a JSON object", permanent=False)
        code, words = _error(answer)
        if code:
            reason, permanent, wait = ERRORS.get(code, ("provider_error", False, None))
            logger.warning("douyin %s: %s refused: %d %s", app.name, path, code, words)
            raise SendError(reason, f"error_code {code}: {words}", permanent=permanent, retry_after=wait)
        if status >= 400:
            raise SendError("rejected", f"POST {path}: HTTP {status}", permanent=True)
        return answer


def _error(answer: Mapping[str, Any]) -> tuple[int, str]:
    """The error code and words of an answer in either of Douyin's two shapes."""
    for holder, code_key, words_key in (("data", "error_code", "description"), ("extra", "error_code",
                                        "description"), (None, "err_no", "err_msg")):
        scope = answer.get(holder) if holder else answer
        if isinstance(scope, dict):
            code = scope.get(code_key)
            if isinstance(code, int) and not isinstance(code, bool) and code != 0:
                return code, str(scope.get(words_key) or "")
    return 0, ""


def _need(answering: Mapping[str, Any], key: str) -> str:
    value = answering.get(key)
    if not isinstance(value, str) or not value:
        raise SendError("recipient_unreachable", f"the customer's last message has no {key}", permanent=True)
    return value


def _open_id(value: str) -> str:
    return value.split(":", 1)[1] if ":" in value else value
