"""LINE Messaging API webhooks at ``POST /line/{inbox}``.

LINE signs every delivery: ``X-Line-Signature`` is the base64 HMAC-SHA256 of the raw body with the
channel secret. A request without the header is refused (401) before its body is read; the body
is read within ``max_body_bytes`` and its signature compared in constant time with every configured
secret (two during a rotation) before anything parses it. A delivery holds several events: all go
to the pipeline in one envelope, and LINE gets 200 only once they are stored (or understood as
nothing to store: the console's verify request, event types that are not tickets), 400 for a body
that is not a webhook object, 503 when the store cannot take it now. The store gets
``ingest_timeout`` seconds (LINE wants an answer within about 2 s); a slower commit is not
cancelled, and LINE's redelivery (when enabled in the console) finds it as a duplicate.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Self, cast

import orjson
from aiohttp import web

from connectors.base import WebhookIntake, any_secret_matches, ingest_capturing, read_webhook, text_ok
from connectors.line.api import LineApi
from connectors.line.media import downloader
from connectors.line.sender import LineSender
from connectors.line.settings import LineSettings
from connectors.media import MediaFetcher, MediaPolicy, fetches_for, start_fetcher
from core.channel import ChannelContext, ChannelEndpoint, SenderSpec
from core.errors import ConfigError
from core.http import envelope_headers, header_bytes
from core.model import IngestResult, Outcome, RawEnvelope
from core.settings import Settings, revealed
from normalizers.line import CHANNEL, Delivery, is_redelivery, is_verify_request, normalize

logger = logging.getLogger(__name__)

PREFIX = f"/{CHANNEL}"
SIGNATURE_HEADER = "X-Line-Signature"


def signature(secret: bytes, body: bytes) -> bytes:
    """What LINE sends in ``X-Line-Signature`` for ``body``: base64(HMAC-SHA256(secret, body))."""
    return base64.b64encode(hmac.new(secret, body, hashlib.sha256).digest())


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    """One configured LINE Official Account (Messaging API channel)."""

    inbox: str
    tenant: str
    fetch_media: bool
    reply_with_token: bool
    secrets: tuple[bytes, ...] = field(repr=False)
    token: str | None = field(default=None, repr=False)

    def verifies(self, body: bytes, offered: str) -> bool:
        """Whether ``offered`` signs ``body`` with one of the secrets; compares with every one."""
        given = header_bytes(offered.strip())
        return any_secret_matches(self.secrets, lambda secret: signature(secret, body), given)


class LineConnector:
    """Mounts ``/line/{inbox}``, the media fetcher and the sender; no per-request state."""

    def __init__(self, table: LineSettings, accounts: Mapping[str, Account]) -> None:
        self.table = table
        self.accounts = dict(accounts)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        table = settings.channel(CHANNEL, LineSettings)
        if table is None:
            return None
        accounts: dict[str, Account] = {}
        for inbox, config in table.inboxes.items():
            where = f"channels.{CHANNEL}.inboxes.{inbox}"
            secret = settings.required(config.channel_secret, key=f"{where}.channel_secret",
                                       why="webhooks cannot be verified")
            token = revealed(config.channel_access_token)
            if not token and config.fetch_media:
                raise ConfigError("is required to fetch media (or set fetch_media = false)",
                                  file=settings.source, key=f"{where}.channel_access_token")
            previous = revealed(config.previous_channel_secret)
            accounts[inbox] = Account(
                inbox=inbox,
                tenant=settings.inbox(inbox, key=where).tenant,
                fetch_media=config.fetch_media,
                reply_with_token=config.reply_with_token,
                secrets=tuple(s.encode() for s in (secret, previous) if s),
                token=token or None,
            )
        return cls(table, accounts)

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        """The webhook URL to enter in the LINE Developers console."""
        return [
            ChannelEndpoint(inbox=inbox, kind="webhook", address=f"{base_url}{PREFIX}/{inbox}")
            for inbox in self.accounts
        ]

    def setup(self, ctx: ChannelContext) -> None:
        table = self.table
        api_http = ctx.http(table.api_base, timeout=table.api_timeout)
        data_http = ctx.http(table.data_api_base, timeout=table.api_timeout)
        apis = {
            inbox: LineApi(api_http, data_http, account.token, timeout=table.api_timeout)
            for inbox, account in self.accounts.items() if account.token
        }
        fetching = {inbox: api for inbox, api in apis.items() if self.accounts[inbox].fetch_media}
        fetcher = None
        if fetching:
            download = downloader(fetching, max_bytes=table.media_max_bytes)
            fetcher = start_fetcher(ctx, CHANNEL, MediaPolicy.from_table(table, api_calls=2), download)
        if apis:
            with_token = {inbox: self.accounts[inbox].reply_with_token for inbox in apis}
            sender = LineSender(apis, reply_with_token=with_token, token_ttl=table.reply_token_ttl,
                                now=ctx.clock.now)
            # Push with a retry key is idempotent; a reply token is not (LINE has no key for it).
            ctx.add_sender(SenderSpec(sender=sender, rate=table.send_rate, burst=max(1, int(table.send_rate)),
                                      idempotent=not any(with_token.values())))
        webhook = Webhook(ctx, self.accounts, fetcher, frozenset(fetching), table)
        sub = web.Application()
        sub.router.add_post("/{inbox}", webhook.handle)
        sub.on_cleanup.append(webhook.drain)
        ctx.add_app(PREFIX, sub)


class Webhook:
    def __init__(
        self, ctx: ChannelContext, accounts: Mapping[str, Account], fetcher: MediaFetcher | None,
        fetching: frozenset[str], table: LineSettings,
    ) -> None:
        self._ctx = ctx
        self._accounts = accounts
        self._fetcher = fetcher
        self._fetching = fetching
        self._limit = min(table.max_body_bytes, ctx.settings.server.max_body_bytes)
        self._intake = WebhookIntake(CHANNEL, table.ingest_timeout)

    async def handle(self, request: web.Request) -> web.Response:
        account = self._accounts.get(request.match_info["inbox"])
        if account is None:
            return web.Response(status=404, text="no LINE channel for this inbox")
        offered = request.headers.get(SIGNATURE_HEADER)
        if not offered:
            return self._refuse(account, request, "missing")
        body = await read_webhook(request, self._limit, log_as=f"line {account.inbox}",
                                   refused=partial(self._ctx.metrics.refused, inbox=account.inbox))
        if isinstance(body, web.Response):
            return body
        if not account.verifies(body, offered):
            return self._refuse(account, request, "wrong")
        # Verified: reading it now is safe. A body that is not JSON is the normalizer's 400.
        delivery = _peek(body)
        headers = envelope_headers(request, without=SIGNATURE_HEADER)
        envelope = RawEnvelope(
            channel=CHANNEL,
            tenant=account.tenant,
            inbox=account.inbox,
            body=body,
            received_at=self._ctx.clock.now(),
            content_type=request.headers.get("Content-Type"),
            headers=headers,
            signature_verified=True,
            retry=1 if delivery is not None and is_redelivery(delivery) else 0,
            remote=request.remote,
            meta={"destination": delivery.get("destination")} if delivery is not None else {},
        )
        # LINE's redelivery (when enabled) finds a commit that outlived its answer as a duplicate.
        return await self._intake.respond(self._ingest(envelope, delivery), name=account.inbox, ok=text_ok())

    def _refuse(self, account: Account, request: web.Request, what: str) -> web.Response:
        logger.warning("line %s: %s X-Line-Signature from %s; refused", account.inbox, what, request.remote)
        self._ctx.metrics.refused("signature", inbox=account.inbox)
        return web.Response(status=401, text="signature required")

    async def _ingest(self, envelope: RawEnvelope, delivery: Delivery | None) -> IngestResult:
        result, produced = await ingest_capturing(self._ctx.ingest, envelope, normalize)
        if not result.stored:
            return result
        if delivery is not None and result.outcome is Outcome.ACCEPTED:
            events = delivery.get("events")
            if is_verify_request(delivery):
                self._ctx.metrics.event("verify_request", inbox=envelope.inbox)
            elif isinstance(events, list) and len(events) > len(produced):
                for _ in range(len(events) - len(produced)):
                    self._ctx.metrics.event("event_ignored", inbox=envelope.inbox)
        # Also for a duplicate: the first delivery may have been committed by a process that died
        # before it queued the media; the queue is insert-if-absent.
        if self._fetcher is not None and produced and envelope.inbox in self._fetching:
            await self._fetcher.enqueue(fetches_for(produced, now=self._ctx.clock.now()))
        return result

    async def drain(self, app: web.Application) -> None:
        """Let ingests that outlived their answer finish before the store closes."""
        await self._intake.drain(app)


def _peek(body: bytes) -> Delivery | None:
    """The verified body as an object with an events list, or ``None`` (the normalizer refuses it)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and isinstance(data.get("events"), list):
        return cast(Delivery, data)
    return None

