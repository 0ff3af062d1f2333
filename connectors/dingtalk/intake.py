"""From a verified robot message to a stored one (shared by the HTTP callback and Stream mode):
the pipeline within the deadline, then the media queued and the directory email linked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from aiohttp import web

from connectors.base import WebhookIntake, ingest_capturing
from connectors.dingtalk.api import DingTalkApi, DingTalkError
from connectors.dingtalk.bot import Bot
from connectors.dingtalk.settings import DingTalkSettings
from connectors.media import MediaFetcher, fetches_for
from core.channel import ChannelContext, Clock
from core.model import CanonicalMessage, Identity, IdentityKind, IngestResult, Outcome, RawEnvelope
from normalizers.dingtalk import CHANNEL, normalize

logger = logging.getLogger(__name__)


class Directory:
    """The directory's work email per employee, cached for ``ttl``; one lookup in flight each."""

    MAX_ENTRIES = 50_000
    FAILURE_TTL = 300.0

    def __init__(self, apis: Mapping[str, DingTalkApi], *, ttl: float, clock: Clock) -> None:
        self._apis = apis
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._in_flight: dict[tuple[str, str], asyncio.Task[str | None]] = {}

    async def email(self, inbox: str, staff_id: str) -> str | None:
        key = (inbox, staff_id)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock.monotonic():
            return cached[1]
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key))
            self._in_flight[key] = task
            task.add_done_callback(lambda _: self._in_flight.pop(key, None))
        return await asyncio.shield(task)

    async def _fetch(self, key: tuple[str, str]) -> str | None:
        api = self._apis.get(key[0])
        email, ttl = None, self._ttl
        if api is not None:
            try:
                email = await api.employee_email(key[1])
            except DingTalkError as exc:
                logger.info("dingtalk %s: directory lookup failed: %s", key[0], exc)
                ttl = self.FAILURE_TTL
        if len(self._cache) >= self.MAX_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (self._clock.monotonic() + ttl, email)
        return email

    async def close(self) -> None:
        for task in list(self._in_flight.values()):
            task.cancel()


class Intake:
    def __init__(
        self,
        ctx: ChannelContext,
        bots: Mapping[str, Bot],
        table: DingTalkSettings,
        directory: Directory,
        fetcher: MediaFetcher | None,
    ) -> None:
        self._ctx = ctx
        self._bots = bots
        self._table = table
        self._directory = directory
        self._fetcher = fetcher
        # The shielded, bounded ingest (and directory links); the HTTP callback answers with it too.
        self.work = WebhookIntake(CHANNEL, table.ingest_timeout, what="callback")

    async def deliver(
        self,
        bot: Bot,
        body: bytes,
        *,
        transport: str,
        headers: Mapping[str, str] | None = None,
        remote: str | None = None,
        wait: bool = False,
    ) -> IngestResult:
        """Ingest one robot message. ``wait``: await the commit however long it takes (Stream mode,
        where the acknowledgement waits for it) instead of answering RETRY after ``ingest_timeout``."""
        envelope = RawEnvelope(
            channel=CHANNEL,
            tenant=bot.tenant,
            inbox=bot.inbox,
            body=body,
            received_at=self._ctx.clock.now(),
            content_type="application/json",
            headers=headers or {},
            signature_verified=True,
            remote=remote,
            meta={"transport": transport},
        )
        # Shielded: cancelling a commit half-way helps nobody; a retry finds it stored.
        return await self.work.submit(self._ingest(envelope), name=bot.inbox, wait=wait)

    async def _ingest(self, envelope: RawEnvelope) -> IngestResult:
        result, produced = await ingest_capturing(self._ctx.ingest, envelope, normalize)
        if not result.stored:
            return result
        if not produced:
            self._ctx.metrics.event("message_ignored", inbox=envelope.inbox)
            return result
        bot = self._bots[envelope.inbox]
        if self._fetcher is not None and bot.fetch_media:
            try:
                await self._fetcher.enqueue(fetches_for(produced, now=self._ctx.clock.now()))
            except Exception:
                logger.exception("dingtalk %s: queueing the media of a stored message failed", envelope.inbox)
                return IngestResult(outcome=Outcome.RETRY, reason="media not queued", retry_after=5.0)
        if bot.directory_emails:
            # A slow directory goes on in the background; the next message finds it cached.
            with contextlib.suppress(TimeoutError):
                await self.work.shielded(self._link(bot, produced[0]), self._table.directory_timeout)
        return result

    async def _link(self, bot: Bot, message: CanonicalMessage) -> None:
        owner = next((i for i in message.identities if i.kind == IdentityKind.DINGTALK_STAFF_ID), None)
        if owner is None:
            return
        staff_id = owner.value.split(":", 1)[1]
        try:
            email = await self._directory.email(bot.inbox, staff_id)
            if email is None:
                return
            await self._ctx.identities.link_verified(
                tenant=message.tenant,
                owner=owner,
                identity=Identity(kind=IdentityKind.EMAIL, value=email, verified=True),
                evidence={"source": "dingtalk directory", "app_key": bot.app_key, "staff_id": staff_id},
            )
        except Exception:
            logger.exception("dingtalk %s: linking the directory email failed", bot.inbox)

    async def drain(self, app: web.Application | None = None) -> None:
        await self._directory.close()
        await self.work.drain(app)
