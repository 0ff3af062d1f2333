"""From a verified callback to a stored one: the author's profile, the pipeline within Slack's deadline,
and the files queued after the commit. Shared by the Events API endpoint and Socket Mode."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from connectors.base import WebhookIntake, ingest_capturing
from connectors.media import MediaFetcher, fetches_for
from connectors.slack.api import AUTH_ERRORS, Profile, SlackError, WebApi
from connectors.slack.settings import SlackSettings, policy_of
from connectors.slack.workspace import Workspace
from core.channel import ChannelContext, Clock
from core.model import CanonicalMessage, IngestResult, Outcome, RawEnvelope
from core.settings import Settings
from normalizers.slack import CHANNEL, Author, Callback, Policy, normalize_with, read

logger = logging.getLogger(__name__)


def configure(settings: Settings) -> Callable[[RawEnvelope], Sequence[CanonicalMessage]]:
    """The normalizer under ``settings``: each inbox's followed channels (live ingest and replay)."""
    table = settings.channel(CHANNEL, SlackSettings)
    policies = {inbox: policy_of(config) for inbox, config in (table.inboxes if table else {}).items()}
    return normalize_with(lambda inbox: policies.get(inbox, Policy()))


class Profiles:
    """users.info answers, cached per author for ``ttl``; one call in flight per author.

    A lookup that takes longer than the caller may wait goes on in the background and fills the
    cache for later messages. For ``GIVE_UP_WINDOW`` after such a timeout the author's deliveries go
    on without a profile, even once it has arrived: Slack sends a mention as two events at once and
    retries a slow answer at once, and every copy of one message must carry the same identities
    (a redelivery with other content is quarantined as a reused key). An installation whose token
    lacks the scope is not asked again for ``ttl``.
    """

    MAX_ENTRIES = 50_000
    FAILURE_TTL = 300.0  # a transient failure is not asked again for five minutes
    GIVE_UP_WINDOW = 10.0

    def __init__(self, apis: Mapping[str, WebApi], *, ttl: float, clock: Clock) -> None:
        self._apis = apis
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[tuple[str, str, str], tuple[float, Profile | None]] = {}
        self._in_flight: dict[tuple[str, str, str], asyncio.Task[Profile | None]] = {}
        self._off_until: dict[str, float] = {}
        self._gave_up: dict[tuple[str, str, str], float] = {}

    async def lookup(self, inbox: str, author: Author, within: float) -> Profile | None:
        key = (inbox, author.team, author.user)
        now = self._clock.monotonic()
        gave_up = self._gave_up.get(key)
        if gave_up is not None:
            if now - gave_up < self.GIVE_UP_WINDOW:
                return None
            del self._gave_up[key]
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        if self._off_until.get(inbox, 0.0) > now or inbox not in self._apis:
            return None
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key, author))
            self._in_flight[key] = task
            task.add_done_callback(lambda _: self._in_flight.pop(key, None))
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the handler's cancellation.
            async with asyncio.timeout(within):
                return await asyncio.shield(task)
        except TimeoutError:
            if len(self._gave_up) >= self.MAX_ENTRIES:
                self._gave_up.pop(next(iter(self._gave_up)))
            self._gave_up[key] = self._clock.monotonic()
            return None

    async def _fetch(self, key: tuple[str, str, str], author: Author) -> Profile | None:
        inbox = key[0]
        try:
            profile: Profile | None = await self._apis[inbox].profile(author.user)
            ttl = self._ttl
        except SlackError as exc:
            profile, ttl = None, self.FAILURE_TTL
            if exc.error in AUTH_ERRORS or exc.error == "user_not_found":
                if exc.error != "user_not_found":
                    logger.warning("slack %s: users.info refused (%s); profile emails are off for %.0f s "
                                   "(scopes users:read and users:read.email)", inbox, exc.error, self._ttl)
                    self._off_until[inbox] = self._clock.monotonic() + self._ttl
                ttl = self._ttl
            else:
                logger.info("slack %s: users.info failed: %s", inbox, exc.error)
        if len(self._cache) >= self.MAX_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (self._clock.monotonic() + ttl, profile)
        return profile

    async def close(self) -> None:
        for task in list(self._in_flight.values()):
            task.cancel()


class Intake:
    """One callback into the pipeline, within Slack's deadline; files queued once it is stored."""

    def __init__(
        self, ctx: ChannelContext, workspaces: Mapping[str, Workspace], table: SlackSettings,
        profiles: Profiles, fetcher: MediaFetcher | None,
    ) -> None:
        self._ctx = ctx
        self.workspaces = workspaces
        self._table = table
        self._profiles = profiles
        self._fetcher = fetcher
        self._normalize = configure(ctx.settings)
        # The shielded, bounded ingest; the Events API endpoint answers with it too.
        self.work = WebhookIntake(CHANNEL, table.ingest_timeout, what="callback")

    async def deliver(
        self, ws: Workspace, body: bytes, callback: Callback, *, transport: str, retry: int = 0,
        retry_reason: str | None = None, headers: Mapping[str, str] | None = None, remote: str | None = None,
        content_type: str | None = None,
    ) -> IngestResult:
        """Look the author up, then ingest; RETRY when the store does not answer within the budget."""
        meta: dict[str, Any] = {"transport": transport}
        if retry_reason:
            meta["retry_reason"] = retry_reason
        try:
            reading = read(callback, ws.policy)
        except Exception:  # the normalizer meets it again, and the pipeline quarantines it
            reading = None
        if reading is not None and reading.author is None:
            # One name: the ignored kinds come from the payload, and labels must stay bounded.
            self._ctx.metrics.event("event_ignored", inbox=ws.inbox)
        if reading is not None and reading.author is not None and ws.profile_emails:
            profile = await self._profiles.lookup(ws.inbox, reading.author, self._table.profile_timeout)
            if profile is not None and profile.as_meta():
                meta["profiles"] = {f"{reading.author.team}:{reading.author.user}": profile.as_meta()}
        envelope = RawEnvelope(
            channel=CHANNEL,
            tenant=ws.tenant,
            inbox=ws.inbox,
            body=body,
            received_at=self._ctx.clock.now(),
            content_type=content_type,
            headers=headers or {},
            # The signature verified the request; Socket Mode events come over our authenticated socket.
            signature_verified=True,
            retry=retry,
            remote=remote,
            meta=meta,
        )
        # Shielded: cancelling a commit half-way helps nobody; Slack's retry finds it stored.
        return await self.work.submit(self._ingest(envelope), name=ws.inbox)

    async def _ingest(self, envelope: RawEnvelope) -> IngestResult:
        result, produced = await ingest_capturing(self._ctx.ingest, envelope, self._normalize)
        if not result.stored:
            return result
        ws = self.workspaces[envelope.inbox]
        # Also for a duplicate: the first delivery may have been committed by a process that died
        # before it queued the files; the queue is insert-if-absent.
        if self._fetcher is not None and produced and ws.fetch_files:
            try:
                await self._fetcher.enqueue(fetches_for(produced, now=self._ctx.clock.now()))
            except Exception:
                logger.exception("slack %s: queueing the files of a stored message failed", envelope.inbox)
                return IngestResult(outcome=Outcome.RETRY, reason="files not queued", retry_after=5.0)
        return result

    async def drain(self, app: web.Application) -> None:
        """Let ingests that outlived their answer finish before the store closes."""
        await self._profiles.close()
        await self.work.drain(app)
