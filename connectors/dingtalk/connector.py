"""DingTalk robots: Stream mode (the gateway connects out), or the HTTP callback at
``POST /dingtalk/{inbox}``; one internal app's robot per inbox.

HTTP callback: DingTalk sends ``timestamp`` (milliseconds) and ``sign`` = base64(HMAC-SHA256(app
secret, timestamp + "\\n" + app secret)). Both are checked before the body is read: the timestamp
within ``replay_window`` (DingTalk's rule: an hour) of the gateway's clock and the signature in
constant time against every configured secret (two during a rotation); missing, wrong or stale is
401, logged and counted. DingTalk's signature does not cover the body (its design): the body is
trusted because the request carries a fresh signature only DingTalk and we can make, and robot
callbacks are not encrypted (DingTalk encrypts event subscriptions, not robot messages). 200 once
stored, 400 for a body that is not JSON, 503 when the store cannot take it now.

Stream mode: :mod:`connectors.dingtalk.stream`.

After the commit the message's media are queued for the robot file download API and the employee's
work email from the directory is linked to the customer as a verified identity.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Self

from aiohttp import web

from connectors.base import read_webhook
from connectors.dingtalk.api import DingTalkApi
from connectors.dingtalk.bot import Bot
from connectors.dingtalk.intake import Intake, directory
from connectors.dingtalk.media import downloader
from connectors.dingtalk.sender import DingTalkSender
from connectors.dingtalk.settings import DingTalkInboxSettings, DingTalkSettings
from connectors.dingtalk.stream import StreamRunner
from connectors.media import MediaPolicy, start_fetcher
from core.channel import ChannelContext, ChannelEndpoint
from core.errors import ConfigError, InvalidInput
from core.http import envelope_headers
from core.settings import Settings, revealed, revealed_all
from normalizers.dingtalk import CHANNEL, parse

logger = logging.getLogger(__name__)

PREFIX = f"/{CHANNEL}"
TIMESTAMP_HEADER, SIGN_HEADER = "timestamp", "sign"


class DingTalkConnector:
    def __init__(self, table: DingTalkSettings, bots: Mapping[str, Bot]) -> None:
        self.table = table
        self.bots = dict(bots)
        self.runners: dict[str, StreamRunner] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        table = settings.channel(CHANNEL, DingTalkSettings)
        if table is None:
            return None
        return cls(table, {inbox: _bot(settings, inbox, c) for inbox, c in table.inboxes.items()})

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        return [
            ChannelEndpoint(inbox=inbox, kind="webhook", address=f"{base_url}{PREFIX}/{inbox}")
            if bot.mode == "http"
            else ChannelEndpoint(inbox=inbox, kind="stream", address=f"Stream mode via {self.table.api_base}")
            for inbox, bot in self.bots.items()
        ]

    def setup(self, ctx: ChannelContext) -> None:
        table = self.table
        api_http = ctx.http(table.api_base, timeout=table.api_timeout)
        oapi_http = ctx.http(table.oapi_base, timeout=table.api_timeout)
        apis = {
            inbox: DingTalkApi(
                api=api_http,
                oapi=oapi_http,
                app_key=bot.app_key,
                app_secret=bot.app_secret,
                clock=ctx.clock,
                timeout=table.api_timeout,
            )
            for inbox, bot in self.bots.items()
        }
        fetcher = None
        fetching = {inbox: api for inbox, api in apis.items() if self.bots[inbox].fetch_media}
        if fetching:
            download = downloader(fetching, max_bytes=table.media_max_bytes)
            fetcher = start_fetcher(ctx, CHANNEL, MediaPolicy.from_table(table, api_calls=5), download)
        intake = Intake(
            ctx, self.bots, table, directory(apis, ttl=table.directory_ttl, clock=ctx.clock), fetcher
        )
        endpoint = CallbackEndpoint(ctx, self.bots, intake, table)
        sub = web.Application()
        sub.router.add_post("/{inbox}", endpoint.handle)
        sub.on_cleanup.append(intake.drain)
        ctx.add_app(PREFIX, sub)
        for inbox, bot in self.bots.items():
            if bot.mode == "stream":
                runner = StreamRunner(ctx, bot, apis[inbox], intake, table)
                self.runners[inbox] = runner
                ctx.spawn(f"stream-{inbox}", runner.run, restart_after=table.stream_first_backoff)
        ctx.add_sender(
            DingTalkSender.spec(
                apis, self.bots, oapi_base=table.oapi_base, clock=ctx.clock, rate=table.send_rate
            )
        )


def _bot(settings: Settings, inbox: str, config: DingTalkInboxSettings) -> Bot:
    where = f"channels.{CHANNEL}.inboxes.{inbox}"
    secret = revealed(config.app_secret)
    if not secret or not config.app_key:
        raise ConfigError(
            "app_key and app_secret are required (callbacks cannot be verified, nor the Stream "
            "opened, without them)",
            file=settings.source,
            key=f"{where}.app_secret",
        )
    return Bot(
        inbox=inbox,
        tenant=settings.inbox(inbox, key=where).tenant,
        mode=config.mode,
        app_key=config.app_key,
        robot_code=config.robot_code or config.app_key,
        fetch_media=config.fetch_media,
        directory_emails=config.directory_emails,
        app_secret=secret,
        secrets=(secret, *revealed_all(config.previous_app_secret)),
    )


class CallbackEndpoint:
    """``POST /dingtalk/{inbox}``: verify the signed timestamp, then ingest the robot message."""

    def __init__(
        self, ctx: ChannelContext, bots: Mapping[str, Bot], intake: Intake, table: DingTalkSettings
    ) -> None:
        self._ctx = ctx
        self._bots = {inbox: bot for inbox, bot in bots.items() if bot.mode == "http"}
        self._intake = intake
        self._window = table.replay_window
        self._limit = min(table.max_body_bytes, ctx.settings.server.max_body_bytes)

    async def handle(self, request: web.Request) -> web.Response:
        bot = self._bots.get(request.match_info["inbox"])
        if bot is None:
            return web.Response(status=404, text="no DingTalk HTTP callback for this inbox")
        problem = self._verify(bot, request.headers.get(TIMESTAMP_HEADER), request.headers.get(SIGN_HEADER))
        if problem is not None:
            logger.warning("dingtalk %s: %s from %s; refused", bot.inbox, problem, request.remote)
            self._ctx.metrics.refused("signature", inbox=bot.inbox)
            return web.Response(status=401, text="invalid signature")
        body = await read_webhook(request, self._limit, log_as=f"dingtalk {bot.inbox}",
                                   refused=partial(self._ctx.metrics.refused, inbox=bot.inbox))
        if isinstance(body, web.Response):
            return body
        try:
            parse(body)
        except InvalidInput as exc:
            self._ctx.metrics.refused("malformed", inbox=bot.inbox)
            return web.Response(status=400, text=exc.reason)
        headers = envelope_headers(request, without=SIGN_HEADER)
        result = await self._intake.deliver(
            bot, body, transport="http", headers=headers, remote=request.remote
        )
        return self._intake.work.answer(result, name=bot.inbox, ok=lambda: web.json_response({}))

    def _verify(self, bot: Bot, timestamp: str | None, sign: str | None) -> str | None:
        if not timestamp or not sign:
            return "unsigned request"
        try:
            sent = int(timestamp) / 1000
        except ValueError:
            return "malformed timestamp"
        if abs(self._ctx.clock.time() - sent) > self._window:
            return f"stale timestamp ({timestamp})"
        return None if bot.verifies(timestamp, sign) else "wrong signature"
