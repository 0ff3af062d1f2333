"""DingTalk Stream mode: robot messages over a WebSocket the gateway opens (no public URL needed).

Written against DingTalk's Stream protocol rather than with the ``dingtalk-stream`` SDK: the SDK
runs its own reconnect loop (a fixed pause, errors swallowed) around the ``websockets`` library,
and what matters here (acknowledge only after the commit, backoff, supervision, a local server in
tests) is a hundred lines on aiohttp's client.

1. ``POST {api_base}/v1.0/gateway/connections/open`` with the client id and secret and the
   subscription ``CALLBACK /v1.0/im/bot/messages/get``: an ``endpoint`` and a one-time ``ticket``.
2. Connect to ``{endpoint}?ticket=…``; aiohttp's heartbeat pings the socket and replaces it when it
   goes quiet.
3. Frames are JSON: ``{"specVersion", "type", "headers": {"topic", "messageId", ...}, "data"}``.
   ``SYSTEM``/``ping`` is answered with its data; ``SYSTEM``/``disconnect`` (DingTalk moving the
   connection) closes it and reconnects; a ``CALLBACK`` on the robot topic goes through the same
   intake as the HTTP callback and is acknowledged (``{"code": 200, "headers": {"messageId"}, ...}``)
   only once stored (or refused for good): a message whose commit failed, or whose connection
   dropped before the acknowledgement, is redelivered by DingTalk and found stored.
4. A closed or failed connection is reopened after a pause that doubles from
   ``stream_first_backoff`` up to ``stream_max_backoff``, and starts over once a connection held
   (:func:`connectors.base.keep_connected`, shared with Feishu's long connection).
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import orjson

from connectors.base import Reconnect, keep_connected
from connectors.dingtalk.api import DingTalkApi, DingTalkError
from connectors.dingtalk.bot import Bot
from connectors.dingtalk.intake import Intake
from connectors.dingtalk.settings import DingTalkSettings
from core.channel import ChannelContext
from core.model import Outcome
from normalizers.dingtalk import TOPIC

logger = logging.getLogger(__name__)


class StreamRunner:
    """One robot's Stream connection for the gateway's lifetime."""

    def __init__(
        self, ctx: ChannelContext, bot: Bot, api: DingTalkApi, intake: Intake, table: DingTalkSettings
    ) -> None:
        self._ctx = ctx
        self._bot = bot
        self._api = api
        self._intake = intake
        self._table = table
        self.connections = 0  # how many times a socket was opened (for the status and tests)
        self._reconnect = Reconnect(
            channel="dingtalk", what="Stream connection", metric="stream_reconnect",
            first_backoff=table.stream_first_backoff, max_backoff=table.stream_max_backoff,
            opening_errors=(DingTalkError,),
        )

    async def run(self) -> None:
        await keep_connected(self._connect_once, self._reconnect, inbox=self._bot.inbox,
                             clock=self._ctx.clock, metrics=self._ctx.metrics, log=logger)

    async def _connect_once(self) -> None:
        opened = await self._api.request(
            self._api.api,
            "POST",
            "/v1.0/gateway/connections/open",
            token=None,
            json={
                "clientId": self._bot.app_key,
                "clientSecret": self._bot.app_secret,
                "subscriptions": [{"type": "CALLBACK", "topic": TOPIC}],
                "ua": "ticketgate",
                "localIp": "",
            },
        )
        endpoint, ticket = opened.get("endpoint"), opened.get("ticket")
        if not isinstance(endpoint, str) or not isinstance(ticket, str):
            raise DingTalkError("connections/open", "no_endpoint", "no endpoint or ticket in the answer")
        async with self._api.api.session.ws_connect(
            endpoint,
            params={"ticket": ticket},
            heartbeat=self._table.stream_heartbeat,
            timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
        ) as ws:
            self.connections += 1
            logger.info("dingtalk %s: Stream connected", self._bot.inbox)
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    if frame.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                        break
                    continue
                if not await self._on_frame(ws, frame.data):
                    break

    async def _on_frame(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> bool:
        """Handle one frame; ``False`` when the connection is to be replaced."""
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError:
            self._ctx.metrics.refused("malformed", inbox=self._bot.inbox)
            return True
        if not isinstance(frame, dict):
            return True
        headers = frame.get("headers") if isinstance(frame.get("headers"), dict) else {}
        assert isinstance(headers, dict)
        kind, topic, message_id = frame.get("type"), headers.get("topic"), headers.get("messageId")
        data = frame.get("data")
        if kind == "SYSTEM":
            if topic == "ping":
                await self._ack(ws, message_id, data if isinstance(data, str) else "")
                return True
            if topic == "disconnect":
                logger.info("dingtalk %s: DingTalk asked to reconnect", self._bot.inbox)
                return False
            return True
        if kind == "CALLBACK" and topic == TOPIC and isinstance(data, str):
            result = await self._intake.deliver(self._bot, data.encode(), transport="stream", wait=True)
            if result.stored or result.outcome is Outcome.REJECTED:
                await self._ack(ws, message_id, orjson.dumps({"response": None}).decode())
            else:
                # Not acknowledged: DingTalk redelivers, and the stored copy answers it as a duplicate.
                logger.warning(
                    "dingtalk %s: cannot store stream message now (%s); not acknowledged",
                    self._bot.inbox,
                    result.reason,
                )
            return True
        # Events and other callbacks are not tickets: acknowledged, counted.
        self._ctx.metrics.event("stream_frame_ignored", inbox=self._bot.inbox)
        await self._ack(ws, message_id, orjson.dumps({"status": "SUCCESS", "message": "ignored"}).decode())
        return True

    async def _ack(self, ws: aiohttp.ClientWebSocketResponse, message_id: Any, data: str) -> None:
        if not isinstance(message_id, str):
            return
        answer = {
            "code": 200,
            "headers": {"contentType": "application/json", "messageId": message_id},
            "message": "OK",
            "data": data,
        }
        try:
            await ws.send_str(orjson.dumps(answer).decode())
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            # The socket is going: DingTalk redelivers what it has no acknowledgement for.
            logger.info(
                "dingtalk %s: acknowledging %s failed: %s", self._bot.inbox, message_id, type(exc).__name__
            )
