"""The DingTalk API calls the channel makes with the app's access token.

``POST /v1.0/oauth2/accessToken`` gives a token for ``expireIn`` seconds (two hours); it is reused
until five minutes before then (one refresh in flight) and dropped when DingTalk refuses it. The new
API answers errors as HTTP 4xx/5xx with ``{"code", "message"}``; the old one (``oapi``) as HTTP 200
with ``errcode``. Both become a :class:`DingTalkError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from connectors.base import AppToken
from core.channel import Clock, HttpClient

TOKEN_REFUSED = frozenset(
    {
        "InvalidAuthentication",
        "Forbidden.AccessDenied.AccessTokenPermissionDenied",
        "invalidClientIdOrSecret",
        "40014",
        "42001",
        "88",
    }
)


class DingTalkError(Exception):
    def __init__(
        self, what: str, code: str, message: str, *, status: int = 200, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{what}: {status} {code} {message}")
        self.what = what
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return self.status in (429, 0) or self.status >= 500 or self.code in ("Throttling", "90018", "-1")


@dataclass
class DingTalkApi:
    api: HttpClient
    oapi: HttpClient
    app_key: str
    app_secret: str = field(repr=False)
    clock: Clock
    timeout: float = 15.0
    _token: AppToken = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._token = AppToken(self._fetch_token, self.clock)

    async def token(self) -> str:
        return await self._token.get()

    async def _fetch_token(self) -> tuple[str, float]:
        data = await self.request(
            self.api,
            "POST",
            "/v1.0/oauth2/accessToken",
            token=None,
            json={"appKey": self.app_key, "appSecret": self.app_secret},
        )
        token = data.get("accessToken")
        if not isinstance(token, str) or not token:
            raise DingTalkError("accessToken", "no_token", "no accessToken in the answer")
        given = data.get("expireIn")
        return token, given if isinstance(given, int) else 7200

    def forget_token(self) -> None:
        self._token.forget()

    async def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """A new-API call with the token; a token DingTalk refuses is replaced once."""
        for attempt in (1, 2):
            token = await self.token()
            try:
                return await self.request(self.api, method, path, token=token, **kwargs)
            except DingTalkError as exc:
                if exc.code in TOKEN_REFUSED and attempt == 1:
                    self.forget_token()
                    continue
                raise
        raise AssertionError("unreachable")

    async def request(
        self,
        client: HttpClient,
        method: str,
        path_or_url: str,
        *,
        token: str | None,
        oapi: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        params = dict(kwargs.pop("params", {}))
        if token and oapi:
            params["access_token"] = token
        elif token:
            headers["x-acs-dingtalk-access-token"] = token
        if "json" in kwargs:
            kwargs["data"] = orjson.dumps(kwargs.pop("json"))
        url = path_or_url if path_or_url.startswith(("http://", "https://")) else client.url(path_or_url)
        try:
            async with client.session.request(
                method,
                url,
                headers=headers,
                params=params,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                **kwargs,
            ) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DingTalkError(
                path_or_url.split("?")[0], "-1", f"unreachable: {type(exc).__name__}", status=0
            ) from exc
        try:
            data = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        errcode = data.get("errcode")
        if status >= 400 or (errcode not in (None, 0)):
            code = str(data.get("code") or errcode or status)
            message = str(data.get("message") or data.get("errmsg") or "")
            seconds = float(retry_after) if retry_after and retry_after.isdigit() else None
            raise DingTalkError(path_or_url.split("?")[0], code, message, status=status, retry_after=seconds)
        return data

    async def employee_email(self, staff_id: str) -> str | None:
        """The directory's work email (``org_email``, else ``email``) of an employee."""
        token = await self.token()
        data = await self.request(
            self.oapi,
            "POST",
            "/topapi/v2/user/get",
            token=token,
            oapi=True,
            json={"userid": staff_id, "language": "en_US"},
        )
        result = data.get("result")
        if not isinstance(result, dict):
            return None
        for key in ("org_email", "email"):
            value = result.get(key)
            if isinstance(value, str) and "@" in value:
                return value.strip().lower()
        return None

    async def download(self, robot_code: str, code: str, *, max_bytes: int) -> tuple[bytes, str | None]:
        """The robot file download API: a short-lived URL for ``downloadCode``, then its bytes."""
        data = await self.call(
            "POST", "/v1.0/robot/messageFiles/download", json={"downloadCode": code, "robotCode": robot_code}
        )
        url = data.get("downloadUrl")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise DingTalkError("messageFiles/download", "no_url", "no downloadUrl", status=404)
        try:
            async with self.api.session.get(
                url, timeout=aiohttp.ClientTimeout(total=self.timeout * 4)
            ) as resp:
                if resp.status != 200:
                    raise DingTalkError("download", str(resp.status), "download failed", status=resp.status)
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise DingTalkError("download", "too_large", "over media_max_bytes", status=413)
                body = await resp.content.read(max_bytes + 1)
                if len(body) > max_bytes:
                    raise DingTalkError("download", "too_large", "over media_max_bytes", status=413)
                return body, resp.headers.get("Content-Type")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DingTalkError("download", "-1", f"unreachable: {type(exc).__name__}", status=0) from exc
