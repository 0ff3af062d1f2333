"""Weibo fan-service pushes at ``/weibo/{account}``.

The URL is verified with a GET carrying ``signature``, ``timestamp``, ``nonce`` and ``echostr``;
every push (POST) carries the same three parameters (https://open.weibo.com/wiki/消息推送服务). The
signature is SHA-1 over the sorted app secret, timestamp and nonce: it does not cover the body, so
the timestamp must lie within ``replay_window`` as well. Both are checked, the signature in
constant time, before the body is read; the body is then read within ``max_body_bytes`` and
parsed with orjson, its depth bounded.

A push is answered 200 (empty: no passive reply) only once it is stored; 503 when the store cannot
take it within ``ingest_timeout`` (Weibo's retry finds it as a duplicate).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Self

from aiohttp import web

from connectors.base import WebhookIntake, text_ok
from connectors.weibo.account import Account
from connectors.weibo.sender import WeiboSender
from connectors.weibo.settings import WeiboSettings
from core.channel import ChannelContext, ChannelEndpoint, Refusal, SenderSpec
from core.errors import InvalidInput
from core.http import envelope_headers, read_body
from core.model import RawEnvelope
from core.settings import Settings, revealed, revealed_all
from normalizers.weibo import CHANNEL, normalize, parse_body

logger = logging.getLogger(__name__)

PREFIX = f"/{CHANNEL}"


class WeiboConnector:
    """Mounts ``/weibo/{account}`` and, for accounts with an access token, the sender."""

    def __init__(self, table: WeiboSettings, accounts: Mapping[str, Account]) -> None:
        self.table = table
        self.accounts = dict(accounts)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        table = settings.channel(CHANNEL, WeiboSettings)
        if table is None:
            return None
        accounts: dict[str, Account] = {}
        for name, config in table.accounts.items():
            where = f"channels.{CHANNEL}.accounts.{name}"
            secret = settings.required(config.app_secret, key=f"{where}.app_secret",
                                       why="pushes cannot be verified")
            accounts[name] = Account(
                name=name,
                inbox=config.inbox,
                tenant=settings.inbox(config.inbox, key=f"{where}.inbox").tenant,
                secrets=(secret, *revealed_all(config.previous_app_secret)),
                access_token=revealed(config.access_token) or None,
                replay_window=config.replay_window,
            )
        return cls(table, accounts)

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        """The URL to enter in the fan-service developer mode."""
        return [
            ChannelEndpoint(inbox=account.inbox, kind="webhook", address=f"{base_url}{PREFIX}/{name}")
            for name, account in self.accounts.items()
        ]

    def setup(self, ctx: ChannelContext) -> None:
        table = self.table
        sending = {name: a for name, a in self.accounts.items() if a.access_token}
        if sending:
            sender = WeiboSender(sending, ctx.http(table.api_base, timeout=table.api_timeout), ctx.state)
            ctx.add_sender(SenderSpec(sender=sender, window=table.reply_window, rate=table.send_rate,
                                      burst=max(1, int(table.send_rate))))
        push = Push(ctx, self.accounts, table)
        sub = web.Application()
        sub.router.add_get("/{name}", push.handshake, allow_head=False)
        sub.router.add_post("/{name}", push.handle)
        sub.on_cleanup.append(push.drain)
        ctx.add_app(PREFIX, sub)


class Push:
    def __init__(self, ctx: ChannelContext, accounts: Mapping[str, Account], table: WeiboSettings) -> None:
        self._ctx = ctx
        self._accounts = accounts
        self._limit = min(table.max_body_bytes, ctx.settings.server.max_body_bytes)
        self._intake = WebhookIntake(CHANNEL, table.ingest_timeout, what="push")

    def _verified(self, request: web.Request) -> tuple[Account, web.Response | None]:
        account = self._accounts.get(request.match_info["name"])
        if account is None:
            raise web.HTTPNotFound(text="no Weibo account of this name")
        query = request.query
        timestamp, nonce = query.get("timestamp", ""), query.get("nonce", "")
        if not account.verifies(query.get("signature", ""), timestamp, nonce):
            return account, self._refuse(account, request, "signature", 401, "signature does not match")
        if not account.fresh(timestamp, self._ctx.clock.time()):
            return account, self._refuse(account, request, "signature", 403, "timestamp outside the window")
        return account, None

    async def handshake(self, request: web.Request) -> web.Response:
        """URL verification: echo ``echostr`` when the signature verifies."""
        account, refused = self._verified(request)
        if refused is not None:
            return refused
        echostr = request.query.get("echostr", "")
        if not echostr:
            return self._refuse(account, request, "malformed", 400, "echostr missing")
        return web.Response(text=echostr)

    async def handle(self, request: web.Request) -> web.Response:
        account, refused = self._verified(request)
        if refused is not None:
            return refused
        try:
            body = await read_body(request, self._limit)
            parse_body(body)  # verified (as far as Weibo signs): bounded parse, depth checked
        except InvalidInput as exc:
            reason: Refusal = "size" if exc.status == 413 else "malformed"
            return self._refuse(account, request, reason, exc.status, exc.reason)
        envelope = RawEnvelope(
            channel=CHANNEL,
            tenant=account.tenant,
            inbox=account.inbox,
            body=body,
            received_at=self._ctx.clock.now(),
            content_type=request.headers.get("Content-Type"),
            headers=envelope_headers(request),
            signature_verified=True,
            remote=request.remote,
            meta={"account": account.name},
        )
        return await self._intake.respond(self._ctx.ingest(envelope, normalize), name=account.name,
                                          ok=text_ok(""))

    def _refuse(
        self, account: Account, request: web.Request, reason: Refusal, status: int, why: str
    ) -> web.Response:
        logger.warning("weibo %s: refused %s from %s (%d): %s", account.name, request.method, request.remote,
                       status, why)
        self._ctx.metrics.refused(reason, inbox=account.inbox)
        return web.Response(status=status, text=why)

    async def drain(self, _: web.Application) -> None:
        await self._intake.drain()
