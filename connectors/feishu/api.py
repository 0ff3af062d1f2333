"""The Feishu / Lark Open API calls the channel makes, with the app's tenant_access_token.

``POST /open-apis/auth/v3/tenant_access_token/internal`` gives a token for ``expire`` seconds
(two hours); it is reused until five minutes before then, one refresh in flight per app, and
dropped when an API says it is invalid (codes 99991661, 99991663, 99991668) so the next call gets
a fresh one. Every answer is ``{"code": 0, ...}`` on success; anything else is a :class:`FeishuError`
with Feishu's code, the HTTP status and, on 429, the pause Feishu asks for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from connectors.base import AppToken
from core.channel import Clock, HttpClient

logger = logging.getLogger(__name__)

TOKEN_INVALID = frozenset({99991661, 99991663, 99991668, 99991664})
RATE_LIMITED = frozenset({99991400, 230020})
# The app id or secret was refused when asking for a token: fixable by the operator.
CREDENTIALS_REFUSED = frozenset({10003, 10014})
# The app id or secret was refused when asking for a token: fixable by the operator.
CREDENTIALS_REFUSED = frozenset({10003, 10014})


class FeishuError(Exception):
    def __init__(
        self, what: str, code: int, msg: str, *, status: int = 200, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{what}: code {code} {msg}")
        self.what = what
        self.code = code
        self.msg = msg
        self.status = status
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return self.status == 429 or self.status >= 500 or self.code in RATE_LIMITED or self.code == -1


@dataclass
class FeishuApi:
    """One app's API client (token cache included)."""

    http: HttpClient
    app_id: str
    app_secret: str = field(repr=False)
    clock: Clock
    timeout: float = 15.0
    _token: AppToken = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._token = AppToken(self._fetch_token, self.clock)

    async def token(self) -> str:
        return await self._token.get()

    async def _fetch_token(self) -> tuple[str, float]:
        data = await self._call("POST", "/open-apis/auth/v3/tenant_access_token/internal", token=None,
                                json={"app_id": self.app_id, "app_secret": self.app_secret})
        token = data.get("tenant_access_token")
        if not isinstance(token, str) or not token:
            raise FeishuError("tenant_access_token", -2, "no token in the answer")
        given = data.get("expire")
        return token, given if isinstance(given, int) else 7200

    async def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """An API call with the token; a token Feishu calls invalid is replaced once."""
        for attempt in (1, 2):
            token = await self.token()
            try:
                return await self._call(method, path, token=token, **kwargs)
            except FeishuError as exc:
                if exc.code in TOKEN_INVALID and attempt == 1:
                    self._token.forget()
                    continue
                raise
        raise AssertionError("unreachable")

    async def _call(
        self, method: str, path: str, *, token: str | None, headers_extra: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        headers = {"Content-Type": "application/json; charset=utf-8", **(headers_extra or {})}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if "json" in kwargs:
            kwargs["data"] = orjson.dumps(kwargs.pop("json"))
        try:
            async with self.http.session.request(
                method, self.http.url(path), headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout), **kwargs,
            ) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = _retry_after(resp.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FeishuError(path, -1, f"unreachable: {type(exc).__name__}") from exc
        try:
            data = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        code = data.get("code")
        if status != 200 or code != 0:
            raise FeishuError(path, code if isinstance(code, int) else -3, str(data.get("msg") or ""),
                              status=status, retry_after=retry_after)
        return data

    async def resource(
        self, message_id: str, key: str, kind: str, *, max_bytes: int
    ) -> tuple[bytes, str | None, str | None]:
        """GET /open-apis/im/v1/messages/{message_id}/resources/{key}?type=image|file: the bytes, the
        served content type and the file name from Content-Disposition."""
        token = await self.token()
        path = f"/open-apis/im/v1/messages/{message_id}/resources/{key}"
        try:
            async with self.http.session.get(
                self.http.url(path), params={"type": kind}, headers={"Authorization": f"Bearer {token}"},
                timeout=aiohttp.ClientTimeout(total=self.timeout * 4),
            ) as resp:
                if resp.status != 200 or resp.content_type == "application/json":
                    raw = await resp.read()
                    try:
                        data = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        data = {}
                    code = data.get("code") if isinstance(data, dict) else None
                    if isinstance(code, int) and code in TOKEN_INVALID:
                        self._token.forget()
                    raise FeishuError(path, code if isinstance(code, int) else -3,
                                      str(data.get("msg") if isinstance(data, dict) else ""),
                                      status=resp.status, retry_after=_retry_after(resp.headers))
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise FeishuError(path, -4, "too large", status=413)
                data_bytes = await resp.content.read(max_bytes + 1)
                if len(data_bytes) > max_bytes:
                    raise FeishuError(path, -4, "too large", status=413)
                name = resp.content_disposition.filename if resp.content_disposition else None
                return data_bytes, resp.headers.get("Content-Type"), name
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FeishuError(path, -1, f"unreachable: {type(exc).__name__}") from exc

    async def upload(self, kind: str, name: str, content_type: str, data: bytes) -> str:
        """POST /open-apis/im/v1/images (``image``) or /files (``file``): the image_key or file_key."""
        for attempt in (1, 2):
            form = aiohttp.FormData()
            if kind == "image":
                path, key_name = "/open-apis/im/v1/images", "image_key"
                form.add_field("image_type", "message")
                form.add_field("image", data, filename=name, content_type=content_type)
            else:
                path, key_name = "/open-apis/im/v1/files", "file_key"
                form.add_field("file_type", "stream")
                form.add_field("file_name", name)
                form.add_field("file", data, filename=name, content_type=content_type)
            token = await self.token()
            try:
                async with self.http.session.post(
                    self.http.url(path), data=form, headers={"Authorization": f"Bearer {token}"},
                    timeout=aiohttp.ClientTimeout(total=self.timeout * 4),
                ) as resp:
                    raw, status, retry_after = await resp.read(), resp.status, _retry_after(resp.headers)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise FeishuError(path, -1, f"unreachable: {type(exc).__name__}") from exc
            try:
                answer = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                answer = {}
            code = answer.get("code") if isinstance(answer, dict) else None
            if code in TOKEN_INVALID and attempt == 1:
                self._token.forget()
                continue
            body = answer.get("data") if isinstance(answer, dict) else None
            key = body.get(key_name) if isinstance(body, dict) else None
            if status != 200 or code != 0 or not isinstance(key, str):
                message = str(answer.get("msg") if isinstance(answer, dict) else "")
                raise FeishuError(path, code if isinstance(code, int) else -3, message, status=status,
                                  retry_after=retry_after)
            return key
        raise AssertionError("unreachable")

    async def employee(self, open_id: str) -> dict[str, Any] | None:
        """The contact API's user (name, email, enterprise_email), or ``None`` when unknown."""
        data = await self.call("GET", f"/open-apis/contact/v3/users/{open_id}",
                               params={"user_id_type": "open_id"})
        user = data.get("data", {}).get("user") if isinstance(data.get("data"), dict) else None
        return user if isinstance(user, dict) else None


def _retry_after(headers: Any) -> float | None:
    for name in ("Retry-After", "x-ogw-ratelimit-reset"):
        value = headers.get(name)
        if value:
            try:
                return max(float(value), 0.0)
            except ValueError:
                continue
    return None
