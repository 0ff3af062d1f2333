"""The X API calls the channel makes: a DM (v2 ``dm_conversations``) and a DM media download.

Both are signed with the account's OAuth 1.0a credentials. Errors carry the HTTP status, X's own
words (a v2 problem's ``title``/``detail``, or v1.1 ``errors[].message``) and, for a 429, the
pause X asked for (``retry-after``, else ``x-rate-limit-reset``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from connectors.x.oauth import OAuth1
from core.channel import HttpClient
from core.http import parse_retry_after


class XApiError(Exception):
    """X answered an error (``status`` 0: unreachable, or no answer in time)."""

    def __init__(self, call: str, status: int, detail: str, *, retry_after: float | None = None,
                 timed_out: bool = False) -> None:
        self.call = call
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        self.timed_out = timed_out
        super().__init__(f"{call}: {status} {detail}")

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status == 429 or self.status >= 500


@dataclass(frozen=True, slots=True, kw_only=True)
class Downloaded:
    data: bytes = field(repr=False)
    content_type: str | None


class XApi:
    """X's API for the accounts of one channel, over the channel's HTTP client."""

    def __init__(self, http: HttpClient, *, timeout: float) -> None:
        self._http = http
        self._timeout = timeout

    async def send_dm(self, auth: OAuth1, participant_id: str, text: str) -> dict[str, Any]:
        """``POST /2/dm_conversations/with/{participant_id}/messages``; X's ``data``
        (``dm_conversation_id``, ``dm_event_id``)."""
        url = self._http.url(f"2/dm_conversations/with/{participant_id}/messages")
        limit = aiohttp.ClientTimeout(total=self._timeout)
        headers = {"Authorization": auth.header("POST", url), "Content-Type": "application/json"}
        try:
            async with self._http.session.post(
                url, data=orjson.dumps({"text": text}), headers=headers, timeout=limit
            ) as response:
                body = await response.read()
                if response.status not in (200, 201):
                    raise _error("send_dm", response, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise XApiError("send_dm", 0, f"unreachable ({type(exc).__name__})",
                            timed_out=isinstance(exc, TimeoutError)) from None
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise XApiError("send_dm", 502, "the answer is not JSON") from None
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, dict):
            raise XApiError("send_dm", 502, "the answer has no data")
        return data

    async def download(self, auth: OAuth1 | None, url: str, *, max_bytes: int) -> Downloaded:
        """GET a DM media URL (signed when ``auth`` is given), refusing more than ``max_bytes``."""
        limit = aiohttp.ClientTimeout(total=self._timeout)
        headers = {"Authorization": auth.header("GET", url)} if auth is not None else {}
        try:
            async with self._http.session.get(url, headers=headers, timeout=limit) as response:
                if response.status != 200:
                    raise _error("download", response, await response.read())
                if response.content_length is not None and response.content_length > max_bytes:
                    raise XApiError("download", 413, f"{response.content_length} bytes is too large")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > max_bytes:
                        raise XApiError("download", 413, f"more than {max_bytes} bytes")
                    chunks.append(chunk)
                return Downloaded(data=b"".join(chunks), content_type=response.headers.get("Content-Type"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise XApiError("download", 0, f"unreachable ({type(exc).__name__})",
                            timed_out=isinstance(exc, TimeoutError)) from None


def _error(call: str, response: aiohttp.ClientResponse, body: bytes) -> XApiError:
    detail = response.reason or "error"
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if isinstance(answer, dict):
        errors = answer.get("errors")
        if isinstance(answer.get("detail"), str) or isinstance(answer.get("title"), str):
            detail = "; ".join(str(answer[k]) for k in ("title", "detail") if isinstance(answer.get(k), str))
        elif isinstance(errors, list) and errors:
            detail = "; ".join(
                f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors if isinstance(e, dict)
            )
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if retry_after is None and response.status == 429:
        reset = response.headers.get("x-rate-limit-reset")
        if reset is not None and reset.strip().isdigit():
            retry_after = max(0.0, int(reset) - time.time())
    return XApiError(call, response.status, detail, retry_after=retry_after)
