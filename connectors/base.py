"""What every connector shares: the seam (``core.channel``) and the ingest callable it hands its handlers.

A connector is built from the settings (``from_settings``; ``None`` when the channel is not
configured, :class:`core.errors.ConfigError` when it is configured wrongly: fail closed) and set up
with a :class:`~core.channel.ChannelContext`. It verifies, builds a
:class:`~core.model.RawEnvelope` and awaits ``ctx.ingest``; it maps the
:class:`~core.model.IngestResult` to the channel's own answer and never answers success unless
``result.stored``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import aiohttp
from aiohttp import web

from core.channel import ChannelContext, ChannelMetrics, Clock, Connector, Refusal
from core.errors import TooLarge
from core.http import read_body, retry_after_value
from core.model import CanonicalMessage, IngestResult, Outcome, RawEnvelope
from normalizers.base import Normalizer

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S")
K = TypeVar("K")

Ingest = Callable[[RawEnvelope, Normalizer], Awaitable[IngestResult]]
"""``ctx.ingest`` as a handler holds it: the envelope and the normalizer to run."""


def any_secret_matches(secrets: Iterable[S], expected: Callable[[S], bytes], given: bytes) -> bool:
    """Whether ``given`` equals ``expected(secret)`` for one of ``secrets`` (the current and the
    previous one during a rotation). Compares in constant time with every secret, never stopping
    at a match, so the time taken tells neither which matched nor whether one did."""
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(expected(secret), given)
    return matched

__all__ = [
    "ChannelContext", "ChannelMetrics", "Connector", "Ingest", "Reconnect", "WebhookIntake",
    "ingest_capturing", "keep_connected", "retry_response", "text_ok",
]


async def ingest_capturing(
    ingest: Ingest, envelope: RawEnvelope, normalize: Normalizer
) -> tuple[IngestResult, list[CanonicalMessage]]:
    """``ingest(envelope, normalize)`` and the messages ``normalize`` produced, for the work that
    follows the commit (queueing media, counting ignored events)."""
    produced: list[CanonicalMessage] = []

    def capturing(raw: RawEnvelope) -> Sequence[CanonicalMessage]:
        messages = normalize(raw)
        produced.extend(messages)
        return messages

    return await ingest(envelope, capturing), produced


async def read_webhook(
    request: web.Request, limit: int, *, log_as: str, refused: Callable[[Refusal], None]
) -> bytes | web.Response:
    """A webhook call's body; past ``limit`` bytes, the 413 to answer instead, logged as ``log_as``
    (the channel and its inbox or app) and counted by ``refused``."""
    try:
        return await read_body(request, limit)
    except TooLarge as exc:
        logger.warning("%s: refused a body from %s: %s", log_as, request.remote, exc.reason)
        refused("size")
        return web.Response(status=413, text="too large")


class WebhookIntake:
    """Ingests that may outlive their webhook answer, and the plain-text answer most providers want.

    A provider gives up on a webhook after a few seconds and redelivers. The commit runs as its own
    task, shielded: the handler waits ``within`` seconds and then answers RETRY (503 +
    ``Retry-After``), but the commit is never cancelled half-way; the provider's redelivery finds it
    stored, as a duplicate. :meth:`drain` (an ``on_cleanup`` hook) lets such commits finish before
    the store closes.
    """

    def __init__(
        self, channel: str, within: float, *, what: str = "delivery", drain_for: float = 10.0
    ) -> None:
        self.channel = channel
        self.within = within
        self._what = what  # "delivery", "update", "push": the provider's word, for the logs
        self._drain_for = drain_for
        self._pending: set[asyncio.Future[Any]] = set()

    async def shielded(self, work: Awaitable[T], within: float | None) -> T:
        """``work`` as a task awaited for at most ``within`` seconds (``None``: however long it takes);
        raises ``TimeoutError`` when it is not done in time, while the task runs on and is drained at
        cleanup. Cancelling the caller does not cancel the task either."""
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation of the handler.
        async with asyncio.timeout(within):
            return await asyncio.shield(task)

    async def submit(self, work: Awaitable[IngestResult], *, name: str, wait: bool = False) -> IngestResult:
        """``work`` (``ctx.ingest`` and whatever must follow the commit, e.g. queueing media) within the
        intake's time (``wait``: however long it takes, for a transport whose acknowledgement waits for
        the commit); a RETRY result when it is not done in time or fails after the commit."""
        try:
            return await self.shielded(work, None if wait else self.within)
        except TimeoutError:
            logger.warning("%s %s: store did not answer within %.1f s; answering 503", self.channel, name,
                           self.within)
            return IngestResult(outcome=Outcome.RETRY, reason=f"the {self._what} was not stored within "
                                f"{self.within:g} s", retry_after=5.0)
        except Exception:
            logger.exception("%s %s: handling the %s failed; answering 503", self.channel, name, self._what)
            return IngestResult(outcome=Outcome.RETRY, reason=f"the {self._what} could not be handled now",
                                retry_after=5.0)

    def answer(
        self, result: IngestResult, *, name: str, ok: Callable[[], web.Response],
        rejected_headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        """The usual webhook answer: ``ok()`` once stored (never before), the rejection's 4xx with its
        reason as text (and ``rejected_headers``, e.g. Slack's no-retry), 503 ``retry`` with
        ``Retry-After`` otherwise."""
        if result.stored:
            return ok()
        if result.outcome is Outcome.REJECTED:
            logger.info("%s %s: %s rejected: %s", self.channel, name, self._what, result.reason)
            status = result.status if result.status is not None and 400 <= result.status < 500 else 400
            return web.Response(status=status, text=result.reason or "rejected", headers=rejected_headers)
        logger.warning("%s %s: cannot store the %s now: %s", self.channel, name, self._what, result.reason)
        return retry_response(result.retry_after or 5.0)

    async def respond(
        self, work: Awaitable[IngestResult], *, name: str, ok: Callable[[], web.Response]
    ) -> web.Response:
        """:meth:`submit` then :meth:`answer`."""
        return self.answer(await self.submit(work, name=name), name=name, ok=ok)

    async def drain(self, app: web.Application | None = None) -> None:
        """Let work that outlived its answer finish before the store closes (an ``on_cleanup`` hook)."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=self._drain_for)


def retry_response(seconds: float) -> web.Response:
    """503 ``retry`` with ``Retry-After``: the provider redelivers later."""
    return web.Response(status=503, text="retry", headers={"Retry-After": retry_after_value(seconds)})


def text_ok(text: str = "ok") -> Callable[[], web.Response]:
    """An ``ok`` for :meth:`WebhookIntake.answer`: 200 with ``text``."""
    return lambda: web.Response(status=200, text=text)


class AppToken:
    """An app's access token from a provider's token endpoint, kept until shortly before it expires.

    ``fetch`` returns the token and its lifetime in seconds; it is kept for that lifetime less five
    minutes (at least 30 s), so a call never goes out with a token about to lapse. One fetch at a
    time: concurrent callers of an expired token wait for the same refresh. ``forget`` drops it
    when the provider refuses it, so the next caller fetches a new one.
    """

    def __init__(self, fetch: Callable[[], Awaitable[tuple[str, float]]], clock: Clock) -> None:
        self._fetch = fetch
        self._clock = clock
        self._token: tuple[str, float] | None = None
        self._refreshing = asyncio.Lock()

    async def get(self) -> str:
        cached = self._token
        if cached is not None and cached[1] > self._clock.monotonic():
            return cached[0]
        async with self._refreshing:
            cached = self._token
            if cached is not None and cached[1] > self._clock.monotonic():
                return cached[0]
            token, lifetime = await self._fetch()
            self._token = (token, self._clock.monotonic() + max(lifetime - 300, 30))
            return token

    def forget(self) -> None:
        self._token = None


class CachedLookup(Generic[K, T]):
    """Values by key from a provider API (a directory's work email), cached for ``ttl`` seconds and,
    after a lookup that raised one of ``failures``, ``None`` for ``failure_ttl`` (a directory that is
    down is not asked again per message). One lookup in flight per key: concurrent messages of one
    author wait for the same call. At most ``max_entries`` are kept, the oldest dropped first."""

    def __init__(
        self,
        fetch: Callable[[K], Awaitable[T | None]],
        *,
        ttl: float,
        clock: Clock,
        failures: tuple[type[Exception], ...],
        what: str,
        failure_ttl: float = 300.0,
        max_entries: int = 50_000,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._failures = failures
        self._what = what
        self._failure_ttl = failure_ttl
        self._max_entries = max_entries
        self._cache: dict[K, tuple[float, T | None]] = {}
        self._in_flight: dict[K, asyncio.Task[T | None]] = {}

    async def get(self, key: K) -> T | None:
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock.monotonic():
            return cached[1]
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(key))
            self._in_flight[key] = task
            task.add_done_callback(lambda _: self._in_flight.pop(key, None))
        # Shielded: one waiter giving up (its request's deadline) does not cancel the others' lookup.
        return await asyncio.shield(task)

    async def _load(self, key: K) -> T | None:
        ttl = self._ttl
        try:
            value = await self._fetch(key)
        except self._failures as exc:
            logger.info("%s: lookup of %r failed: %s", self._what, key, exc)
            value, ttl = None, self._failure_ttl
        if len(self._cache) >= self._max_entries:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (self._clock.monotonic() + ttl, value)
        return value

    async def close(self) -> None:
        """Cancel lookups still in flight (at shutdown)."""
        for task in list(self._in_flight.values()):
            task.cancel()


@dataclass(frozen=True, slots=True, kw_only=True)
class Reconnect:
    """How a connection the gateway opens to a provider (DingTalk's Stream, Feishu's long
    connection) is reopened by :func:`keep_connected`: after a pause that doubles from
    ``first_backoff`` up to ``max_backoff``, back to ``first_backoff`` once a connection held longer
    than ``stable_after`` seconds; each reopening counted as the channel event ``metric``."""

    channel: str  # "dingtalk": the logs' prefix
    what: str  # "Stream connection", "long connection": the provider's word, for the logs
    metric: str  # "stream_reconnect"
    first_backoff: float
    max_backoff: float
    opening_errors: tuple[type[Exception], ...]  # the provider API refusing to open: logged with its text
    stable_after: float = 30.0


async def keep_connected(
    connect: Callable[[], Awaitable[None]],
    policy: Reconnect,
    *,
    inbox: str,
    clock: Clock,
    metrics: ChannelMetrics,
    log: logging.Logger,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> NoReturn:
    """Run ``connect`` (one connection, until it closes or fails) again and again until cancelled,
    pausing by ``policy`` in between. A network error is logged by its type only (its text can
    carry the connection URL and its one-time ticket); any other error propagates, to the
    supervisor that restarts the task (``ctx.spawn``). ``log`` is the channel's logger, so the
    lines keep their channel's logger name."""
    pause = policy.first_backoff
    while True:
        started = clock.monotonic()
        try:
            await connect()
        except policy.opening_errors as exc:
            log.warning("%s %s: opening the %s failed: %s", policy.channel, inbox, policy.what, exc)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("%s %s: %s lost: %s", policy.channel, inbox, policy.what, type(exc).__name__)
        if clock.monotonic() - started > policy.stable_after:
            pause = policy.first_backoff
        metrics.event(policy.metric, inbox=inbox)
        await sleep(pause)
        pause = min(pause * 2, policy.max_backoff)
