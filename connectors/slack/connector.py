"""Slack: the Events API at ``POST /slack/{inbox}/events``, or Socket Mode; one app installation per inbox.

Events API: the body is read within ``max_body_bytes`` and its signature (``v0:`` timestamp and raw
body, HMAC-SHA256, within 5 minutes of the gateway's clock) checked by slack-sdk's
``SignatureVerifier`` against every configured signing secret (two during a rotation) before the body
is parsed; a missing, wrong or stale signature is 401, logged and counted, and nothing is parsed.
``url_verification`` is answered with its challenge. An ``event_callback`` is handed to the pipeline
with Slack's ``X-Slack-Retry-Num`` as the envelope's retry count and its ``X-Slack-Retry-Reason`` in
``meta["retry_reason"]`` (the event's ``provenance.retry`` and ``provenance.retry_reason``); Slack
gets 200 only once it is stored (or understood as nothing to store), 400 with ``X-Slack-No-Retry: 1``
for content no retry can fix, and 503 when the store cannot take it now. Slack retries a callback it
has no answer for within 3 s, so the profile lookup and the store get ``profile_timeout`` +
``ingest_timeout`` (at most 2.7 s) and a slower commit is answered 503 but not cancelled: the retry
finds it stored.

Socket Mode (``mode = "socket"``): slack-sdk's aiohttp ``SocketModeClient`` opens the WebSocket with
the app-level token (apps.connections.open) and reconnects on ``disconnect`` and on a dead socket;
each ``events_api`` envelope goes through the same intake, and its ``envelope_id`` is acknowledged
only once the callback is stored. An envelope left unacknowledged is redelivered by Slack.

After the commit, the message's files are queued (insert-if-absent) and fetched with the bot token
by the shared media fetcher (files.info, then the private URL); replies go out with chat.postMessage
(:mod:`connectors.slack.sender`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Self

from aiohttp import web
from slack_sdk.signature import Clock as SlackClock
from slack_sdk.signature import SignatureVerifier

from connectors.base import read_webhook
from connectors.media import MediaPolicy, start_fetcher
from connectors.slack.api import WebApi
from connectors.slack.intake import Intake, Profiles
from connectors.slack.media import downloader
from connectors.slack.sender import SlackSender
from connectors.slack.settings import SlackInboxSettings, SlackSettings, policy_of
from connectors.slack.socket import SocketRunner
from connectors.slack.workspace import Workspace
from core.channel import ChannelContext, ChannelEndpoint, Clock
from core.errors import ConfigError, InvalidInput
from core.http import envelope_headers
from core.settings import Settings, revealed_all
from normalizers.slack import CHANNEL, parse

logger = logging.getLogger(__name__)

PREFIX = f"/{CHANNEL}"
TIMESTAMP_HEADER, SIGNATURE_HEADER = "X-Slack-Request-Timestamp", "X-Slack-Signature"
RETRY_NUM_HEADER, RETRY_REASON_HEADER = "X-Slack-Retry-Num", "X-Slack-Retry-Reason"
REPLAY_WINDOW = 300.0  # seconds, as slack-sdk's verifier and Slack's documentation
# An answer Slack must not retry: the same body can never succeed.
NO_RETRY = {"X-Slack-No-Retry": "1"}


class _VerifierClock(SlackClock):
    """slack-sdk's verifier on the gateway's clock (tests inject a fixed one)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def now(self) -> float:
        return self._clock.time()


class SlackConnector:
    """Mounts ``/slack/{inbox}/events``, starts Socket Mode clients and the file fetcher."""

    def __init__(self, table: SlackSettings, workspaces: Mapping[str, Workspace]) -> None:
        self.table = table
        self.workspaces = dict(workspaces)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        table = settings.channel(CHANNEL, SlackSettings)
        if table is None:
            return None
        workspaces: dict[str, Workspace] = {}
        for inbox, config in table.inboxes.items():
            workspaces[inbox] = _workspace(settings, inbox, config)
        return cls(table, workspaces)

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        """The Request URL for Event Subscriptions, or the Socket Mode connection."""
        return [
            ChannelEndpoint(inbox=inbox, kind="webhook", address=f"{base_url}{PREFIX}/{inbox}/events")
            if ws.mode == "events"
            else ChannelEndpoint(inbox=inbox, kind="socket", address=f"Socket Mode via {self.table.api_base}")
            for inbox, ws in self.workspaces.items()
        ]

    def setup(self, ctx: ChannelContext) -> None:

        table = self.table
        http = ctx.http(table.api_base, timeout=table.api_timeout)
        apis = {inbox: WebApi(http=http, token=ws.bot_token, timeout=table.api_timeout)
                for inbox, ws in self.workspaces.items()}
        fetcher = None
        fetching = {inbox: api for inbox, api in apis.items() if self.workspaces[inbox].fetch_files}
        if fetching:
            # files.info plus a large download: three calls' time for the lease.
            policy = MediaPolicy.from_table(table, api_calls=3)
            hosts = frozenset(h.lower() for h in table.file_hosts)
            download = downloader(fetching, max_bytes=table.media_max_bytes, hosts=hosts)
            fetcher = start_fetcher(ctx, CHANNEL, policy, download)
        profiles = Profiles(apis, ttl=table.profile_ttl, clock=ctx.clock)
        intake = Intake(ctx, self.workspaces, table, profiles, fetcher)
        endpoint = EventsEndpoint(ctx, self.workspaces, intake, table)
        sub = web.Application()
        sub.router.add_post("/{inbox}/events", endpoint.handle)
        sub.on_cleanup.append(intake.drain)
        ctx.add_app(PREFIX, sub)
        for inbox, ws in self.workspaces.items():
            if ws.mode == "socket":
                runner = SocketRunner(ctx, ws, intake, table)
                ctx.spawn(f"socket-{inbox}", runner.run, restart_after=5.0)
        ctx.add_sender(SlackSender.spec(apis, self.workspaces, ctx.blobs))


def _workspace(settings: Settings, inbox: str, config: SlackInboxSettings) -> Workspace:
    where = f"channels.{CHANNEL}.inboxes.{inbox}"
    bot_token = settings.required(config.bot_token, key=f"{where}.bot_token",
                                  why="users, files and replies cannot be fetched or sent")
    secrets: tuple[str, ...] = ()
    app_token = None
    if config.mode == "events":
        secret = settings.required(config.signing_secret, key=f"{where}.signing_secret",
                                   why="Slack's requests cannot be verified")
        secrets = (secret, *revealed_all(config.previous_signing_secret))
    else:
        app_token = settings.required(config.app_token, key=f"{where}.app_token",
                                      why="Socket Mode cannot connect")
        if not app_token.startswith("xapp-"):
            raise ConfigError("must be an app-level token (xapp-...), not a bot or user token",
                              file=settings.source, key=f"{where}.app_token")
    return Workspace(
        inbox=inbox,
        tenant=settings.inbox(inbox, key=where).tenant,
        mode=config.mode,
        policy=policy_of(config),
        fetch_files=config.fetch_files,
        profile_emails=config.profile_emails,
        dm_replies_in_thread=config.dm_replies_in_thread,
        bot_token=bot_token,
        app_token=app_token,
        signing_secrets=secrets,
    )


class EventsEndpoint:
    """``POST /slack/{inbox}/events``: verify, then answer the handshake or ingest the callback."""

    def __init__(
        self, ctx: ChannelContext, workspaces: Mapping[str, Workspace], intake: Intake, table: SlackSettings
    ) -> None:
        self._ctx = ctx
        self._workspaces = {inbox: ws for inbox, ws in workspaces.items() if ws.mode == "events"}
        self._verifiers = {
            inbox: tuple(SignatureVerifier(s, clock=_VerifierClock(ctx.clock)) for s in ws.signing_secrets)
            for inbox, ws in self._workspaces.items()
        }
        self._intake = intake
        self._limit = min(table.max_body_bytes, ctx.settings.server.max_body_bytes)

    async def handle(self, request: web.Request) -> web.Response:
        ws = self._workspaces.get(request.match_info["inbox"])
        if ws is None:
            return web.Response(status=404, text="no Events API installation for this inbox")
        body = await read_webhook(request, self._limit, log_as=f"slack {ws.inbox}",
                                   refused=partial(self._ctx.metrics.refused, inbox=ws.inbox))
        if isinstance(body, web.Response):
            return body
        problem = self._verify(ws, body, request.headers.get(TIMESTAMP_HEADER),
                               request.headers.get(SIGNATURE_HEADER))
        if problem is not None:
            logger.warning("slack %s: %s from %s; refused", ws.inbox, problem, request.remote)
            self._ctx.metrics.refused("signature", inbox=ws.inbox)
            return web.Response(status=401, text="invalid signature")
        try:
            callback = parse(body)
        except InvalidInput as exc:
            logger.info("slack %s: refused a signed body: %s", ws.inbox, exc.reason)
            self._ctx.metrics.refused("malformed", inbox=ws.inbox)
            return web.Response(status=400, text=exc.reason, headers=NO_RETRY)
        kind = callback.get("type")
        if kind == "url_verification":
            challenge = callback.get("challenge")
            if not isinstance(challenge, str):
                self._ctx.metrics.refused("malformed", inbox=ws.inbox)
                return web.Response(status=400, text="url_verification without a challenge", headers=NO_RETRY)
            logger.info("slack %s: answered url_verification", ws.inbox)
            return web.json_response({"challenge": challenge})
        if kind == "app_rate_limited":
            logger.warning("slack %s: Slack is dropping events for this app (app_rate_limited, minute %s)",
                           ws.inbox, callback.get("minute_rate_limited"))
            self._ctx.metrics.event("app_rate_limited", inbox=ws.inbox)
            return web.Response(status=200)
        result = await self._intake.deliver(
            ws, body, callback, transport="events_api",
            retry=_retry_num(request.headers.get(RETRY_NUM_HEADER)),
            retry_reason=request.headers.get(RETRY_REASON_HEADER), headers=envelope_headers(request),
            remote=request.remote, content_type=request.headers.get("Content-Type"),
        )
        return self._intake.work.answer(result, name=ws.inbox, ok=web.Response, rejected_headers=NO_RETRY)

    def _verify(self, ws: Workspace, body: bytes, timestamp: str | None, signature: str | None) -> str | None:
        """``None`` when one of the signing secrets signed ``body``, else why not (for the log)."""
        if not timestamp or not signature:
            return "unsigned request"
        try:
            sent = int(timestamp)
            text = body.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return "malformed signature headers or a body that is not UTF-8"
        if abs(self._ctx.clock.time() - sent) > REPLAY_WINDOW:
            return f"stale request (timestamp {sent} is outside the 5-minute window)"
        valid = False
        for verifier in self._verifiers[ws.inbox]:
            # Every secret is tried, so the time taken does not say which one matched.
            valid |= verifier.is_valid(body=text, timestamp=timestamp, signature=signature)
        return None if valid else "wrong signature"


def _retry_num(value: str | None) -> int:
    try:
        return max(int(value), 0) if value is not None else 0
    except ValueError:
        return 0
