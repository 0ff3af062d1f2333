"""From a verified robot message to a stored one (shared by the HTTP callback and Stream mode):
the pipeline within the deadline, then the media queued and the directory email linked."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

from aiohttp import web

from connectors.base import CachedLookup, WebhookIntake, ingest_capturing
from connectors.dingtalk.api import DingTalkApi, DingTalkError
from connectors.dingtalk.bot import Bot
from connectors.dingtalk.settings import DingTalkSettings
from connectors.media import MediaFetcher, fetches_for
from core.channel import ChannelContext, Clock
from core.model import CanonicalMessage, Identity, IdentityKind, IngestResult, Outcome, RawEnvelope
from normalizers.dingtalk import CHANNEL, normalize

logger = logging.getLogger(__name__)


Directory = CachedLookup[tuple[str, str], str]
"""The directory's work email by (inbox, staff id)."""


def directory(apis: Mapping[str, DingTalkApi], *, ttl: float, clock: Clock) -> Directory:
    """Work emails through each bot's DingTalk API, cached for ``ttl``."""

    async def fetch(key: tuple[str, str]) -> str | None:
        api = apis.get(key[0])
        return None if api is None else await api.employee_email(key[1])

    return CachedLookup(fetch, ttl=ttl, clock=clock, failures=(DingTalkError,), what="dingtalk directory")


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
            email = await self._directory.get((bot.inbox, staff_id))
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
