"""The few Messaging API calls the channel makes: message content, reply and push.

The channel access token travels in ``Authorization``; neither it nor aiohttp's errors (which may
quote headers) are logged. Errors carry the HTTP status, LINE's ``message`` and ``details``, the
request id and, for a 429 or 5xx, the pause LINE asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from core.channel import HttpClient
from core.http import parse_retry_after

RETRY_KEY_HEADER = "X-Line-Retry-Key"
REQUEST_ID_HEADER = "x-line-request-id"
ACCEPTED_REQUEST_ID_HEADER = "x-line-accepted-request-id"


class LineApiError(Exception):
    """LINE answered an error (``status`` 0: it could not be reached or did not answer in time)."""

    def __init__(
        self, call: str, status: int, message: str, *, details: Sequence[Any] = (),
        retry_after: float | None = None, request_id: str | None = None,
        accepted_request_id: str | None = None, timed_out: bool = False,
    ) -> None:
        self.call = call
        self.status = status
        self.message = message
        self.details = list(details)
        self.retry_after = retry_after
        self.request_id = request_id
        self.accepted_request_id = accepted_request_id
        self.timed_out = timed_out
        super().__init__(f"{call}: {status} {message}")

    @property
    def transient(self) -> bool:
        """Worth retrying: unreachable, rate-limited or a server error."""
        return self.status == 0 or self.status == 429 or self.status >= 500

    def describe(self) -> str:
        """LINE's own words: the message and the details' messages."""
        parts = [f"{self.status} {self.message}"]
        parts += [str(d.get("message")) for d in self.details if isinstance(d, dict) and d.get("message")]
        return "; ".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Content:
    data: bytes = field(repr=False)
    content_type: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SendResult:
    request_id: str | None
    sent_messages: list[dict[str, Any]]


class LineApi:
    """One channel's Messaging API (``api``) and content API (``data``), over the channel's clients."""

    def __init__(self, api: HttpClient, data: HttpClient, token: str, *, timeout: float) -> None:
        self._api = api
        self._data = data
        self._token = token
        self._timeout = timeout

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}", **(extra or {})}

    async def content(self, message_id: str, *, max_bytes: int) -> Content:
        """``GET /v2/bot/message/{id}/content``; 202 (video or audio still being prepared) is an
        error with status 202, to be retried."""
        url = self._data.url(f"v2/bot/message/{message_id}/content")
        limit = aiohttp.ClientTimeout(total=self._timeout)
        try:
            async with self._data.session.get(url, headers=self._headers(), timeout=limit) as response:
                if response.status != 200:
                    raise await _error("content", response)
                if response.content_length is not None and response.content_length > max_bytes:
                    size = response.content_length
                    raise LineApiError("content", 413, f"content of {size} bytes is too large")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > max_bytes:
                        raise LineApiError("content", 413, f"content exceeds {max_bytes} bytes")
                    chunks.append(chunk)
                return Content(data=b"".join(chunks), content_type=response.headers.get("Content-Type"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LineApiError(
                "content", 0, f"unreachable ({type(exc).__name__})", timed_out=isinstance(exc, TimeoutError)
            ) from None

    async def reply(self, reply_token: str, messages: Sequence[Mapping[str, Any]]) -> SendResult:
        return await self._send("reply", {"replyToken": reply_token, "messages": list(messages)}, {})

    async def push(self, to: str, messages: Sequence[Mapping[str, Any]], *, retry_key: str) -> SendResult:
        """Push ``messages`` to a user, group or room; LINE drops a repeated ``retry_key`` (409)."""
        return await self._send(
            "push", {"to": to, "messages": list(messages)}, {RETRY_KEY_HEADER: retry_key}
        )

    async def _send(self, call: str, payload: dict[str, Any], headers: Mapping[str, str]) -> SendResult:
        url = self._api.url(f"v2/bot/message/{call}")
        limit = aiohttp.ClientTimeout(total=self._timeout)
        try:
            async with self._api.session.post(
                url, data=orjson.dumps(payload), timeout=limit,
                headers=self._headers({"Content-Type": "application/json", **headers}),
            ) as response:
                if response.status != 200:
                    raise await _error(call, response)
                body = await response.read()
                request_id = response.headers.get(REQUEST_ID_HEADER)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LineApiError(
                call, 0, f"unreachable ({type(exc).__name__})", timed_out=isinstance(exc, TimeoutError)
            ) from None
        try:
            answer = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            answer = {}
        sent = answer.get("sentMessages") if isinstance(answer, dict) else None
        return SendResult(
            request_id=request_id,
            sent_messages=[m for m in sent if isinstance(m, dict)] if isinstance(sent, list) else [],
        )


async def _error(call: str, response: aiohttp.ClientResponse) -> LineApiError:
    body = await response.read()
    message, details = response.reason or "error", []
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if isinstance(answer, dict):
        message = str(answer.get("message") or message)
        found = answer.get("details")
        details = found if isinstance(found, list) else []
    return LineApiError(
        call, response.status, message, details=details,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        request_id=response.headers.get(REQUEST_ID_HEADER),
        accepted_request_id=response.headers.get(ACCEPTED_REQUEST_ID_HEADER),
    )
