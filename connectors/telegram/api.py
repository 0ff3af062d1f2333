"""The few Bot API calls the channel makes: getFile, the file download, getUpdates.

Every URL holds the bot token (``/bot<token>/<method>``), so neither URLs nor aiohttp's errors
(which quote the URL) are ever logged; errors carry the method name and Telegram's description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict, cast

import aiohttp
import orjson

from core.channel import HttpClient


class ResponseParameters(TypedDict, total=False):
    retry_after: int
    migrate_to_chat_id: int


class ApiResponse(TypedDict, total=False):
    ok: bool
    result: Any
    error_code: int
    description: str
    parameters: ResponseParameters


class FileObject(TypedDict, total=False):
    file_id: str
    file_unique_id: str
    file_size: int
    file_path: str


class BotApiError(Exception):
    """Telegram answered ``ok: false`` (or could not be reached: ``error_code`` 0)."""

    def __init__(self, method: str, error_code: int, description: str, *, retry_after: float | None = None):
        self.method = method
        self.error_code = error_code
        self.description = description
        self.retry_after = retry_after
        super().__init__(f"{method}: {error_code} {description}")

    @property
    def transient(self) -> bool:
        """Worth retrying: unreachable, flood control (429) or a server error."""
        return self.error_code == 0 or self.error_code == 429 or self.error_code >= 500

    @property
    def too_big(self) -> bool:
        """getFile refuses files over the Bot API's 20 MB download limit with 400 "file is too big"."""
        return self.error_code == 400 and "too big" in self.description.lower()


@dataclass(frozen=True, slots=True, kw_only=True)
class TelegramFile:
    file_id: str
    file_path: str | None
    file_size: int | None


class BotApi:
    """One bot's Bot API, over the channel's HTTP client (whose base URL tests point elsewhere)."""

    def __init__(self, http: HttpClient, token: str, *, timeout: float) -> None:
        self._http = http
        self._token = token
        self._timeout = timeout

    async def call(self, method: str, payload: dict[str, Any], *, wait: float | None = None) -> Any:
        """POST ``payload`` as JSON; the ``result`` of an ``ok`` answer, else :class:`BotApiError`."""
        limit = aiohttp.ClientTimeout(total=wait or self._timeout)
        url = self._http.url(f"bot{self._token}/{method}")
        try:
            async with self._http.session.post(url, json=payload, timeout=limit) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BotApiError(method, 0, f"unreachable ({type(exc).__name__})") from None
        try:
            answer = cast(ApiResponse, orjson.loads(body))
        except orjson.JSONDecodeError:
            raise BotApiError(method, status if status >= 400 else 502, "answer is not JSON") from None
        if not isinstance(answer, dict):
            raise BotApiError(method, 502, "answer is not a JSON object")
        if answer.get("ok") is True:
            return answer.get("result")
        parameters = answer.get("parameters")
        retry_after = parameters.get("retry_after") if isinstance(parameters, dict) else None
        raise BotApiError(
            method,
            int(answer.get("error_code") or status),
            str(answer.get("description") or "no description"),
            retry_after=float(retry_after) if isinstance(retry_after, int | float) else None,
        )

    async def get_file(self, file_id: str) -> TelegramFile:
        result = await self.call("getFile", {"file_id": file_id})
        if not isinstance(result, dict):
            raise BotApiError("getFile", 502, "result is not a File")
        file = cast(FileObject, result)
        path, size = file.get("file_path"), file.get("file_size")
        return TelegramFile(
            file_id=file_id,
            file_path=path if isinstance(path, str) and path else None,
            file_size=size if isinstance(size, int) else None,
        )

    async def download(self, file_path: str, *, max_bytes: int) -> bytes:
        """``GET /file/bot<token>/<file_path>``, refusing more than ``max_bytes``."""
        url = self._http.url(f"file/bot{self._token}/{file_path}")
        limit = aiohttp.ClientTimeout(total=self._timeout)
        try:
            async with self._http.session.get(url, timeout=limit) as response:
                if response.status != 200:
                    raise BotApiError("download", response.status, response.reason or "download failed")
                if response.content_length is not None and response.content_length > max_bytes:
                    raise BotApiError("download", 400, "file is too big")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > max_bytes:
                        raise BotApiError("download", 400, "file is too big")
                    chunks.append(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BotApiError("download", 0, f"unreachable ({type(exc).__name__})") from None
        return b"".join(chunks)

    async def get_updates(self, offset: int | None, *, hold: int, limit: int) -> list[dict[str, Any]]:
        """Updates from ``offset`` on, Telegram holding the request up to ``hold`` seconds; asking with
        ``offset`` confirms every earlier update to Telegram."""
        payload: dict[str, Any] = {"timeout": hold, "limit": limit}
        if offset is not None:
            payload["offset"] = offset
        result = await self.call("getUpdates", payload, wait=self._timeout + hold)
        if not isinstance(result, list):
            raise BotApiError("getUpdates", 502, "result is not a list")
        return [update for update in result if isinstance(update, dict)]
