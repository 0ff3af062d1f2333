"""Feishu's long connection (长连接): events over a WebSocket the gateway opens, for deployments
without a public URL. Our own client of the protocol lark-oapi's ``ws.Client`` speaks:

1. ``POST {api_base}/callback/ws/endpoint`` with ``{"AppID", "AppSecret"}``: a ``URL`` (with its
   ``service_id``) and a ``ClientConfig`` (``PingInterval`` in seconds, among others).
2. Connect; frames are protobuf ``pbbp2.Frame`` (:mod:`connectors.feishu.frame`) in binary messages.
   Every ``PingInterval`` a control frame ``type = ping`` goes out; the ``pong`` may carry a new
   ``ClientConfig``. A socket silent for three intervals is replaced.
3. A data frame ``type = event`` carries the event JSON (in ``sum`` parts, joined by ``message_id``
   and ``seq``). It goes through the same intake as an HTTP callback (same idempotency, same
   bounded ingest), and the frame is answered with its headers plus ``biz_rt`` and the payload
   ``{"code": 200}`` only once stored (or understood as nothing to store); ``{"code": 500}`` when
   the store cannot take it now, and nothing when the socket dropped first: Feishu delivers again,
   and the stored message answers the repeat as a duplicate.
4. A closed or failed connection is reopened after a pause doubling from ``ws_first_backoff`` to
   ``ws_max_backoff``, starting over once a connection held (:func:`connectors.base.keep_connected`,
   shared with DingTalk's Stream).

Why not lark-oapi's client: it runs its own loop and reconnect policy with ``websockets`` and
``requests`` (blocking), answers each event before our commit could be awaited in its handler
contract, and would bring protobuf and the whole SDK for one message type.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson

from connectors.base import Reconnect, keep_connected
from connectors.feishu.api import FeishuApi, FeishuError
from connectors.feishu.app import App
from connectors.feishu.frame import CONTROL, DATA, Frame, FrameError, decode, encode
from connectors.feishu.settings import FeishuSettings
from core.channel import ChannelContext
from core.errors import InvalidInput
from core.model import IngestResult, Outcome
from normalizers.feishu import Callback, parse

logger = logging.getLogger(__name__)

MAX_PARTIAL = 1000  # events being reassembled from parts at once


class Delivers(Protocol):
    """The intake shared with the HTTP endpoint (:class:`connectors.feishu.connector.Intake`)."""

    async def deliver(
        self,
        app: App,
        plain: bytes,
        callback: Callback,
        *,
        transport: str,
        headers: Mapping[str, str] | None = None,
        remote: str | None = None,
    ) -> IngestResult: ...


class WsRunner:
    """One app's long connection for the gateway's lifetime."""

    def __init__(
        self, ctx: ChannelContext, app: App, api: FeishuApi, intake: Delivers, table: FeishuSettings
    ) -> None:
        self._ctx = ctx
        self._app = app
        self._api = api
        self._intake = intake
        self._table = table
        self._ping_interval = table.ws_ping_interval
        self._parts: dict[str, list[bytes | None]] = {}
        self.connections = 0
        self._reconnect = Reconnect(
            channel="feishu", what="long connection", metric="ws_reconnect",
            first_backoff=table.ws_first_backoff, max_backoff=table.ws_max_backoff,
            opening_errors=(FeishuError,),
        )

    async def run(self) -> None:
        await keep_connected(self._connect_once, self._reconnect, inbox=self._app.inbox,
                             clock=self._ctx.clock, metrics=self._ctx.metrics, log=logger)

    async def _endpoint(self) -> tuple[str, int]:
        data = await self._api._call(
            "POST",
            "/callback/ws/endpoint",
            token=None,
            json={"AppID": self._app.app_id, "AppSecret": self._app.app_secret},
            headers_extra={"locale": "zh"},
        )
        endpoint = data.get("data") if isinstance(data.get("data"), dict) else {}
        assert isinstance(endpoint, dict)
        url = endpoint.get("URL")
        if not isinstance(url, str) or not url:
            raise FeishuError("callback/ws/endpoint", -2, "no URL in the answer")
        self._configure(endpoint.get("ClientConfig"))
        service = parse_qs(urlsplit(url).query).get("service_id", ["0"])[0]
        return url, int(service) if service.isdigit() else 0

    def _configure(self, config: object) -> None:
        if (
            isinstance(config, dict)
            and isinstance(config.get("PingInterval"), int)
            and config["PingInterval"] > 0
        ):
            self._ping_interval = float(config["PingInterval"])

    async def _connect_once(self) -> None:
        url, service = await self._endpoint()
        async with self._api.http.session.ws_connect(url, autoping=True) as ws:
            self.connections += 1
            logger.info("feishu %s: long connection open", self._app.inbox)
            pinger = asyncio.create_task(self._ping(ws, service))
            try:
                while True:
                    message = await ws.receive(timeout=self._ping_interval * 3)
                    if message.type == aiohttp.WSMsgType.BINARY:
                        await self._on_frame(ws, message.data)
                    elif message.type in (
                        aiohttp.WSMsgType.CLOSE,
                        aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.CLOSING,
                        aiohttp.WSMsgType.ERROR,
                    ):
                        return
            finally:
                pinger.cancel()

    async def _ping(self, ws: aiohttp.ClientWebSocketResponse, service: int) -> None:
        while not ws.closed:
            frame = Frame(service=service, method=CONTROL, headers=[("type", "ping")])
            try:
                await ws.send_bytes(encode(frame))
            except (aiohttp.ClientError, ConnectionError, RuntimeError):
                return
            await asyncio.sleep(self._ping_interval)

    async def _on_frame(self, ws: aiohttp.ClientWebSocketResponse, data: bytes) -> None:
        try:
            frame = decode(data)
        except FrameError:
            self._ctx.metrics.refused("malformed", inbox=self._app.inbox)
            return
        kind = frame.header("type")
        if frame.method == CONTROL:
            if kind == "pong" and frame.payload:
                with contextlib.suppress(orjson.JSONDecodeError):
                    self._configure(orjson.loads(frame.payload))
            return
        if frame.method != DATA:
            return
        started = time.monotonic()
        payload = self._join(frame)
        if payload is None:
            return  # more parts to come
        code = 200
        if kind == "event":
            code = await self._deliver(payload)
        else:
            self._ctx.metrics.event("ws_frame_ignored", inbox=self._app.inbox)
        frame.headers.append(("biz_rt", str(int((time.monotonic() - started) * 1000))))
        frame.payload = orjson.dumps({"code": code, "headers": None, "data": None})
        try:
            await ws.send_bytes(encode(frame))
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            # The socket is going: Feishu delivers the event again, the store dedupes it.
            logger.info("feishu %s: answering an event failed: %s", self._app.inbox, type(exc).__name__)

    def _join(self, frame: Frame) -> bytes | None:
        total = int(frame.header("sum") or "1") if (frame.header("sum") or "1").isdigit() else 1
        if total <= 1:
            return frame.payload
        seq_text = frame.header("seq") or "0"
        seq = int(seq_text) if seq_text.isdigit() else 0
        key = frame.header("message_id") or ""
        parts = self._parts.get(key)
        if parts is None:
            if len(self._parts) >= MAX_PARTIAL:
                self._parts.pop(next(iter(self._parts)))
            parts = self._parts[key] = [None] * min(total, 64)
        if 0 <= seq < len(parts):
            parts[seq] = frame.payload
        if any(p is None for p in parts):
            return None
        del self._parts[key]
        return b"".join(p for p in parts if p is not None)

    async def _deliver(self, payload: bytes) -> int:
        try:
            callback = parse(payload)
        except InvalidInput as exc:
            logger.warning("feishu %s: long-connection event refused: %s", self._app.inbox, exc.reason)
            self._ctx.metrics.refused("malformed", inbox=self._app.inbox)
            return 200  # no retry can fix it
        result = await self._intake.deliver(self._app, payload, callback, transport="ws")
        if result.stored or result.outcome is Outcome.REJECTED:
            return 200
        logger.warning(
            "feishu %s: cannot store a long-connection event now (%s)", self._app.inbox, result.reason
        )
        return 500
