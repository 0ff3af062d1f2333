"""One endpoint per Meta app, ``/meta/{app}``, shared by WhatsApp, Messenger and Instagram.

A Meta app has one callback URL and one app secret for all its products, so the three channels
meet here (``ctx.shared``): the first one set up builds the hub and mounts it, each registers the
webhook ``object`` it handles (``whatsapp_business_account``, ``page``, ``instagram``).

- ``GET``: the subscription handshake. ``hub.mode=subscribe`` with the app's verify token
  (compared in constant time) is answered with ``hub.challenge``; anything else is 403.
- ``POST``: ``X-Hub-Signature-256`` (``sha256=`` + hex HMAC-SHA256 of the raw body with the app
  secret; the previous secret too during a rotation, every secret compared) is checked before the
  body is parsed: missing or wrong is 401, logged and counted, and nothing is parsed. Then the body
  (bounded: 413) is parsed and handed to the channel registered for its ``object``, which answers.
  A body no channel of the app handles is answered 200 and counted (``unrouted``): Meta would
  otherwise redeliver it for days and finally disable the subscription.

Refusals before the body is parsed cannot know the channel; they are counted on the channel that
registered first on the app.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from connectors.base import any_secret_matches, read_webhook
from connectors.meta.settings import MetaSettings
from core.channel import ChannelContext, ChannelMetrics
from core.errors import ConfigError
from core.http import header_bytes
from core.settings import Settings, revealed_all

logger = logging.getLogger(__name__)

PREFIX = "/meta"
SHARED_KEY = "meta/hub"
SIGNATURE_HEADER = "X-Hub-Signature-256"
TABLE = "meta"


@dataclass(frozen=True, slots=True, kw_only=True)
class MetaApp:
    """One configured app: its secrets (raw bytes) and the verify token's digest."""

    name: str
    secrets: tuple[bytes, ...] = field(repr=False)
    verify_digest: bytes = field(repr=False)

    def signed(self, header: str | None, body: bytes) -> bool:
        """Whether ``header`` is ``sha256=<hex>`` of ``body`` under one of the app's secrets.

        The algorithm is ours (SHA-256), never the header's choice; every secret is compared, in
        constant time, over digests of one length."""
        if header is None:
            return False
        algorithm, _, offered_hex = header.strip().partition("=")
        try:
            offered = bytes.fromhex(offered_hex)
        except ValueError:
            offered = b""
        if algorithm.lower() != "sha256" or len(offered) != hashlib.sha256().digest_size:
            offered = b"\x00" * hashlib.sha256().digest_size  # still compared: no early answer
            valid_form = False
        else:
            valid_form = True

        def expected(secret: bytes) -> bytes:
            return hmac.new(secret, body, hashlib.sha256).digest()

        return any_secret_matches(self.secrets, expected, offered) and valid_form

    def verify_token_matches(self, offered: str | None) -> bool:
        digest = hashlib.sha256(header_bytes(offered or "")).digest()
        return hmac.compare_digest(digest, self.verify_digest) and offered is not None


def load_apps(settings: Settings) -> dict[str, MetaApp]:
    """The ``[channels.meta.apps]`` table, failing closed: an app without its secret or verify token
    refuses to start."""
    table = settings.channel(TABLE, MetaSettings)
    if table is None:
        raise ConfigError(
            "is required: WhatsApp, Messenger and Instagram arrive through a Meta app "
            "([channels.meta.apps.<name>] with app_secret and verify_token)",
            file=settings.source,
            key="channels.meta",
        )
    apps: dict[str, MetaApp] = {}
    for name, app in table.apps.items():
        where = f"channels.{TABLE}.apps.{name}"
        secret = settings.required(app.app_secret, key=f"{where}.app_secret",
                                   why="webhooks cannot be verified")
        token = settings.required(app.verify_token, key=f"{where}.verify_token",
                                  why="Meta's subscription handshake cannot be answered")
        apps[name] = MetaApp(
            name=name,
            secrets=tuple(s.encode() for s in (secret, *revealed_all(app.previous_app_secret))),
            verify_digest=hashlib.sha256(token.encode()).digest(),
        )
    return apps


def meta_table(settings: Settings) -> MetaSettings:
    table = settings.channel(TABLE, MetaSettings)
    assert table is not None  # load_apps ran in from_settings and refused a missing table
    return table


def own_app_ids(settings: Settings) -> frozenset[str]:
    """The ids of our Meta apps (``app_id``): their echoes are our own replies."""
    table = settings.channel(TABLE, MetaSettings)
    return frozenset(a.app_id for a in table.apps.values() if a.app_id) if table is not None else frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """One verified POST: the app, the raw bytes, the parsed body and where it came from."""

    app: MetaApp
    body: bytes = field(repr=False)
    payload: Mapping[str, Any] = field(repr=False)
    headers: Mapping[str, str] = field(repr=False)
    remote: str | None
    content_type: str | None


Handler = Callable[[Delivery], Awaitable[web.Response]]


class MetaHub:
    """The shared ``/meta/{app}`` route; channels register per (app, object)."""

    def __init__(self, apps: Mapping[str, MetaApp], table: MetaSettings, server_limit: int) -> None:
        self.apps = dict(apps)
        self.limit = min(table.max_body_bytes, server_limit)
        self.ingest_timeout = table.ingest_timeout
        self._handlers: dict[tuple[str, str], Handler] = {}
        self._metrics: dict[str, ChannelMetrics] = {}  # per app: the first channel registered
        self.app = web.Application()
        self.app.router.add_get("/{app}", self.handshake)
        self.app.router.add_post("/{app}", self.receive)
        # The sub-app is frozen once mounted; channels set up later add their drains here.
        self._drains: list[Callable[[web.Application], Awaitable[None]]] = []
        self.app.on_cleanup.append(self._drain)

    def add_drain(self, drain: Callable[[web.Application], Awaitable[None]]) -> None:
        """Run ``drain`` at shutdown, before the store closes (work that outlived its answer)."""
        self._drains.append(drain)

    async def _drain(self, app: web.Application) -> None:
        for drain in self._drains:
            await drain(app)

    @classmethod
    def shared(cls, ctx: ChannelContext) -> MetaHub:
        """The gateway's hub: built and mounted by the first Meta channel set up."""

        def build() -> MetaHub:
            hub = cls(load_apps(ctx.settings), meta_table(ctx.settings), ctx.settings.server.max_body_bytes)
            ctx.add_app(PREFIX, hub.app)
            return hub

        return ctx.shared(SHARED_KEY, build)

    def register(self, app: str, object_kind: str, handler: Handler, metrics: ChannelMetrics) -> None:
        if (app, object_kind) in self._handlers:
            raise RuntimeError(f"meta app {app!r}: {object_kind} webhooks are already handled")
        self._handlers[(app, object_kind)] = handler
        self._metrics.setdefault(app, metrics)

    async def handshake(self, request: web.Request) -> web.Response:
        app = self._app(request)
        query = request.query
        if query.get("hub.mode") != "subscribe" or not app.verify_token_matches(
            query.get("hub.verify_token")
        ):
            logger.warning(
                "meta %s: subscription handshake with a wrong verify token from %s; refused",
                app.name,
                request.remote,
            )
            self._refused(app.name, "auth")
            return web.Response(status=403, text="verify token mismatch")
        logger.info("meta %s: webhook subscription verified", app.name)
        return web.Response(status=200, text=query.get("hub.challenge", ""), content_type="text/plain")

    async def receive(self, request: web.Request) -> web.Response:
        app = self._app(request)
        header = request.headers.get(SIGNATURE_HEADER)
        if header is None:
            return self._forged(app, request, "missing")
        body = await read_webhook(request, self.limit, log_as=f"meta {app.name}",
                                   refused=partial(self._refused, app.name))
        if isinstance(body, web.Response):
            return body
        if not app.signed(header, body):
            return self._forged(app, request, "wrong")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("object"), str):
            logger.warning("meta %s: a signed body that is not a webhook object; refused", app.name)
            self._refused(app.name, "malformed")
            return web.Response(status=400, text="not a webhook object")
        handler = self._handlers.get((app.name, payload["object"]))
        if handler is None:
            logger.warning(
                "meta %s: no channel here handles %r webhooks; answered 200 and dropped "
                "(unsubscribe the field, or configure the channel)",
                app.name,
                payload["object"],
            )
            metrics = self._metrics.get(app.name)
            if metrics is not None:
                metrics.event("unrouted")
            return web.Response(status=200, text="not handled here")
        headers = {k: v for k, v in request.headers.items() if k.lower() != SIGNATURE_HEADER.lower()}
        return await handler(
            Delivery(
                app=app,
                body=body,
                payload=payload,
                headers=headers,
                remote=request.remote,
                content_type=request.headers.get("Content-Type"),
            )
        )

    def _app(self, request: web.Request) -> MetaApp:
        app = self.apps.get(request.match_info["app"])
        if app is None or app.name not in self._metrics:
            raise web.HTTPNotFound(text="no Meta app here")
        return app

    def _forged(self, app: MetaApp, request: web.Request, how: str) -> web.Response:
        logger.warning("meta %s: %s %s from %s; refused", app.name, how, SIGNATURE_HEADER, request.remote)
        self._refused(app.name, "signature")
        return web.Response(status=401, text="signature required")

    def _refused(self, app: str, reason: Any) -> None:
        metrics = self._metrics.get(app)
        if metrics is not None:
            metrics.refused(reason)
