"""A small client for the WeChat and WeCom server APIs the gateway needs: tokens, media, ``sync_msg``,
media upload and the message sends of the reply senders.

One :class:`WeChatApi` per Official Account / WeCom app. Its access token is cached and shared by
every call, fetched by one caller at a time, and refreshed ``REFRESH_MARGIN`` seconds before it
expires. An Official Account takes its token from ``stable_token`` (the same token for every caller
while it is valid, and apart from the tokens other systems take with ``/cgi-bin/token``); WeCom
from ``gettoken``. Given the channel's durable state, the token is shared by every gateway instance
through the store (:class:`SharedTokens`): one instance refreshes, under a lease taken with
compare-and-set, and the others read what it stored. A call answered with a token error (40001,
40014, 42001: the token expired early or was replaced) invalidates the token and is tried once more
with a fresh one (an Official Account whose ``stable_token`` still hands out the refused token asks
with ``force_refresh``, which only the lease holder does); a call answered
"busy" (-1, 45009, 45011, 45033) or failing in transport is retried after a growing pause, and
then raised as :class:`ApiUnavailable` (the caller schedules a later attempt). Other error codes
are :class:`ApiError`. Neither the secret nor the token is ever logged (URLs carry the token, so
transport errors are reported by type, not by URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import unquote

import aiohttp
import orjson

from core.channel import ChannelState
from core.errors import RetryableError

logger = logging.getLogger(__name__)

T = TypeVar("T")
Flavor = Literal["official_account", "wecom"]
Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]

TOKEN_ERRORS = frozenset({40001, 40014, 42001})
BUSY_ERRORS = frozenset({-1, 45009, 45011, 45033})
REFRESH_MARGIN = 300.0  # seconds before expiry a token is replaced
# How long an instance may hold the right to refresh a shared token before another may take it
# (a token call answers in well under a second; force_refresh is allowed once per 30 s).
TOKEN_LEASE = 30.0
LEASE_POLL = 0.2
_FILENAME_STAR = re.compile(r"filename\*\s*=\s*(?:UTF-8|utf-8)''([^;]+)")
_FILENAME = re.compile(r'filename\s*=\s*"?([^";]+)"?')


class ApiError(Exception):
    """The API answered an error code (``errcode``) that a retry will not fix."""

    def __init__(self, errcode: int, errmsg: str) -> None:
        super().__init__(f"errcode {errcode}: {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg


class ApiUnavailable(RetryableError, ConnectionError):
    """Busy, rate-limited or unreachable after the in-call retries: try again later. ``errcode``:
    the API's busy code, when it answered one (none for a transport error)."""

    errcode: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    flavor: Flavor
    api_base: str
    app_id: str  # AppID (Official Account) or CorpID (WeCom, WeChat Customer Service)
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Media:
    data: bytes = field(repr=False)
    content_type: str
    filename: str | None


class TooLargeMedia(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(0, f"media larger than {limit} bytes")


class WeChatApi:
    """Calls one account's API with its cached access token."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        credentials: Credentials,
        *,
        timeout: float = 15.0,
        retries: int = 3,
        backoff: float = 1.0,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        state: ChannelState | None = None,
    ) -> None:
        self._session = session
        self.credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retries = retries
        self._backoff = backoff
        self._clock = clock
        self._sleep = sleep
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        # With the channel's state, the token is shared with every instance through the store.
        self._shared = SharedTokens(state, clock=clock, sleep=sleep) if state is not None else None

    # -- the access token ---------------------------------------------------------------------

    async def token(self, *, refused: str | None = None) -> str:
        """The cached token, fetched (by one caller at a time) when absent or about to expire;
        ``refused``: a token the API just refused, which is never handed out again."""
        if refused is not None:
            self.invalidate(refused)
        if self._token is not None and self._clock() < self._expires_at:
            return self._token
        async with self._lock:
            if self._token is not None and self._clock() < self._expires_at:
                return self._token
            if self._shared is not None:
                token, refresh_at = await self._shared.obtain(self, refused)
            else:
                token, refresh_at = await self.fetch_token(refused)
            self._token, self._expires_at = token, refresh_at
            return token

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (when it is still the cached one; a newer one is kept)."""
        if self._token == token:
            self._token = None

    async def fetch_token(self, refused: str | None = None) -> tuple[str, float]:
        """A token from the API and when to replace it (``clock`` time). An Official Account asks
        ``stable_token``; when that still hands out the ``refused`` token, once more with
        ``force_refresh`` (which replaces it for every caller)."""
        creds = self.credentials
        if creds.flavor == "wecom":
            params = {"corpid": creds.app_id, "corpsecret": creds.secret}
            answer = await self._retrying(lambda: self._get_json("/cgi-bin/gettoken", params))
        else:
            answer = await self._retrying(lambda: self._stable_token(force=False))
            if refused is not None and answer.get("access_token") == refused:
                logger.info("wechat api %s: stable_token repeats a refused token; forcing a refresh",
                            creds.app_id)
                answer = await self._retrying(lambda: self._stable_token(force=True))
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise ApiError(-2, "token answer without access_token")
        lifetime = float(answer.get("expires_in") or 7200)
        logger.info("wechat api %s: new access token, valid %.0f s", creds.app_id, lifetime)
        return token, self._clock() + max(lifetime - REFRESH_MARGIN, lifetime / 2)

    async def _stable_token(self, *, force: bool) -> dict[str, Any]:
        creds = self.credentials
        body = {
            "grant_type": "client_credential",
            "appid": creds.app_id,
            "secret": creds.secret,
            "force_refresh": force,
        }
        return await self._post(creds.api_base + "/cgi-bin/stable_token", None, orjson.dumps(body),
                                "application/json", "/cgi-bin/stable_token")

    # -- calls --------------------------------------------------------------------------------

    async def get_json(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        async def call(token: str) -> dict[str, Any]:
            return await self._get_json(path, {**(params or {}), "access_token": token})

        return await self._with_token(call)

    async def post_json(
        self,
        path: str,
        body: Mapping[str, Any],
        params: Mapping[str, str] | None = None,
        *,
        retries: int | None = None,
    ) -> dict[str, Any]:
        """POST ``body`` as JSON; ``retries`` overrides the client's retries of busy answers and
        transport errors (a sender passes 0: the gateway retries it, with its own backoff)."""
        data = orjson.dumps(body)

        async def call(token: str) -> dict[str, Any]:
            query = {**(params or {}), "access_token": token}
            return await self._post(self.credentials.api_base + path, query, data, "application/json", path)

        return await self._with_token(call, retries=retries)

    async def upload_media(
        self,
        kind: str,
        data: bytes,
        *,
        filename: str,
        content_type: str,
        path: str = "/cgi-bin/media/upload",
        retries: int | None = None,
    ) -> dict[str, Any]:
        """Upload a temporary media file (``POST /cgi-bin/media/upload?type=...``, multipart field
        ``media``); an Official Account's ``/cgi-bin/media/uploadimg`` (a picture URL for news)
        takes ``path``. Returns the answer (``media_id`` or ``url``)."""

        async def call(token: str) -> dict[str, Any]:
            form = aiohttp.FormData()
            form.add_field("media", data, filename=filename, content_type=content_type)
            body = form()
            query = {"access_token": token, "type": kind}
            return await self._post(self.credentials.api_base + path, query, body, None, path)

        return await self._with_token(call, retries=retries)

    async def sync_msg(
        self, *, cursor: str | None, token: str | None, limit: int, open_kfid: str | None
    ) -> dict[str, Any]:
        """One page of WeChat Customer Service messages (``POST /cgi-bin/kf/sync_msg``)."""
        body: dict[str, Any] = {"limit": limit, "voice_format": 0}
        if cursor:
            body["cursor"] = cursor
        if token:
            body["token"] = token
        if open_kfid:
            body["open_kfid"] = open_kfid
        return await self.post_json("/cgi-bin/kf/sync_msg", body)

    async def media(self, media_id: str, *, max_bytes: int) -> Media:
        """Download a temporary media file (``GET /cgi-bin/media/get``).

        The API answers the bytes with their Content-Type and a Content-Disposition file name, or a
        JSON error; an Official Account's video answers ``{"video_url": ...}``, which is followed.
        """

        async def call(token: str) -> Media:
            params = {"access_token": token, "media_id": media_id}
            media = await self._download(self.credentials.api_base + "/cgi-bin/media/get", params, max_bytes)
            if isinstance(media, Media):
                return media
            video_url = media.get("video_url")
            if isinstance(video_url, str) and video_url.startswith(("https://", "http://")):
                followed = await self._download(video_url, None, max_bytes)
                if isinstance(followed, Media):
                    return Media(
                        data=followed.data,
                        content_type=followed.content_type or "video/mp4",
                        filename=followed.filename,
                    )
                _checked(followed)
                raise ApiError(-2, "video_url answered JSON instead of the video")
            _checked(media)
            raise ApiError(-2, "media answer is JSON without errcode")

        return await self._with_token(call)

    # -- internals ----------------------------------------------------------------------------

    async def _with_token(self, call: Callable[[str], Awaitable[T]], *, retries: int | None = None) -> T:
        async def attempt() -> T:
            token = await self.token()
            try:
                return await call(token)
            except ApiError as exc:
                if exc.errcode not in TOKEN_ERRORS:
                    raise
                logger.info(
                    "wechat api %s: token refused (%d), refreshing once", self.credentials.app_id, exc.errcode
                )
            return await call(await self.token(refused=token))

        return await self._retrying(attempt, retries=retries)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]], *, retries: int | None = None) -> T:
        """Run ``attempt``; on busy answers and transport errors pause (backoff, doubling) and retry."""
        limit = self._retries if retries is None else retries
        for n in range(limit + 1):
            errcode: int | None = None
            try:
                return await attempt()
            except ApiError as exc:
                if exc.errcode not in BUSY_ERRORS:
                    raise
                reason, errcode = f"busy (errcode {exc.errcode})", exc.errcode
            except ApiUnavailable as exc:
                reason = exc.reason
            if n == limit:
                unavailable = ApiUnavailable(reason, retry_after=self._backoff * 2 ** (n + 1))
                unavailable.errcode = errcode
                raise unavailable
            pause = self._backoff * 2**n
            logger.warning("wechat api %s: %s; retrying in %.1f s", self.credentials.app_id, reason, pause)
            await self._sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(
        self,
        url: str,
        params: Mapping[str, str] | None,
        data: Any,
        content_type: str | None,
        what: str,
    ) -> dict[str, Any]:
        headers = {"Content-Type": content_type} if content_type else None
        try:
            async with self._session.post(
                url, params=params, data=data, timeout=self._timeout, headers=headers
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiUnavailable(f"POST {what}: {type(exc).__name__}") from None
        return _checked(_parse_json(raw, status, what))

    async def _get_json(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        try:
            async with self._session.get(
                self.credentials.api_base + path, params=params, timeout=self._timeout
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiUnavailable(f"GET {path}: {type(exc).__name__}") from None
        return _checked(_parse_json(raw, status, path))

    async def _download(
        self, url: str, params: Mapping[str, str] | None, max_bytes: int
    ) -> Media | dict[str, Any]:
        try:
            async with self._session.get(url, params=params, timeout=self._timeout) as resp:
                if resp.status >= 500:
                    raise ApiUnavailable(f"media answered HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise TooLargeMedia(max_bytes)
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLargeMedia(max_bytes)
                    chunks.append(chunk)
                data = b"".join(chunks)
                content_type = resp.headers.get("Content-Type", "application/octet-stream")
                disposition = resp.headers.get("Content-Disposition", "")
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiUnavailable(f"media download: {type(exc).__name__}") from None
        mime = content_type.split(";")[0].strip().lower()
        # Errors come as JSON (served as application/json or text/plain), never as a file.
        if mime in ("application/json", "text/plain", "text/json") and data.lstrip()[:1] == b"{":
            return _parse_json(data, status, "media")
        if status >= 400:
            raise ApiError(-status, f"media answered HTTP {status}")
        mime = mime or "application/octet-stream"
        return Media(data=data, content_type=mime, filename=_filename(disposition))


def _parse_json(raw: bytes, status: int, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        if status >= 500:
            raise ApiUnavailable(f"{what}: HTTP {status}") from None
        raise ApiError(-2, f"{what}: HTTP {status}, not JSON") from None
    if not isinstance(value, dict):
        raise ApiError(-2, f"{what}: JSON is not an object")
    return value


def _checked(answer: dict[str, Any]) -> dict[str, Any]:
    code = answer.get("errcode", 0)
    if isinstance(code, int) and code != 0:
        raise ApiError(code, str(answer.get("errmsg", "")))
    return answer


def _filename(disposition: str) -> str | None:
    """The file name of a Content-Disposition header (RFC 6266 ``filename*`` first), path-free."""
    match = _FILENAME_STAR.search(disposition)
    name = unquote(match.group(1)) if match else None
    if name is None:
        plain = _FILENAME.search(disposition)
        name = plain.group(1).strip() if plain else None
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name[:255] or None


class SharedTokens:
    """An account's access token kept in the channel's durable state, so that every gateway instance
    uses the same one and only one of them refreshes it.

    The record (``token:{app id}:{hash of the secret}``) holds the token, when to replace it and,
    while an instance refreshes, its lease. A refresher takes the lease with compare-and-set; the
    others wait for the new token (up to ``TOKEN_LEASE``, after which the lease is taken over). The
    secret is never stored, only a hash that tells two secrets of one corp apart.
    """

    def __init__(
        self,
        state: ChannelState,
        *,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        lease: float = TOKEN_LEASE,
        poll: float = LEASE_POLL,
    ) -> None:
        self._state = state
        self._clock = clock
        self._sleep = sleep
        self._lease = lease
        self._poll = poll

    @staticmethod
    def key(credentials: Credentials) -> str:
        digest = hashlib.sha256(credentials.secret.encode()).hexdigest()[:16]
        return f"token:{credentials.app_id}:{digest}"

    async def obtain(self, api: WeChatApi, refused: str | None) -> tuple[str, float]:
        """A token no older than its refresh time and not ``refused``, and when to replace it."""
        key = self.key(api.credentials)
        polls = max(1, int(self._lease / self._poll))
        while True:
            raw = await self._state.get(key)
            record = _decode(raw)
            now = self._clock()
            token, refresh_at = record.get("token"), record.get("refresh_at")
            refresh = float(refresh_at) if isinstance(refresh_at, float | int) else 0.0
            if isinstance(token, str) and token != refused and now < refresh:
                return token, refresh
            lease_until = record.get("lease_until")
            if isinstance(lease_until, float | int) and now < lease_until and polls > 0:
                polls -= 1  # another instance is refreshing: wait for what it stores
                await self._sleep(self._poll)
                continue
            leased = orjson.dumps({**record, "lease_until": now + self._lease, "lease": secrets.token_hex(8)})
            if await self._state.compare_and_set(key, raw, leased):
                break
            # Someone else changed the record meanwhile: read it again.
        try:
            token, refresh_at = await api.fetch_token(refused)
        except Exception:
            # Give the lease back (best effort) so another instance need not wait for it to expire.
            released = {k: v for k, v in record.items() if k not in ("lease", "lease_until")}
            with contextlib.suppress(Exception):
                await self._state.compare_and_set(key, leased, orjson.dumps(released))
            raise
        stored = orjson.dumps({"token": token, "refresh_at": refresh_at, "fetched_at": self._clock()})
        if not await self._state.compare_and_set(key, leased, stored):
            logger.info("wechat api %s: token lease was taken over; keeping the token fetched",
                        api.credentials.app_id)
        return token, refresh_at


def _decode(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
