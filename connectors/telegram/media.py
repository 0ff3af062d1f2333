"""Telegram media: queued in the gateway's media queue after the commit, fetched through getFile.

A message names its files by ``file_id``; the webhook is answered once the message is committed and
its fetches are queued (insert-if-absent, so a redelivery adds nothing). A supervised fetcher claims
due fetches with a lease, asks ``getFile`` for the file's path, downloads it and keeps the bytes as
a blob. Transient failures (unreachable, 429, 5xx) are retried with a doubling pause capped at
``media_max_backoff`` (at least Telegram's ``retry_after``) until ``media_retry_for`` has passed;
anything else (a file over the 20 MB download limit, an unknown file_id) fails for good, counted as
``media_failed``. The message itself is on the bus either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from connectors.telegram.api import BotApi, BotApiError
from core.channel import ChannelMetrics, Clock, MediaQueue
from core.events import media_path
from core.media import MediaFetch
from core.model import CanonicalMessage
from normalizers.telegram import MAX_DOWNLOAD_BYTES

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class MediaPolicy:
    concurrency: int = 4
    retry_for: float = 86400.0
    first_backoff: float = 10.0
    max_backoff: float = 3600.0
    lease: float = 180.0  # longer than getFile plus a 20 MB download can take
    idle_poll: float = 30.0  # the longest the fetcher sleeps when nothing wakes it
    max_bytes: int = MAX_DOWNLOAD_BYTES


class _Permanent(Exception):
    """Retrying cannot help (too big, unknown file): the fetch fails for good."""


class MediaFetcher:
    """Fetches the queued media of the bots in ``apis`` (keyed by inbox, which is the fetch's account)."""

    def __init__(
        self,
        *,
        queue: MediaQueue,
        metrics: ChannelMetrics,
        clock: Clock,
        apis: Mapping[str, BotApi],
        policy: MediaPolicy,
    ) -> None:
        self._queue = queue
        self._metrics = metrics
        self._clock = clock
        self._apis = apis
        self._policy = policy
        self._wake = asyncio.Event()

    async def enqueue(self, messages: Sequence[CanonicalMessage]) -> None:
        """Durably queue the files of committed messages (before Telegram is answered)."""
        now = self._clock.now()
        fetches: dict[str, MediaFetch] = {}
        for message in messages:
            if message.inbox not in self._apis:
                continue
            for media in message.media:
                key = media_path(message.channel, message.inbox, media.ref)
                fetches[key] = MediaFetch(
                    key=key, channel=message.channel, inbox=message.inbox, account=message.inbox,
                    ref=media.ref, kind=media.kind, name=media.name, content_type=media.content_type,
                    created_at=now, next_attempt_at=now,
                )
        if fetches:
            await self._queue.enqueue(list(fetches.values()))
            self._wake.set()

    async def run_once(self) -> int:
        """Fetch what is due, ``concurrency`` at a time; how many were claimed."""
        due = await self._queue.claim(self._clock.now(), self._policy.concurrency * 4, self._policy.lease)
        gate = asyncio.Semaphore(self._policy.concurrency)

        async def one(fetch: MediaFetch) -> None:
            async with gate:
                await self._fetch(fetch)

        await asyncio.gather(*(one(fetch) for fetch in due))
        return len(due)

    async def run(self) -> None:
        """Fetch until cancelled: at once when woken by ``enqueue``, else every ``idle_poll`` seconds."""
        while True:
            if await self.run_once():
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._policy.idle_poll)

    async def _fetch(self, fetch: MediaFetch) -> None:
        try:
            data, content_type, name = await self._download(fetch)
        except _Permanent as exc:
            await self._give_up(fetch, str(exc))
            return
        except BotApiError as exc:
            if exc.too_big or not exc.transient:
                await self._give_up(fetch, str(exc))
            else:
                await self._retry_later(fetch, str(exc), at_least=exc.retry_after or 0.0)
            return
        await self._queue.done(fetch.key, data, content_type=content_type, name=name)
        self._metrics.event("media_fetched", inbox=fetch.inbox)
        logger.info("telegram media %s fetched (%d bytes)", fetch.key, len(data))

    async def _download(self, fetch: MediaFetch) -> tuple[bytes, str, str | None]:
        api = self._apis.get(fetch.account)
        if api is None:
            raise _Permanent("this bot no longer fetches media")
        file = await api.get_file(fetch.ref)
        if file.file_size is not None and file.file_size > self._policy.max_bytes:
            raise _Permanent(f"file of {file.file_size} bytes is over the Bot API download limit")
        if file.file_path is None:
            raise _Permanent("getFile gave no file_path")
        data = await api.download(file.file_path, max_bytes=self._policy.max_bytes)
        basename = posixpath.basename(file.file_path)
        content_type = fetch.content_type or mimetypes.guess_type(basename)[0] or "application/octet-stream"
        return data, content_type, fetch.name or basename or None

    async def _give_up(self, fetch: MediaFetch, error: str) -> None:
        logger.warning("telegram media %s: giving up after %d attempts: %s", fetch.key, fetch.attempts, error)
        self._metrics.event("media_failed", inbox=fetch.inbox)
        await self._queue.failed(fetch.key, error, retry_at=None)

    async def _retry_later(self, fetch: MediaFetch, error: str, *, at_least: float) -> None:
        policy = self._policy
        pause = max(at_least, min(policy.first_backoff * 2 ** max(fetch.attempts - 1, 0), policy.max_backoff))
        retry_at = self._clock.now() + timedelta(seconds=pause)
        if retry_at > fetch.created_at + timedelta(seconds=policy.retry_for):
            await self._give_up(fetch, error)
            return
        logger.info("telegram media %s: attempt %d failed (%s); next in %.0f s", fetch.key, fetch.attempts,
                    error, pause)
        await self._queue.failed(fetch.key, error, retry_at=retry_at)
