"""The Graph API calls the Meta channels make: media lookup and download, uploads, sends.

The base URL and version come from the channel's table (tests point them at a local server). The
access token travels in the ``Authorization`` header only, never in a URL, and is never logged;
errors carry Meta's own code, subcode and message (its ``error`` object).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict, cast

import aiohttp
import orjson

from core.channel import HttpClient, ReplyFailure, SendError
from core.http import parse_retry_after

# Graph API error codes that are throttling (app, account, pair and spam limits).
RATE_LIMITED = frozenset({4, 17, 32, 613, 80007, 130429, 131048, 131056})
AUTH = frozenset({10, 102, 190, 200, 131005, 131031})
# (code, subcode) of the messaging windows: WhatsApp's 24 h customer-service window (131047),
# Messenger's and Instagram's standard messaging window (10 / 2018278, 10 / 2534022).
WINDOW = frozenset({(131047, None), (10, 2018278), (10, 2534022)})
UNREACHABLE = frozenset({(131026, None), (551, None), (100, 2018001), (100, 2534014), (131030, None)})
BLOCKED = frozenset({(131050, None), (200, 2018108), (368, None)})


class ErrorObject(TypedDict, total=False):
    message: str
    type: str
    code: int
    error_subcode: int
    fbtrace_id: str
    error_data: dict[str, Any]


class GraphError(Exception):
    """Meta answered an error (``status`` 0: it could not be reached)."""

    def __init__(
        self,
        what: str,
        status: int,
        code: int | None,
        subcode: int | None,
        message: str,
        *,
        retry_after: float | None = None,
    ) -> None:
        self.what = what
        self.status = status
        self.code = code
        self.subcode = subcode
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"{what}: HTTP {status} code {code} subcode {subcode}: {message}")

    @property
    def transient(self) -> bool:
        """Worth retrying: unreachable, throttled, or Meta's own trouble."""
        return (
            self.status in (0, 429)
            or self.status >= 500
            or self.code in RATE_LIMITED
            or self.code in (1, 2, 131000, 1200)
            or bool(self.code is None and self.status >= 500)
        )

    def send_error(self) -> SendError:
        """This error as the reply seam's :class:`SendError` (reason, permanent or not)."""
        detail = f"{self.code}/{self.subcode}: {self.message}" if self.code is not None else self.message
        pair = (self.code, self.subcode)
        reason: ReplyFailure
        if pair in WINDOW or (self.code, None) in WINDOW:
            reason, permanent = "window_closed", True
        elif self.code in RATE_LIMITED or self.status == 429:
            reason, permanent = "rate_limited", False
        elif pair in UNREACHABLE or (self.code, None) in UNREACHABLE:
            reason, permanent = "recipient_unreachable", True
        elif pair in BLOCKED or (self.code, None) in BLOCKED:
            reason, permanent = "blocked", True
        elif self.status == 0:
            reason, permanent = "timeout", False
        elif self.code in AUTH or self.status == 401:
            reason, permanent = "auth", True
        elif self.code == 131051:
            reason, permanent = "unsupported", True
        elif self.transient:
            reason, permanent = "provider_error", False
        else:
            reason, permanent = "rejected", True
        retry_after = (
            self.retry_after if self.retry_after is not None else (60.0 if reason == "rate_limited" else None)
        )
        return SendError(reason, detail, permanent=permanent, retry_after=retry_after)


@dataclass(frozen=True, slots=True, kw_only=True)
class MediaInfo:
    url: str
    mime_type: str | None
    file_size: int | None
    sha256: str | None = None  # hex, as the Graph API gives it


class GraphApi:
    """One access token's view of the Graph API."""

    def __init__(self, http: HttpClient, version: str, token: str, *, timeout: float) -> None:
        self._http = http
        self._version = version
        self._token = token
        self._timeout = timeout

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    async def call(
        self,
        what: str,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: aiohttp.FormData | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """One Graph call; the JSON object of a 2xx answer, else :class:`GraphError`."""
        url = self._http.url(f"{self._version}/{path.lstrip('/')}")
        limit = aiohttp.ClientTimeout(total=self._timeout)
        try:
            async with self._http.session.request(
                method, url, json=json, data=data, params=params, headers=self._headers(), timeout=limit
            ) as response:
                body = await response.read()
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GraphError(what, 0, None, None, f"unreachable ({type(exc).__name__})") from None
        try:
            answer = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            answer = None
        if 200 <= status < 300 and isinstance(answer, dict):
            return answer
        found = answer.get("error") if isinstance(answer, dict) else None
        error = cast(ErrorObject, found if isinstance(found, dict) else {})
        code, subcode = error.get("code"), error.get("error_subcode")
        details = (
            (error.get("error_data") or {}).get("details")
            if isinstance(error.get("error_data"), dict)
            else None
        )
        raise GraphError(
            what,
            status if status >= 300 else 502,
            code if isinstance(code, int) else None,
            subcode if isinstance(subcode, int) else None,
            str(
                details
                or error.get("message")
                or (f"answer is not JSON (HTTP {status})" if answer is None else "no error message")
            ),
            retry_after=retry_after,
        )

    async def media_info(self, media_id: str) -> MediaInfo:
        """``GET /{media-id}``: the short-lived download URL of a WhatsApp media id."""
        answer = await self.call("media", "GET", media_id)
        url = answer.get("url")
        if not isinstance(url, str) or not url:
            raise GraphError("media", 502, None, None, "the answer names no url")
        size = answer.get("file_size")
        mime = answer.get("mime_type")
        digest = answer.get("sha256")
        return MediaInfo(
            url=url,
            mime_type=mime if isinstance(mime, str) else None,
            file_size=int(size) if isinstance(size, int | str) and str(size).isdigit() else None,
            sha256=digest.lower() if isinstance(digest, str) and len(digest) == 64 else None,
        )

    async def download(self, url: str, *, max_bytes: int, authorized: bool) -> tuple[bytes, str | None]:
        """The bytes at ``url`` (at most ``max_bytes``) and their content type. ``authorized``: send
        the token (WhatsApp's media URLs need it; the CDN URLs of Messenger attachments must not get it)."""
        limit = aiohttp.ClientTimeout(total=self._timeout)
        headers = self._headers() if authorized else {}
        try:
            async with self._http.session.get(url, headers=headers, timeout=limit) as response:
                if response.status != 200:
                    raise GraphError(
                        "download", response.status, None, None, response.reason or "download failed"
                    )
                if response.content_length is not None and response.content_length > max_bytes:
                    raise GraphError("download", 413, None, None, "file is too big")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > max_bytes:
                        raise GraphError("download", 413, None, None, "file is too big")
                    chunks.append(chunk)
                content_type = response.headers.get("Content-Type")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GraphError("download", 0, None, None, f"unreachable ({type(exc).__name__})") from None
        return b"".join(chunks), content_type

    async def upload(self, owner: str, data: bytes, *, content_type: str, name: str) -> str:
        """``POST /{phone-number-id}/media``: a media id for sending."""
        form = aiohttp.FormData()
        form.add_field("messaging_product", "whatsapp")
        form.add_field("type", content_type)
        form.add_field("file", data, filename=name, content_type=content_type)
        answer = await self.call("upload", "POST", f"{owner}/media", data=form)
        media_id = answer.get("id")
        if not isinstance(media_id, str) or not media_id:
            raise GraphError("upload", 502, None, None, "the answer names no media id")
        return media_id

    async def send(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.call("send", "POST", path, json=payload)
