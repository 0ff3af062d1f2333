"""Feishu / Lark event subscriptions (v2) at ``POST /feishu/{inbox}``; one app per inbox.

Every request is read within ``max_body_bytes``. A request that carries ``X-Lark-Signature`` has it
checked first, in constant time against every configured encrypt key (two during a rotation), with
``X-Lark-Request-Timestamp`` inside ``replay_window`` of the gateway's clock; only then is the body
parsed and its ``encrypt`` field decrypted (AES-256-CBC, key SHA-256 of the encrypt key), and the
verification token inside compared in constant time. A wrong or missing signature, a stale
timestamp or a wrong token is 401, logged and counted, and nothing is decrypted or parsed.

The one request Feishu sends unsigned is the ``url_verification`` challenge when the Request URL is
saved: an unsigned body is decrypted and answered only if it is that challenge with the right
token; anything else unsigned is 401 and stored nowhere.

A verified event is handed to the pipeline as its plaintext JSON; Feishu gets 200 only once it is
stored (or understood as nothing to store), 400 for a signed body that is not an event, and 503
when the store cannot take it now (Feishu retries after 15 s, 5 min, 1 h and 6 h). The store gets
``ingest_timeout`` seconds of Feishu's 3; a slower commit is not cancelled and the retry finds it
stored. Replays inside the window are duplicates of a stored message id and store nothing.

After the commit the message's images and files are queued (insert-if-absent) for the shared
media fetcher (message-resource API), and the employee's work email from the contact API (cached)
is linked to the customer as a verified identity.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from functools import partial
from typing import Any, Self

import orjson
from aiohttp import web

from connectors.base import CachedLookup, WebhookIntake, ingest_capturing, read_webhook
from connectors.feishu.api import FeishuApi, FeishuError
from connectors.feishu.app import App
from connectors.feishu.crypto import DecryptError, decrypt, signature_matches
from connectors.feishu.media import downloader
from connectors.feishu.sender import FeishuSender
from connectors.feishu.settings import HOSTS, FeishuInboxSettings, FeishuSettings
from connectors.feishu.ws import WsRunner
from connectors.media import MediaFetcher, MediaPolicy, fetches_for, start_fetcher
from core.channel import ChannelContext, ChannelEndpoint, Clock
from core.errors import ConfigError, InvalidInput
from core.http import envelope_headers
from core.model import CanonicalMessage, Identity, IdentityKind, IngestResult, Outcome, RawEnvelope
from core.settings import Settings, revealed, revealed_all
from normalizers.feishu import CHANNEL, MESSAGE_EVENT, Callback, normalize, parse

logger = logging.getLogger(__name__)

PREFIX = f"/{CHANNEL}"
SIGNATURE_HEADER = "X-Lark-Signature"
TIMESTAMP_HEADER, NONCE_HEADER = "X-Lark-Request-Timestamp", "X-Lark-Request-Nonce"


class FeishuConnector:
    """Mounts ``/feishu/{inbox}``, the media fetcher, the directory and the sender."""

    def __init__(self, table: FeishuSettings, apps: Mapping[str, App]) -> None:
        self.table = table
        self.apps = dict(apps)
        self.runners: dict[str, WsRunner] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        table = settings.channel(CHANNEL, FeishuSettings)
        if table is None:
            return None
        return cls(table, {inbox: _app(settings, inbox, c) for inbox, c in table.inboxes.items()})

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        """The Request URL for Events & Callbacks -> Event Configuration."""
        return [
            ChannelEndpoint(inbox=inbox, kind="webhook", address=f"{base_url}{PREFIX}/{inbox}")
            if app.mode == "http"
            else ChannelEndpoint(inbox=inbox, kind="socket", address=f"long connection via {app.api_base}")
            for inbox, app in self.apps.items()
        ]

    def setup(self, ctx: ChannelContext) -> None:
        table = self.table
        apis: dict[str, FeishuApi] = {}
        clients: dict[str, Any] = {}
        for inbox, app in self.apps.items():
            if app.api_base not in clients:
                clients[app.api_base] = ctx.http(app.api_base, timeout=table.api_timeout)
            if app.app_secret:
                apis[inbox] = FeishuApi(http=clients[app.api_base], app_id=app.app_id,
                                        app_secret=app.app_secret, clock=ctx.clock, timeout=table.api_timeout)
        fetcher = None
        fetching = {inbox: api for inbox, api in apis.items() if self.apps[inbox].fetch_media}
        if fetching:
            download = downloader(fetching, max_bytes=table.media_max_bytes)
            fetcher = start_fetcher(ctx, CHANNEL, MediaPolicy.from_table(table, api_calls=4), download)
        lookup = directory(apis, ttl=table.directory_ttl, clock=ctx.clock)
        intake = Intake(ctx, self.apps, table, lookup, fetcher)
        endpoint = EventEndpoint(ctx, self.apps, intake, table)
        sub = web.Application()
        sub.router.add_post("/{inbox}", endpoint.handle)
        sub.on_cleanup.append(intake.drain)
        ctx.add_app(PREFIX, sub)
        for inbox, app in self.apps.items():
            if app.mode == "ws":
                runner = WsRunner(ctx, app, apis[inbox], intake, table)
                self.runners[inbox] = runner
                ctx.spawn(f"ws-{inbox}", runner.run, restart_after=table.ws_first_backoff)
        if apis:
            ctx.add_sender(FeishuSender.spec(apis, self.apps, rate=table.send_rate, blobs=ctx.blobs))


def _app(settings: Settings, inbox: str, config: FeishuInboxSettings) -> App:
    where = f"channels.{CHANNEL}.inboxes.{inbox}"
    token = revealed(config.verification_token)
    key = revealed(config.encrypt_key)
    if config.mode == "http" and not token:
        raise ConfigError("is required (callbacks cannot be verified without it)", file=settings.source,
                          key=f"{where}.verification_token")
    if config.mode == "http" and not key:
        raise ConfigError("is required: set an Encrypt Key in the console, so that Feishu signs and encrypts "
                          "every callback", file=settings.source, key=f"{where}.encrypt_key")
    secret = revealed(config.app_secret)
    if config.mode == "ws" and not (secret and config.app_id):
        raise ConfigError("app_id and app_secret are required for the long connection", file=settings.source,
                          key=f"{where}.app_secret")
    if (config.fetch_media or config.directory_emails) and not (secret and config.app_id):
        raise ConfigError("app_id and app_secret are required to fetch media, read the directory and reply "
                          "(or set fetch_media = false and directory_emails = false)", file=settings.source,
                          key=f"{where}.app_secret")
    return App(
        inbox=inbox,
        tenant=settings.inbox(inbox, key=where).tenant,
        mode=config.mode,
        host=config.host,
        api_base=(config.api_base or HOSTS[config.host]).rstrip("/"),
        app_id=config.app_id,
        bot_open_id=config.bot_open_id,
        fetch_media=config.fetch_media,
        directory_emails=config.directory_emails,
        reply_in_thread=config.reply_in_thread,
        app_secret=secret,
        tokens=revealed_all(config.verification_token, config.previous_verification_token),
        keys=revealed_all(config.encrypt_key, config.previous_encrypt_key),
    )


class Refused(Exception):
    """A request that does not verify (the reason is for the log, never for the caller)."""


def open_callback(app: App, body: bytes, *, signed: str | None, timestamp: str | None, nonce: str | None,
                  now: float, window: float) -> tuple[bytes, Callback, bool]:
    """Verify, then decrypt and parse: the plaintext, the callback and whether it was signed.

    Raises :class:`Refused` (401) before anything is decrypted or parsed when the signature or its
    timestamp is wrong, and :class:`InvalidInput` (400) for a signed body that is not an event."""
    if signed is not None:
        if not timestamp or nonce is None:
            raise Refused("a signature without its timestamp or nonce")
        try:
            sent = float(timestamp)
        except ValueError:
            raise Refused("a malformed timestamp") from None
        if abs(now - sent) > window:
            raise Refused(f"a stale timestamp ({timestamp}, outside the {window:.0f} s window)")
        key = signature_matches(signed, timestamp, nonce, app.keys, body)
        if key is None:
            raise Refused("a wrong signature")
        keys: tuple[str, ...] = (key,)
    else:
        keys = app.keys  # only a url_verification challenge may come unsigned
    outer = parse(body)
    encrypted = outer.get("encrypt")
    if isinstance(encrypted, str):
        plain: bytes | None = None
        for key in keys:
            try:
                plain = decrypt(encrypted, key)
                break
            except DecryptError:
                continue
        if plain is None:
            if signed is None:
                raise Refused("an unsigned body that does not decrypt")
            raise InvalidInput("the encrypt field does not decrypt with the signing key")
        callback = parse(plain)
    elif signed is None:
        raise Refused("an unsigned, unencrypted body")
    else:
        plain, callback = body, outer
    header = callback.get("header")
    token = header.get("token") if isinstance(header, dict) else callback.get("token")
    if not app.token_matches(token):
        raise Refused("a wrong verification token")
    if signed is None and callback.get("type") != "url_verification":
        raise Refused("an unsigned event")
    return plain, callback, signed is not None


class EventEndpoint:
    """``POST /feishu/{inbox}``: verify, then answer the challenge or ingest the event."""

    def __init__(
        self, ctx: ChannelContext, apps: Mapping[str, App], intake: Intake, table: FeishuSettings
    ) -> None:
        self._ctx = ctx
        self._apps = {inbox: app for inbox, app in apps.items() if app.mode == "http"}
        self._intake = intake
        self._window = table.replay_window
        self._limit = min(table.max_body_bytes, ctx.settings.server.max_body_bytes)

    async def handle(self, request: web.Request) -> web.Response:
        app = self._apps.get(request.match_info["inbox"])
        if app is None:
            return web.Response(status=404, text="no Feishu app for this inbox")
        body = await read_webhook(request, self._limit, log_as=f"feishu {app.inbox}",
                                   refused=partial(self._ctx.metrics.refused, inbox=app.inbox))
        if isinstance(body, web.Response):
            return body
        try:
            plain, callback, _ = open_callback(
                app, body, signed=request.headers.get(SIGNATURE_HEADER),
                timestamp=request.headers.get(TIMESTAMP_HEADER), nonce=request.headers.get(NONCE_HEADER),
                now=self._ctx.clock.time(), window=self._window,
            )
        except Refused as exc:
            logger.warning("feishu %s: %s from %s; refused", app.inbox, exc, request.remote)
            self._ctx.metrics.refused("signature", inbox=app.inbox)
            return web.Response(status=401, text="invalid signature")
        except InvalidInput as exc:
            logger.info("feishu %s: refused a signed body: %s", app.inbox, exc.reason)
            self._ctx.metrics.refused("malformed", inbox=app.inbox)
            return web.Response(status=400, text=exc.reason)
        if callback.get("type") == "url_verification":
            challenge = callback.get("challenge")
            if not isinstance(challenge, str):
                self._ctx.metrics.refused("malformed", inbox=app.inbox)
                return web.Response(status=400, text="url_verification without a challenge")
            logger.info("feishu %s: answered url_verification", app.inbox)
            return web.json_response({"challenge": challenge})
        headers = envelope_headers(request, without=SIGNATURE_HEADER)
        result = await self._intake.deliver(app, plain, callback, transport="http", headers=headers,
                                            remote=request.remote)
        return self._intake.work.answer(result, name=app.inbox, ok=lambda: web.json_response({"code": 0}))


Directory = CachedLookup[tuple[str, str], str]
"""The contact API's work email by (inbox, open_id)."""


def directory(apis: Mapping[str, FeishuApi], *, ttl: float, clock: Clock) -> Directory:
    """Work emails through each app's contact API, cached for ``ttl``."""

    async def fetch(key: tuple[str, str]) -> str | None:
        api = apis.get(key[0])
        user = None if api is None else await api.employee(key[1])
        if user is None:
            return None
        # enterprise_email is the tenant-issued address; email the one the employee registered.
        for field_name in ("enterprise_email", "email"):
            value = user.get(field_name)
            if isinstance(value, str) and "@" in value:
                return value.strip().lower()
        return None

    return CachedLookup(fetch, ttl=ttl, clock=clock, failures=(FeishuError,), what="feishu contact API")


class Intake:
    """One verified event into the pipeline within Feishu's deadline; media and directory after it.
    Shared by the HTTP endpoint and the long connection."""

    def __init__(self, ctx: ChannelContext, apps: Mapping[str, App], table: FeishuSettings,
                 directory: Directory, fetcher: MediaFetcher | None) -> None:
        self._ctx = ctx
        self._apps = apps
        self._table = table
        self._directory = directory
        self._fetcher = fetcher
        # The shielded, bounded ingest (and directory links); the HTTP endpoint answers with it too.
        self.work = WebhookIntake(CHANNEL, table.ingest_timeout, what="event")

    async def deliver(self, app: App, plain: bytes, callback: Callback, *, transport: str,
                      headers: Mapping[str, str] | None = None, remote: str | None = None) -> IngestResult:
        header = callback.get("header")
        event_type = header.get("event_type") if isinstance(header, dict) else None
        if event_type != MESSAGE_EVENT:
            self._ctx.metrics.event("event_ignored", inbox=app.inbox)
        meta: dict[str, Any] = {"transport": transport, "host": app.host, "encrypted": transport == "http"}
        if app.bot_open_id:
            meta["bot_open_id"] = app.bot_open_id
        if isinstance(header, dict) and isinstance(header.get("event_id"), str):
            meta["event_id"] = header["event_id"]
        envelope = RawEnvelope(
            channel=CHANNEL, tenant=app.tenant, inbox=app.inbox, body=plain,
            received_at=self._ctx.clock.now(), content_type="application/json", headers=headers or {},
            signature_verified=True, remote=remote, meta=meta,
        )
        # Shielded: cancelling a commit half-way helps nobody; Feishu's retry finds it stored.
        return await self.work.submit(self._ingest(envelope), name=app.inbox)

    async def _ingest(self, envelope: RawEnvelope) -> IngestResult:
        result, produced = await ingest_capturing(self._ctx.ingest, envelope, normalize)
        if not result.stored or not produced:
            return result
        app = self._apps[envelope.inbox]
        # Also for a duplicate: the first delivery may have been committed by a process that died
        # before it queued the media; the queue is insert-if-absent.
        if self._fetcher is not None and app.fetch_media:
            try:
                await self._fetcher.enqueue(fetches_for(produced, now=self._ctx.clock.now()))
            except Exception:
                logger.exception("feishu %s: queueing the media of a stored message failed", envelope.inbox)
                return IngestResult(outcome=Outcome.RETRY, reason="media not queued", retry_after=5.0)
        if app.directory_emails:
            # A slow directory goes on in the background; the next message finds it cached.
            with contextlib.suppress(TimeoutError):
                await self.work.shielded(self._link(app, produced[0]), self._table.directory_timeout)
        return result

    async def _link(self, app: App, message: CanonicalMessage) -> None:
        owner = next((i for i in message.identities if i.kind == IdentityKind.FEISHU_OPEN_ID), None)
        if owner is None:
            return
        open_id = owner.value.split(":", 1)[1]
        try:
            email = await self._directory.get((app.inbox, open_id))
            if email is None:
                return
            outcome = await self._ctx.identities.link_verified(
                tenant=message.tenant, owner=owner, identity=Identity(kind=IdentityKind.EMAIL, value=email,
                                                                      verified=True),
                evidence={"source": "feishu contact API", "app_id": app.app_id, "open_id": open_id},
            )
            if outcome is not None and outcome.merged_customers:
                self._ctx.metrics.event("directory_merge", inbox=app.inbox)
        except Exception:
            logger.exception("feishu %s: linking the directory email failed", app.inbox)

    async def drain(self, app: web.Application) -> None:
        """Let ingests that outlived their answer finish before the store closes."""
        await self._directory.close()
        await self.work.drain(app)


def challenge_body(challenge: str, token: str) -> bytes:
    """A url_verification callback (for tests and the guide)."""
    return orjson.dumps({"challenge": challenge, "token": token, "type": "url_verification"})
