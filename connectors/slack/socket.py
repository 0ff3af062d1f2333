"""Socket Mode: events over a WebSocket the gateway opens, for deployments without a public URL.

slack-sdk's aiohttp ``SocketModeClient`` asks apps.connections.open (with the app-level token, on
the configured ``api_base``) for a WebSocket URL, connects, pings, and reconnects when Slack sends
``disconnect`` or the socket goes quiet. Every ``events_api`` envelope goes through the same intake
as an Events API request; its ``envelope_id`` is acknowledged only once the callback is stored (or
understood as nothing to store, or refused for good), so an envelope the store could not take is
redelivered by Slack (``retry_attempt``, ``retry_reason``: the envelope's retry count and reason, as
the Events API headers give them). Other envelope types (slash commands, interactivity) are not
tickets: acknowledged and counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.async_client import AsyncBaseSocketModeClient
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient

from connectors.slack.intake import Intake
from connectors.slack.settings import SlackSettings
from connectors.slack.workspace import Workspace
from core.channel import ChannelContext
from core.errors import InvalidInput
from core.model import Outcome
from normalizers.slack import parse

logger = logging.getLogger(__name__)


class SocketRunner:
    """One installation's Socket Mode connection, for the gateway's lifetime (supervised by ``spawn``)."""

    def __init__(self, ctx: ChannelContext, ws: Workspace, intake: Intake, table: SlackSettings) -> None:
        self._ctx = ctx
        self._ws = ws
        self._intake = intake
        self._table = table
        self.client: SocketModeClient | None = None

    async def run(self) -> None:
        assert self._ws.app_token is not None  # from_settings requires it for mode = "socket"
        web_client = AsyncWebClient(
            base_url=self._table.api_base.rstrip("/") + "/", timeout=int(max(self._table.api_timeout, 1)),
            retry_handlers=[],
        )
        client = SocketModeClient(
            app_token=self._ws.app_token, web_client=web_client, auto_reconnect_enabled=True,
            ping_interval=self._table.socket_ping_interval, logger=logging.getLogger(f"{__name__}.sdk"),
        )
        client.message_listeners.append(self._on_message)
        self.client = client
        try:
            await client.connect()  # type: ignore[no-untyped-call]
            logger.info("slack %s: Socket Mode connected", self._ws.inbox)
            await asyncio.Event().wait()  # the client's own tasks receive; this task holds them
        finally:
            self.client = None
            await client.close()  # type: ignore[no-untyped-call]

    async def _on_message(self, client: AsyncBaseSocketModeClient, message: dict[str, Any],
                          raw: str | None) -> None:
        kind, envelope_id = message.get("type"), message.get("envelope_id")
        if kind in ("hello", "disconnect") or not isinstance(envelope_id, str):
            if kind == "disconnect":
                logger.info("slack %s: Socket Mode disconnect (%s); reconnecting", self._ws.inbox,
                            message.get("reason"))
            return
        inbox = self._ws.inbox
        if kind != "events_api":
            self._ctx.metrics.event("socket_envelope_ignored", inbox=inbox)
            await self._ack(client, envelope_id)
            return
        body = raw.encode("utf-8") if raw is not None else orjson.dumps(message)
        try:
            callback = parse(body, socket=True)
        except InvalidInput as exc:
            logger.warning("slack %s: Socket Mode envelope %s refused: %s", inbox, envelope_id, exc.reason)
            self._ctx.metrics.refused("malformed", inbox=inbox)
            await self._ack(client, envelope_id)
            return
        attempt = message.get("retry_attempt")
        reason = message.get("retry_reason")
        result = await self._intake.deliver(
            self._ws, body, callback, transport="socket",
            retry=attempt if isinstance(attempt, int) and attempt > 0 else 0,
            retry_reason=reason if isinstance(reason, str) and reason else None,
        )
        if result.stored or result.outcome is Outcome.REJECTED:
            if result.outcome is Outcome.REJECTED:
                logger.info("slack %s: envelope %s rejected: %s", inbox, envelope_id, result.reason)
            await self._ack(client, envelope_id)
            return
        # Not acknowledged: Slack redelivers the envelope, and the stored copy (if the commit finished
        # after all) answers it as a duplicate.
        logger.warning("slack %s: cannot store envelope %s now (%s); not acknowledged", inbox, envelope_id,
                       result.reason)

    async def _ack(self, client: AsyncBaseSocketModeClient, envelope_id: str) -> None:
        try:
            await client.send_socket_mode_response(SocketModeResponse(envelope_id=envelope_id))
        except Exception as exc:  # a socket being replaced: Slack redelivers, the store dedupes
            logger.warning("slack %s: acknowledging %s failed: %s", self._ws.inbox, envelope_id,
                           type(exc).__name__)
