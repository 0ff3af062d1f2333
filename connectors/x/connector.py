"""X Account Activity API webhooks at ``/x/{app}``.

``GET /x/{app}?crc_token=...`` is X's challenge-response check (at registration and about hourly):
it is answered ``{"response_token": "sha256=" + base64(HMAC-SHA256(consumer secret, crc_token))}``.

``POST /x/{app}`` carries activities, signed: ``x-twitter-webhooks-signature`` is ``sha256=`` and
the base64 HMAC-SHA256 of the raw body with the consumer secret. A request without it is refused
(401) before its body is read; the body is read within ``max_body_bytes`` and its signature
compared in constant time with every configured secret (two during a rotation) before anything
parses it. ``for_user_id`` names the subscribed account, which names the inbox; a delivery for an
account this app does not route is answered 200, logged and counted (``unrouted``), and not stored.
X gets 200 only once a delivery is stored (or understood as nothing to store: tweets, follows,
typing, our own echoes), 400 for a body that is not JSON, 503 when the store cannot take it now.
Read receipts (``direct_message_mark_read_events``) of the customer are reported on our replies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Self

import orjson
from aiohttp import web

from connectors.base import WebhookIntake, any_secret_matches, ingest_capturing, read_webhook, text_ok
from connectors.media import MediaFetcher, MediaPolicy, fetches_for, start_fetcher
from connectors.x.api import XApi
from connectors.x.media import downloader
from connectors.x.oauth import OAuth1
from connectors.x.sender import XSender
from connectors.x.settings import XSettings
from core.channel import ChannelContext, ChannelEndpoint, SenderSpec
from core.errors import ConfigError
from core.http import envelope_headers, header_bytes, json_response
from core.model import IngestResult, Outcome, RawEnvelope
from core.settings import Settings, revealed, revealed_all
from normalizers.x import CHANNEL, DM_EVENTS, activities, normalize

logger = logging.getLogger(__name__)

PREFIX = f"/{CHANNEL}"
SIGNATURE_HEADER = "x-twitter-webhooks-signature"
READ_EVENTS = "direct_message_mark_read_events"


def signature(secret: bytes, payload: bytes) -> bytes:
    """``sha256=`` + base64(HMAC-SHA256(secret, payload)): the CRC response token, and the
    delivery signature X sends."""
    return b"sha256=" + base64.b64encode(hmac.new(secret, payload, hashlib.sha256).digest())


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    user_id: str
    inbox: str
    tenant: str
    fetch_media: bool
    auth: OAuth1 | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class App:
    """One configured X app: its webhook and the accounts it routes."""

    name: str
    secrets: tuple[bytes, ...] = field(repr=False)
    accounts: Mapping[str, Account] = field(default_factory=dict)

    def verifies(self, body: bytes, offered: str) -> bool:
        """Whether ``offered`` signs ``body`` with one of the secrets; compares with every one."""
        given = header_bytes(offered.strip())
        return any_secret_matches(self.secrets, lambda secret: signature(secret, body), given)

    def crc(self, token: str) -> str:
        """The CRC response: always with the current secret (the one X now signs with)."""
        return signature(self.secrets[0], header_bytes(token)).decode()

    @property
    def default(self) -> Account:
        return next(iter(self.accounts.values()))


class XConnector:
    """Mounts ``/x/{app}``, the media fetcher and the sender; no per-request state."""

    def __init__(self, table: XSettings, apps: Mapping[str, App]) -> None:
        self.table = table
        self.apps = dict(apps)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        table = settings.channel(CHANNEL, XSettings)
        if table is None:
            return None
        apps: dict[str, App] = {}
        routed: dict[str, str] = {}  # inbox -> the account that answers it
        for name, config in table.apps.items():
            where = f"channels.{CHANNEL}.apps.{name}"
            secret = settings.required(config.consumer_secret, key=f"{where}.consumer_secret",
                                       why="the CRC challenge cannot be answered, nor signatures checked,")
            consumer_key = revealed(config.consumer_key)
            accounts: dict[str, Account] = {}
            for user_id, account in config.accounts.items():
                at = f'{where}.accounts."{user_id}"'
                token, token_secret = revealed(account.access_token), revealed(account.access_token_secret)
                auth = None
                if consumer_key and token and token_secret:
                    auth = OAuth1(consumer_key=consumer_key, consumer_secret=secret, token=token,
                                  token_secret=token_secret)
                elif account.fetch_media:
                    missing = "consumer_key" if not consumer_key else (
                        "access_token" if not token else "access_token_secret")
                    key = f"{where}.consumer_key" if missing == "consumer_key" else f"{at}.{missing}"
                    raise ConfigError("is required to fetch media (or set fetch_media = false)",
                                      file=settings.source, key=key)
                if account.inbox in routed:
                    # One account per inbox: it is the one that fetches the media and sends the replies.
                    raise ConfigError(
                        f"inbox {account.inbox!r} is already routed from account {routed[account.inbox]}",
                        file=settings.source, key=f"{at}.inbox",
                    )
                routed[account.inbox] = user_id
                accounts[user_id] = Account(
                    user_id=user_id, inbox=account.inbox, fetch_media=account.fetch_media, auth=auth,
                    tenant=settings.inbox(account.inbox, key=f"{at}.inbox").tenant,
                )
            secrets = (secret, *revealed_all(config.previous_consumer_secret))
            apps[name] = App(name=name, secrets=tuple(s.encode() for s in secrets),
                             accounts=accounts)
        return cls(table, apps)

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        """The webhook URL registered with the Account Activity API, once per routed inbox."""
        return [
            ChannelEndpoint(inbox=account.inbox, kind="webhook", address=f"{base_url}{PREFIX}/{name}")
            for name, app in self.apps.items() for account in app.accounts.values()
        ]

    def setup(self, ctx: ChannelContext) -> None:
        table = self.table
        api = XApi(ctx.http(table.api_base, timeout=table.api_timeout), timeout=table.api_timeout)
        accounts = [account for app in self.apps.values() for account in app.accounts.values()]
        fetching = {a.inbox: a.auth for a in accounts if a.fetch_media}
        fetcher = None
        if fetching:
            download = downloader(api, fetching, hosts=table.media_hosts, max_bytes=table.media_max_bytes)
            fetcher = start_fetcher(ctx, CHANNEL, MediaPolicy.from_table(table, api_calls=2), download)
        auths = {a.inbox: a.auth for a in accounts if a.auth is not None}
        if auths:
            # Not idempotent: X has no key that drops a repeated DM.
            spec = SenderSpec(sender=XSender(api, auths), rate=table.send_rate, burst=table.send_burst)
            ctx.add_sender(spec)
        webhook = Webhook(ctx, self.apps, fetcher, frozenset(fetching), table)
        sub = web.Application()
        sub.router.add_get("/{app}", webhook.crc)
        sub.router.add_post("/{app}", webhook.handle)
        sub.on_cleanup.append(webhook.drain)
        ctx.add_app(PREFIX, sub)


class Webhook:
    def __init__(
        self, ctx: ChannelContext, apps: Mapping[str, App], fetcher: MediaFetcher | None,
        fetching: frozenset[str], table: XSettings,
    ) -> None:
        self._ctx = ctx
        self._apps = apps
        self._fetcher = fetcher
        self._fetching = fetching
        self._limit = min(table.max_body_bytes, ctx.settings.server.max_body_bytes)
        self._intake = WebhookIntake(CHANNEL, table.ingest_timeout)

    async def crc(self, request: web.Request) -> web.Response:
        app = self._apps.get(request.match_info["app"])
        if app is None:
            return web.Response(status=404, text="no X app here")
        token = request.query.get("crc_token")
        if not token:
            return web.Response(status=400, text="crc_token required")
        return json_response({"response_token": app.crc(token)})

    async def handle(self, request: web.Request) -> web.Response:
        app = self._apps.get(request.match_info["app"])
        if app is None:
            return web.Response(status=404, text="no X app here")
        offered = request.headers.get(SIGNATURE_HEADER)
        if not offered:
            return self._refuse(app, request, "missing")
        body = await read_webhook(request, self._limit, log_as=f"x {app.name}",
                                   refused=partial(self._ctx.metrics.refused, inbox=app.default.inbox))
        if isinstance(body, web.Response):
            return body
        if not app.verifies(body, offered):
            return self._refuse(app, request, "wrong")
        # Verified: reading it now is safe. A body that is not JSON is the normalizer's 400.
        delivery = _peek(body)
        account = app.default
        if delivery is not None:
            for_user = delivery.get("for_user_id")
            routed = app.accounts.get(for_user) if isinstance(for_user, str) else None
            if routed is None and isinstance(for_user, str):
                logger.warning("x %s: a delivery for account %s, which no inbox routes; not stored",
                               app.name, for_user[:32])
                self._ctx.metrics.event("unrouted", inbox=account.inbox)
                return web.Response(status=200, text="not routed")
            account = routed or account
        headers = envelope_headers(request, without=SIGNATURE_HEADER)
        envelope = RawEnvelope(
            channel=CHANNEL, tenant=account.tenant, inbox=account.inbox, body=body,
            received_at=self._ctx.clock.now(), content_type=request.headers.get("Content-Type"),
            headers=headers, signature_verified=True, remote=request.remote,
            meta={"app": app.name, "for_user_id": account.user_id},
        )
        return await self._intake.respond(self._ingest(envelope, delivery), name=app.name, ok=text_ok())

    def _refuse(self, app: App, request: web.Request, what: str) -> web.Response:
        logger.warning("x %s: %s x-twitter-webhooks-signature from %s; refused", app.name, what,
                       request.remote)
        self._ctx.metrics.refused("signature", inbox=app.default.inbox)
        return web.Response(status=401, text="signature required")

    async def _ingest(self, envelope: RawEnvelope, delivery: dict[str, Any] | None) -> IngestResult:
        result, produced = await ingest_capturing(self._ctx.ingest, envelope, normalize)
        if not result.stored:
            return result
        if delivery is not None and result.outcome is Outcome.ACCEPTED:
            kinds = activities(delivery)  # type: ignore[arg-type]
            if DM_EVENTS in kinds:
                echoes = len(delivery[DM_EVENTS]) - len(produced)
                for _ in range(max(echoes, 0)):
                    self._ctx.metrics.event("echo_ignored", inbox=envelope.inbox)
            for kind in kinds:
                if kind != DM_EVENTS:
                    self._ctx.metrics.event("event_ignored", inbox=envelope.inbox)
            await self._read_receipts(envelope, delivery)
        if self._fetcher is not None and produced and envelope.inbox in self._fetching:
            await self._fetcher.enqueue(fetches_for(produced, now=self._ctx.clock.now()))
        return result

    async def _read_receipts(self, envelope: RawEnvelope, delivery: dict[str, Any]) -> None:
        """The customer read up to one of our DMs: ``reply.read`` for it (when it is a reply of ours)."""
        for receipt in delivery.get(READ_EVENTS) or []:
            if not isinstance(receipt, dict) or receipt.get("sender_id") == delivery.get("for_user_id"):
                continue
            read_upto = receipt.get("last_read_event_id")
            if not isinstance(read_upto, str) or not read_upto:
                continue
            at = _moment(receipt.get("created_timestamp"))
            try:
                await self._ctx.report_delivery(read_upto, "read", at=at)
            except Exception:
                logger.exception("x %s: reporting a read receipt failed", envelope.inbox)

    async def drain(self, app: web.Application) -> None:
        await self._intake.drain(app)


def _peek(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _moment(milliseconds: object) -> datetime | None:
    if isinstance(milliseconds, str) and milliseconds.isdigit():
        return datetime.fromtimestamp(int(milliseconds) / 1000, UTC)
    return None
