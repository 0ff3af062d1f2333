"""Telegram bots: the webhook at ``POST /telegram/{inbox}``, or ``getUpdates`` long-polling.

Webhook: Telegram sends ``X-Telegram-Bot-Api-Secret-Token`` with the value given to
``setWebhook``; it is compared in constant time with the inbox's token (two during a rotation)
before the body is read. The body is read within ``max_body_bytes`` and handed to the pipeline;
Telegram gets 200 only once the update is stored (or understood as nothing to store), 400 for a
body that is not JSON (Telegram drops it), and 503 with ``Retry-After`` when the store cannot take
it now (Telegram retries any non-2xx). The store gets ``ingest_timeout`` seconds; a slower commit
is not cancelled (the retry finds it as a duplicate) but answered 503.

Polling (``mode = "polling"``): a supervised task asks ``getUpdates`` from the durable offset in the
channel state and advances it (compare-and-set) only past updates that are stored. The webhook is
not deleted automatically: while one is set, Telegram refuses getUpdates (409) and the poller says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Self

import orjson
from aiohttp import web

from connectors.base import WebhookIntake, any_secret_matches, ingest_capturing, read_webhook, text_ok
from connectors.media import MediaFetcher, MediaPolicy, start_fetcher
from connectors.telegram.api import BotApi, BotApiError
from connectors.telegram.media import downloader, fetches_for
from connectors.telegram.settings import TelegramSettings
from core.channel import ChannelContext, ChannelEndpoint
from core.http import envelope_headers, header_bytes
from core.model import IngestResult, Outcome, RawEnvelope
from core.settings import Settings, revealed_all
from normalizers.telegram import CHANNEL, MAX_DOWNLOAD_BYTES, normalize

logger = logging.getLogger(__name__)

PREFIX = f"/{CHANNEL}"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 - a header name
OFFSET_KEY = "offset:{inbox}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Bot:
    """One configured bot; ``secrets`` are SHA-256 digests, so every comparison has one length."""

    inbox: str
    tenant: str
    mode: str
    fetch_media: bool
    token: str = field(repr=False)
    secrets: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def bot_id(self) -> str:
        """The public part of the token (the bot's user id)."""
        return self.token.partition(":")[0]

    def accepts(self, offered: str | None) -> bool:
        """Whether ``offered`` is one of the secret tokens; compares with every one, never stopping early."""
        digest = hashlib.sha256(header_bytes(offered or "")).digest()
        return any_secret_matches(self.secrets, lambda known: known, digest) and offered is not None


class TelegramConnector:
    """Mounts ``/telegram/{inbox}`` and starts the pollers and the media fetcher; no per-request state."""

    def __init__(self, table: TelegramSettings, bots: Mapping[str, Bot]) -> None:
        self.table = table
        self.bots = dict(bots)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        table = settings.channel(CHANNEL, TelegramSettings)
        if table is None:
            return None
        bots: dict[str, Bot] = {}
        for inbox, config in table.inboxes.items():
            where = f"channels.{CHANNEL}.inboxes.{inbox}"
            token = settings.required(config.bot_token, key=f"{where}.bot_token",
                                      why="the Bot API cannot be called")
            secrets: tuple[str, ...] = ()
            if config.mode == "webhook":
                secret = settings.required(config.secret_token, key=f"{where}.secret_token",
                                           why="the webhook cannot be verified")
                secrets = (secret, *revealed_all(config.previous_secret_token))
            bots[inbox] = Bot(
                inbox=inbox,
                tenant=settings.inbox(inbox, key=where).tenant,
                mode=config.mode,
                fetch_media=config.fetch_media,
                token=token,
                secrets=tuple(hashlib.sha256(s.encode()).digest() for s in secrets),
            )
        return cls(table, bots)

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        """The webhook URL given to setWebhook, or the polling a bot does instead."""
        return [
            ChannelEndpoint(inbox=inbox, kind="webhook", address=f"{base_url}{PREFIX}/{inbox}")
            if bot.mode == "webhook"
            else ChannelEndpoint(inbox=inbox, kind="polling", address=f"getUpdates on {self.table.api_base}")
            for inbox, bot in self.bots.items()
        ]

    def setup(self, ctx: ChannelContext) -> None:
        table = self.table
        http = ctx.http(table.api_base, timeout=table.api_timeout)
        apis = {inbox: BotApi(http, bot.token, timeout=table.api_timeout) for inbox, bot in self.bots.items()}
        fetcher = None
        fetching = {inbox: api for inbox, api in apis.items() if self.bots[inbox].fetch_media}
        if fetching:
            policy = MediaPolicy(
                concurrency=table.media_concurrency,
                max_bytes=MAX_DOWNLOAD_BYTES,
                retry_for=table.media_retry_for,
                first_backoff=table.media_first_backoff,
                max_backoff=table.media_max_backoff,
                lease=table.api_timeout * 2 + 60.0,  # getFile plus a 20 MB download, with room
            )
            fetcher = start_fetcher(ctx, CHANNEL, policy, downloader(fetching, max_bytes=MAX_DOWNLOAD_BYTES))
        intake = Intake(ctx, fetcher, frozenset(fetching))
        webhook = Webhook(ctx, self.bots, intake, table)
        sub = web.Application()
        sub.router.add_post("/{inbox}", webhook.handle)
        sub.on_cleanup.append(webhook.drain)
        ctx.add_app(PREFIX, sub)
        for inbox, bot in self.bots.items():
            if bot.mode == "polling":
                poller = Poller(ctx, bot, apis[inbox], intake, table)
                ctx.spawn(f"poll-{inbox}", poller.run)


class Intake:
    """Hands one update to the pipeline and, once it is stored, queues its media."""

    def __init__(self, ctx: ChannelContext, fetcher: MediaFetcher | None, fetching: frozenset[str]) -> None:
        self._ctx = ctx
        self._fetcher = fetcher
        self._fetching = fetching  # the inboxes whose bots fetch media

    def envelope(self, bot: Bot, body: bytes, *, mode: str, headers: Mapping[str, str] | None = None,
                 remote: str | None = None, content_type: str | None = None) -> RawEnvelope:
        return RawEnvelope(
            channel=CHANNEL,
            tenant=bot.tenant,
            inbox=bot.inbox,
            body=body,
            received_at=self._ctx.clock.now(),
            content_type=content_type,
            headers=headers or {},
            # The secret token proved the webhook call; polling asked Telegram itself.
            signature_verified=True,
            remote=remote,
            meta={"bot_id": bot.bot_id, "mode": mode},
        )

    async def __call__(self, envelope: RawEnvelope) -> IngestResult:
        result, produced = await ingest_capturing(self._ctx.ingest, envelope, normalize)
        if not result.stored:
            return result
        if not produced and result.outcome is Outcome.ACCEPTED:
            self._ctx.metrics.event("update_ignored", inbox=envelope.inbox)
        # Also for a duplicate: the first delivery may have been committed by a process that died
        # before it queued the media; the queue is insert-if-absent.
        if self._fetcher is not None and produced and envelope.inbox in self._fetching:
            await self._fetcher.enqueue(fetches_for(produced, now=self._ctx.clock.now()))
        return result


class Webhook:
    def __init__(
        self, ctx: ChannelContext, bots: Mapping[str, Bot], intake: Intake, table: TelegramSettings
    ) -> None:
        self._ctx = ctx
        self._bots = {inbox: bot for inbox, bot in bots.items() if bot.mode == "webhook"}
        self._intake = intake
        self._limit = min(table.max_body_bytes, ctx.settings.server.max_body_bytes)
        self._answers = WebhookIntake(CHANNEL, table.ingest_timeout, what="update")

    async def handle(self, request: web.Request) -> web.Response:
        bot = self._bots.get(request.match_info["inbox"])
        if bot is None:
            return web.Response(status=404, text="no webhook bot for this inbox")
        offered = request.headers.get(SECRET_HEADER)
        if not bot.accepts(offered):
            logger.warning("telegram %s: %s secret token from %s; refused", bot.inbox,
                           "wrong" if offered is not None else "missing", request.remote)
            self._ctx.metrics.refused("signature", inbox=bot.inbox)
            return web.Response(status=401, text="secret token required")
        body = await read_webhook(request, self._limit, log_as=f"telegram {bot.inbox}",
                                   refused=partial(self._ctx.metrics.refused, inbox=bot.inbox))
        if isinstance(body, web.Response):
            return body
        headers = envelope_headers(request, without=SECRET_HEADER)
        envelope = self._intake.envelope(
            bot, body, mode="webhook", headers=headers, remote=request.remote,
            content_type=request.headers.get("Content-Type"),
        )
        # Shielded: cancelling a commit half-way helps nobody; Telegram's retry finds it stored.
        return await self._answers.respond(self._intake(envelope), name=bot.inbox, ok=text_ok())

    async def drain(self, app: web.Application) -> None:
        """Let ingests that outlived their answer finish before the store closes."""
        await self._answers.drain(app)


class Poller:
    """``getUpdates`` for one bot, from the durable offset; the offset moves only past stored updates."""

    def __init__(
        self, ctx: ChannelContext, bot: Bot, api: BotApi, intake: Intake, table: TelegramSettings
    ) -> None:
        self._ctx = ctx
        self._bot = bot
        self._api = api
        self._intake = intake
        self._table = table
        self._key = OFFSET_KEY.format(inbox=bot.inbox)

    async def run_once(self) -> float:
        """One getUpdates round; the pause before the next (0 when everything was stored)."""
        current = await self._ctx.state.get(self._key)
        offset = int(current) if current else None
        try:
            updates = await self._api.get_updates(
                offset, hold=self._table.poll_timeout, limit=self._table.poll_limit
            )
        except BotApiError as exc:
            if exc.error_code == 409:
                logger.error("telegram %s: getUpdates refused (%s); delete the webhook or stop the other "
                             "poller of this bot", self._bot.inbox, exc.description)
                return 30.0
            logger.warning("telegram %s: getUpdates failed: %s", self._bot.inbox, exc)
            return exc.retry_after or 5.0
        if not updates:
            # Without a long-poll hold an empty answer comes at once: do not spin against the API.
            return 0.0 if self._table.poll_timeout else 1.0
        pause, stored_upto = 0.0, None
        for update in updates:
            update_id = update.get("update_id")
            envelope = self._intake.envelope(self._bot, orjson.dumps(update), mode="polling")
            result = await self._intake(envelope)
            if not result.stored:
                # Stop here: the offset must not pass an update that is not stored.
                logger.warning("telegram %s: cannot store a polled update now: %s", self._bot.inbox,
                               result.reason)
                pause = result.retry_after or 5.0
                break
            if isinstance(update_id, int):
                stored_upto = update_id
        if stored_upto is not None:
            following = str(stored_upto + 1).encode()
            advanced = await self._ctx.state.compare_and_set(self._key, current, following)
            if not advanced:
                logger.info("telegram %s: another instance moved the offset; re-reading", self._bot.inbox)
        return pause

    async def run(self) -> None:
        while True:
            pause = await self.run_once()
            if pause:
                await asyncio.sleep(pause)
