"""Media of WeChat-family messages: fetched after the answer, durably queued, served to desks.

The callback is answered once the message is committed and its media are in the store's fetch
queue (``Store.media_enqueue``, insert-if-absent, so WeChat's retries add nothing). A fetcher task
(one ``cleanup_ctx`` entry per connector) claims due fetches with a lease, downloads them through
the account's :class:`~connectors.wechat.api.WeChatApi` with bounded concurrency, and keeps the
bytes in the blob store; failures are retried with a growing pause until ``media_retry_for`` has
passed (WeChat keeps temporary media for three days). A restart resumes from the queue.

Desks fetch ``{public_url}/media/{channel}/{inbox}/{ref}`` (the event's ``media[].url``): 200 with
the bytes once fetched, 202 with ``Retry-After`` while pending, 410 when it cannot be fetched any
more, 404 when the gateway does not fetch it. The blob token of ``/blobs`` applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import mimetypes
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from aiohttp import web

from connectors.wechat.api import ApiError, ApiUnavailable, TooLargeMedia, WeChatApi
from core.events import media_path
from core.media import MediaFetch
from core.model import CanonicalMessage
from gateway.keys import SETTINGS, STORE
from gateway.store.base import Store

logger = logging.getLogger(__name__)

Now = Callable[[], datetime]
FETCHED_KINDS = frozenset({"image", "voice", "video", "file"})
# A media id WeChat does not know (or no longer keeps): retrying cannot help.
GONE_ERRORS = frozenset({40007, 46004})


def media_key(channel: str, inbox: str, ref: str) -> str:
    """The stable name of one media file; also the path under ``/media/`` that serves it."""
    return media_path(channel, inbox, ref)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class MediaPolicy:
    concurrency: int = 4
    max_bytes: int = 20 * 1024 * 1024
    retry_for: float = 3 * 86400.0
    lease: float = 120.0  # longer than one fetch with its in-call retries can take
    first_backoff: float = 10.0
    max_backoff: float = 3600.0
    idle_poll: float = 30.0  # the longest the fetcher sleeps when nothing wakes it


def fetches_for(messages: Sequence[CanonicalMessage], *, account: str, now: datetime) -> list[MediaFetch]:
    """The fetches a committed callback's messages announce (images, voice, video, files)."""
    fetches: dict[str, MediaFetch] = {}
    for message in messages:
        for media in message.media:
            if media.kind not in FETCHED_KINDS or not media.ref:
                continue
            key = media_key(message.channel, message.inbox, media.ref)
            fetches.setdefault(
                key,
                MediaFetch(
                    key=key,
                    channel=message.channel,
                    inbox=message.inbox,
                    account=account,
                    ref=media.ref,
                    kind=media.kind,
                    name=media.name,
                    content_type=media.content_type,
                    created_at=now,
                ),
            )
    return list(fetches.values())


class MediaFetcher:
    """Fetches one channel's queued media; ``accounts`` are those with API credentials."""

    def __init__(
        self, channel: str, accounts: frozenset[str], policy: MediaPolicy, *, now: Now = _utcnow
    ) -> None:
        self.channel = channel
        self.accounts = accounts
        self.policy = policy
        self._now = now
        self._store: Store | None = None
        self._apis: Mapping[str, WeChatApi] = {}
        self._wake = asyncio.Event()
        self._in_flight: set[str] = set()

    def bind(self, store: Store) -> None:
        self._store = store

    def start(self, apis: Mapping[str, WeChatApi]) -> None:
        self._apis = apis

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("media fetcher is not bound to a store")
        return self._store

    async def enqueue(self, messages: Sequence[CanonicalMessage], account: str) -> None:
        """Durably queue the media of committed messages (before the channel is answered)."""
        if account not in self.accounts:
            return
        fetches = fetches_for(messages, account=account, now=self._now())
        if fetches:
            await self.store.media_enqueue(fetches)
            self._wake.set()

    async def run_once(self) -> int:
        """Claim what is due and fetch it (at most ``concurrency`` at a time); returns how many."""
        due = await self.store.media_claim(
            self._now(), self.policy.concurrency * 4, self.policy.lease, channel=self.channel
        )
        due = [f for f in due if f.key not in self._in_flight]
        if not due:
            return 0
        gate = asyncio.Semaphore(self.policy.concurrency)

        async def one(fetch: MediaFetch) -> None:
            async with gate:
                await self._fetch(fetch)

        await asyncio.gather(*(one(f) for f in due))
        return len(due)

    async def run(self) -> None:
        """Fetch until cancelled: at once when woken, else every ``idle_poll`` seconds."""
        while True:
            try:
                fetched = await self.run_once()
            except Exception:
                logger.exception("%s media: claiming from the queue failed", self.channel)
                fetched = 0
            if fetched:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.policy.idle_poll)

    async def _fetch(self, fetch: MediaFetch) -> None:
        self._in_flight.add(fetch.key)
        try:
            api = self._apis.get(fetch.account)
            if api is None:
                await self._failed(fetch, "no API credentials for this account any more", permanent=True)
                return
            try:
                media = await api.media(fetch.ref, max_bytes=self.policy.max_bytes)
            except TooLargeMedia as exc:
                await self._failed(fetch, exc.errmsg, permanent=True)
                return
            except ApiError as exc:
                await self._failed(fetch, str(exc), permanent=exc.errcode in GONE_ERRORS)
                return
            except ApiUnavailable as exc:
                await self._failed(fetch, exc.reason, permanent=False)
                return
            except Exception as exc:
                logger.exception("%s media %s: fetch failed", self.channel, fetch.key)
                await self._failed(fetch, f"{type(exc).__name__}", permanent=False)
                return
            name = media.filename or fetch.name or _default_name(fetch.ref, media.content_type)
            await self.store.media_done(fetch.key, media.data, content_type=media.content_type, name=name)
            logger.info("%s media %s fetched (%d bytes)", self.channel, fetch.key, len(media.data))
        finally:
            self._in_flight.discard(fetch.key)

    async def _failed(self, fetch: MediaFetch, error: str, *, permanent: bool) -> None:
        now = self._now()
        pause = min(self.policy.first_backoff * 2 ** max(fetch.attempts - 1, 0), self.policy.max_backoff)
        retry_at = now + timedelta(seconds=pause)
        if permanent or retry_at > fetch.created_at + timedelta(seconds=self.policy.retry_for):
            logger.warning(
                "%s media %s: giving up after %d attempts: %s", self.channel, fetch.key, fetch.attempts, error
            )
            await self.store.media_failed(fetch.key, error, retry_at=None)
        else:
            logger.info(
                "%s media %s: attempt %d failed (%s); next in %.0f s",
                self.channel,
                fetch.key,
                fetch.attempts,
                error,
                pause,
            )
            await self.store.media_failed(fetch.key, error, retry_at=retry_at)

    @contextlib.asynccontextmanager
    async def running(self, apis: Mapping[str, WeChatApi]) -> AsyncIterator[None]:
        """Run the fetch loop in a task for the duration of the block."""
        self.start(apis)
        task = asyncio.create_task(self.run(), name=f"ticketgate-{self.channel}-media")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _default_name(ref: str, content_type: str) -> str:
    extension = mimetypes.guess_extension(content_type) or ""
    return f"{ref[:64]}{extension}"


# --- serving ----------------------------------------------------------------------------------


def media_subapp(channel: str) -> web.Application:
    """``GET /media/{channel}/{inbox}/{ref}``: the fetched bytes, or where the fetch stands."""
    sub = web.Application()

    async def serve(request: web.Request) -> web.StreamResponse:
        _authorize(request)
        key = media_key(channel, request.match_info["inbox"], request.match_info["ref"])
        store = request.config_dict[STORE]
        record = await store.media_get(key)
        if record is None:
            return web.json_response({"status": "unknown"}, status=404)
        if record.state == "pending":
            wait = 5.0
            if record.next_attempt_at is not None:
                wait = (record.next_attempt_at - datetime.now(UTC)).total_seconds()
            return web.json_response(
                {"status": "pending", "attempts": record.attempts},
                status=202,
                headers={"Retry-After": str(min(max(1, round(wait)), 3600))},
            )
        if record.state == "failed" or record.sha256 is None:
            return web.json_response({"status": "failed", "error": record.error}, status=410)
        data = await store.read_blob(record.sha256)
        if data is None:
            logger.error("%s media %s: blob %s is missing", channel, key, record.sha256)
            return web.json_response({"status": "missing"}, status=404)
        headers = {
            "Cache-Control": "private, max-age=31536000, immutable",
            "X-Content-Type-Options": "nosniff",
            "ETag": f'"{record.sha256}"',
            "X-Content-SHA256": record.sha256,
        }
        if record.name:
            headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(record.name, safe='')}"
        return web.Response(
            body=data, content_type=record.content_type or "application/octet-stream", headers=headers
        )

    sub.router.add_get("/{inbox}/{ref:.+}", serve)
    return sub


def _authorize(request: web.Request) -> None:
    """The same bearer token as ``/blobs`` (``server.blob_token``), when one is configured."""
    settings = request.config_dict.get(SETTINGS)
    token = settings.server.blob_token if settings is not None else None
    if token is None:
        return
    offered = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(offered.encode(), token.get_secret_value().encode()):
        raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"}, text="blob token required")
