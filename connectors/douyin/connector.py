"""Douyin Open Platform webhooks at ``POST /douyin/{app}``.

Douyin signs every push: ``X-Douyin-Signature`` is the hex SHA-1 of the client secret followed by
the raw body (https://developer.open-douyin.com/docs/resource/zh-CN/dop/develop/webhooks/summarize,
"消息来源验证"). A push without the header is refused (401) before its body is read; the body is
read within ``max_body_bytes`` and its signature compared in constant time with every configured
secret (two during a rotation) before anything parses it. The console's ``verify_webhook``
request, signed like any other, is answered with its challenge as JSON.

Douyin disconnects after 5 s and retries three times, and promises neither order nor uniqueness
("不保证消息必达、有序、不重复"): a push is answered 200 only once what it carries is stored
(duplicates included: the store keeps one per message id, and the ``Msg-Id`` header names the
events without one), 503 when the store cannot take it within ``ingest_timeout``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Self

import orjson
from aiohttp import web

from connectors.base import WebhookIntake
from connectors.douyin.account import App
from connectors.douyin.sender import DouyinSender
from connectors.douyin.settings import DouyinSettings
from core.channel import ChannelContext, ChannelEndpoint, Refusal, SenderSpec
from core.errors import ConfigError, InvalidInput
from core.http import envelope_headers, read_body
from core.model import RawEnvelope
from core.settings import Settings, revealed
from normalizers.douyin import CHANNEL, VERIFY_EVENT, content_of, normalize, parse_body

logger = logging.getLogger(__name__)

PREFIX = f"/{CHANNEL}"
SIGNATURE_HEADER = "X-Douyin-Signature"
MSG_ID_HEADER = "Msg-Id"


class DouyinConnector:
    """Mounts ``/douyin/{app}`` and, for apps with an access token, the sender."""

    def __init__(self, table: DouyinSettings, apps: Mapping[str, App]) -> None:
        self.table = table
        self.apps = dict(apps)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        table = settings.channel(CHANNEL, DouyinSettings)
        if table is None:
            return None
        apps: dict[str, App] = {}
        for name, config in table.apps.items():
            where = f"channels.{CHANNEL}.apps.{name}"
            secret = settings.required(config.client_secret, key=f"{where}.client_secret",
                                       why="webhooks cannot be verified")
            token = revealed(config.access_token)
            if token and not config.account_open_id:
                raise ConfigError("is required with access_token (the sending account's open_id)",
                                  file=settings.source, key=f"{where}.account_open_id")
            previous = revealed(config.previous_client_secret)
            apps[name] = App(
                name=name,
                inbox=config.inbox,
                tenant=settings.inbox(config.inbox, key=f"{where}.inbox").tenant,
                client_key=config.client_key,
                secrets=tuple(s for s in (secret, previous) if s),
                access_token=token or None,
                account_open_id=config.account_open_id,
            )
        return cls(table, apps)

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        """The webhook URL to enter in the console (开发配置 > Webhooks)."""
        return [
            ChannelEndpoint(inbox=app.inbox, kind="webhook", address=f"{base_url}{PREFIX}/{name}")
            for name, app in self.apps.items()
        ]

    def setup(self, ctx: ChannelContext) -> None:
        table = self.table
        sending = {name: app for name, app in self.apps.items() if app.access_token}
        if sending:
            http = ctx.http(table.api_base, timeout=table.api_timeout)
            sender = DouyinSender(sending, http)
            ctx.add_sender(SenderSpec(
                sender=sender, window=table.reply_window, outside_window=sender.outside_window,
                rate=table.send_rate, burst=max(1, int(table.send_rate)),
            ))
        webhook = Webhook(ctx, self.apps, table)
        sub = web.Application()
        sub.router.add_post("/{name}", webhook.handle)
        sub.on_cleanup.append(webhook.drain)
        ctx.add_app(PREFIX, sub)


class Webhook:
    def __init__(self, ctx: ChannelContext, apps: Mapping[str, App], table: DouyinSettings) -> None:
        self._ctx = ctx
        self._apps = apps
        self._limit = min(table.max_body_bytes, ctx.settings.server.max_body_bytes)
        self._intake = WebhookIntake(CHANNEL, table.ingest_timeout, what="push")

    async def handle(self, request: web.Request) -> web.Response:
        app = self._apps.get(request.match_info["name"])
        if app is None:
            return web.Response(status=404, text="no Douyin app of this name")
        offered = request.headers.get(SIGNATURE_HEADER)
        if not offered:
            return self._refuse(app, request, "signature", 401, "missing X-Douyin-Signature")
        try:
            body = await read_body(request, self._limit)
        except InvalidInput as exc:
            return self._refuse(app, request, "size", exc.status, exc.reason)
        if not app.verifies(body, offered):
            return self._refuse(app, request, "signature", 401, "wrong X-Douyin-Signature")
        # Verified: parsing it now is safe.
        try:
            parsed = parse_body(body)
            if parsed.get("event") == VERIFY_EVENT:
                challenge = content_of(parsed).get("challenge")
                self._ctx.metrics.event("verify_webhook", inbox=app.inbox)
                answer = orjson.dumps({"challenge": challenge})
                return web.Response(body=answer, content_type="application/json")
        except InvalidInput as exc:
            return self._refuse(app, request, "malformed", 400, exc.reason)
        msg_id = request.headers.get(MSG_ID_HEADER, "").strip()[:128] or None
        headers = envelope_headers(request, without=SIGNATURE_HEADER)
        envelope = RawEnvelope(
            channel=CHANNEL,
            tenant=app.tenant,
            inbox=app.inbox,
            body=body,
            received_at=self._ctx.clock.now(),
            content_type=request.headers.get("Content-Type"),
            headers=headers,
            signature_verified=True,
            remote=request.remote,
            meta={"account": app.name, "client_key": app.client_key, "msg_id": msg_id},
        )
        # Shielded: cancelling a commit half-way helps nobody; Douyin's retry finds it stored.
        return await self._intake.respond(self._ctx.ingest(envelope, normalize), name=app.name, ok=_ok)

    def _refuse(self, app: App, request: web.Request, reason: Refusal, status: int, why: str) -> web.Response:
        logger.warning("douyin %s: refused a push from %s (%d): %s", app.name, request.remote, status, why)
        self._ctx.metrics.refused(reason, inbox=app.inbox)
        return web.Response(status=status, text=why)

    async def drain(self, _: web.Application) -> None:
        """Let ingests that outlived their answer finish before the store closes."""
        await self._intake.drain()


def _ok() -> web.Response:
    """What Douyin expects once a push is stored."""
    return web.Response(body=b'{"err_no":0}', content_type="application/json")
