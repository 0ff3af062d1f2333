"""Provider-held media, fetched after the answer through the channel's durable media queue.

A channel's connector queues the media a committed message announces (``ctx.media.enqueue``,
insert-if-absent, so a provider's retry adds nothing) and runs one :class:`MediaFetcher`: it claims
due fetches with a lease, downloads them through the channel's own ``download`` with bounded
concurrency and keeps the bytes in the blob store; failures are retried with a growing pause until
``retry_for`` has passed, and a fetch that cannot succeed ends ``failed`` with its reason (the
message was published all the same; desks see the state at ``/media/{key}``). A restart resumes
from the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol, Self

from core.channel import ChannelContext, ChannelMetrics, MediaQueue
from core.events import media_path
from core.media import MediaFetch
from core.model import CanonicalMessage

logger = logging.getLogger(__name__)

Now = Callable[[], datetime]


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetched:
    """Downloaded media."""

    data: bytes = field(repr=False)
    content_type: str
    filename: str | None = None


class MediaGone(Exception):
    """The provider will never give this media (unknown or expired id, too large): no retry."""


class MediaUnavailable(Exception):
    """Busy, rate-limited or unreachable: try again later."""


Download = Callable[[MediaFetch], Awaitable[Fetched]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def fetches_for(
    messages: Sequence[CanonicalMessage], *, now: datetime, account: str | None = None
) -> list[MediaFetch]:
    """The fetches committed messages announce, one per media ref; ``account`` names the
    credentials that fetch them (the message's inbox when not given)."""
    fetches: dict[str, MediaFetch] = {}
    for message in messages:
        for media in message.media:
            key = media_path(message.channel, message.inbox, media.ref)
            fetches[key] = MediaFetch(
                key=key, channel=message.channel, inbox=message.inbox, account=account or message.inbox,
                ref=media.ref, kind=media.kind, name=media.name, content_type=media.content_type,
                created_at=now, next_attempt_at=now,
            )
    return list(fetches.values())


@dataclass(frozen=True, slots=True, kw_only=True)
class MediaPolicy:
    concurrency: int = 4
    max_bytes: int = 20 * 1024 * 1024
    retry_for: float = 3 * 86400.0
    lease: float = 120.0  # longer than one fetch with its in-call retries can take
    first_backoff: float = 10.0
    max_backoff: float = 3600.0
    idle_poll: float = 30.0  # the longest the fetcher sleeps when nothing wakes it

    @classmethod
    def from_table(cls, table: MediaSettings, *, api_calls: int, max_bytes: int | None = None) -> Self:
        """The policy a channel table's ``media_*`` settings give; the lease covers ``api_calls``
        provider calls of ``api_timeout`` each (a lookup and the download, say) with a minute of room.
        ``max_bytes`` overrides ``media_max_bytes`` for a provider with a fixed limit."""
        return cls(
            concurrency=table.media_concurrency,
            max_bytes=table.media_max_bytes if max_bytes is None else max_bytes,
            retry_for=table.media_retry_for,
            first_backoff=table.media_first_backoff,
            max_backoff=table.media_max_backoff,
            lease=table.api_timeout * api_calls + 60.0,
        )


class MediaSettings(Protocol):
    """The media settings a channel's table carries (read-only, so frozen pydantic tables fit)."""

    @property
    def media_concurrency(self) -> int: ...
    @property
    def media_max_bytes(self) -> int: ...
    @property
    def media_retry_for(self) -> float: ...
    @property
    def media_first_backoff(self) -> float: ...
    @property
    def media_max_backoff(self) -> float: ...
    @property
    def api_timeout(self) -> float: ...


class MediaFetcher:
    """Fetches one channel's queued media with ``download``."""

    def __init__(self, channel: str, policy: MediaPolicy, *, now: Now | None = None) -> None:
        self.channel = channel
        self.policy = policy
        self.now = now or _utcnow
        self._queue: MediaQueue | None = None
        self._metrics: ChannelMetrics | None = None
        self._download: Download | None = None
        self._wake = asyncio.Event()
        self._in_flight: set[str] = set()

    def bind(self, queue: MediaQueue, metrics: ChannelMetrics | None = None) -> None:
        self._queue = queue
        self._metrics = metrics

    def start(self, download: Download) -> None:
        self._download = download

    @property
    def queue(self) -> MediaQueue:
        if self._queue is None:
            raise RuntimeError("media fetcher is not bound to a queue")
        return self._queue

    async def enqueue(self, fetches: Sequence[MediaFetch]) -> None:
        """Durably queue fetches of committed messages (before the channel is answered)."""
        if fetches:
            await self.queue.enqueue(fetches)
            self._wake.set()

    async def run_once(self) -> int:
        """Claim what is due and fetch it (at most ``concurrency`` at a time); returns how many."""
        due = await self.queue.claim(self.now(), self.policy.concurrency * 4, self.policy.lease)
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
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the wait completes, and the fetcher would outlive the shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.policy.idle_poll):
                    await self._wake.wait()

    async def _fetch(self, fetch: MediaFetch) -> None:
        self._in_flight.add(fetch.key)
        try:
            if self._download is None:
                raise RuntimeError("media fetcher is not started")
            try:
                media = await self._download(fetch)
            except MediaGone as exc:
                await self._failed(fetch, str(exc), permanent=True)
                return
            except MediaUnavailable as exc:
                await self._failed(fetch, str(exc), permanent=False)
                return
            except Exception as exc:
                logger.exception("%s media %s: fetch failed", self.channel, fetch.key)
                await self._failed(fetch, f"{type(exc).__name__}", permanent=False)
                return
            name = media.filename or fetch.name or _default_name(fetch.ref, media.content_type)
            await self.queue.done(fetch.key, media.data, content_type=media.content_type, name=name)
            logger.info("%s media %s fetched (%d bytes)", self.channel, fetch.key, len(media.data))
        finally:
            self._in_flight.discard(fetch.key)

    async def _failed(self, fetch: MediaFetch, error: str, *, permanent: bool) -> None:
        now = self.now()
        pause = min(self.policy.first_backoff * 2 ** max(fetch.attempts - 1, 0), self.policy.max_backoff)
        retry_at = now + timedelta(seconds=pause)
        if permanent or retry_at > fetch.created_at + timedelta(seconds=self.policy.retry_for):
            logger.warning(
                "%s media %s: giving up after %d attempts: %s", self.channel, fetch.key, fetch.attempts, error
            )
            await self.queue.failed(fetch.key, error, retry_at=None)
            if self._metrics is not None:
                self._metrics.event("media_failed", inbox=fetch.inbox)
        else:
            logger.info(
                "%s media %s: attempt %d failed (%s); next in %.0f s",
                self.channel,
                fetch.key,
                fetch.attempts,
                error,
                pause,
            )
            await self.queue.failed(fetch.key, error, retry_at=retry_at)

    @contextlib.asynccontextmanager
    async def running(self, download: Download) -> AsyncIterator[None]:
        """Run the fetch loop in a task for the duration of the block."""
        self.start(download)
        task = asyncio.create_task(self.run(), name=f"ticketgate-{self.channel}-media")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def start_fetcher(ctx: ChannelContext, channel: str, policy: MediaPolicy, download: Download) -> MediaFetcher:
    """A fetcher bound to the channel's media queue, downloading with ``download`` and run under
    ``ctx.spawn`` for the gateway's lifetime; the intake hands it what it commits (``enqueue``)."""
    fetcher = MediaFetcher(channel, policy, now=ctx.clock.now)
    fetcher.bind(ctx.media, ctx.metrics)
    fetcher.start(download)
    ctx.spawn("media", fetcher.run)
    return fetcher


def _default_name(ref: str, content_type: str) -> str:
    extension = mimetypes.guess_extension(content_type) or ""
    return f"{ref[:64]}{extension}"
