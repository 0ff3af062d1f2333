"""The live web chat: ``/chat/{inbox}/widget.js``, the socket ``/chat/{inbox}/ws``, uploads and the
demo page ``/chat/{inbox}``.

The widget opens a WebSocket, says ``hello`` with its session token (kept in the browser's storage)
and, for a signed-in visitor, the identity its site signed; the gateway answers ``welcome`` with the
(possibly new) token and the replies held for the visitor. Each ``message`` frame carries a
``client_id`` and is answered ``ack`` only once it is committed (``result.stored``), or ``error``
with ``retry_after`` (the widget keeps it queued and sends it again) or a permanent reason. Files go
up as ``POST /chat/{inbox}/messages`` (multipart, ``Authorization: Bearer <token>``), answered the
same way. The protocol is written out in docs/channels/webchat.md.

Bounds: the origin allow-list on the socket and the uploads; per-visitor and per-IP message rates;
per-IP connection rate; sockets in total and per IP (``max_sockets``, kept below
``server.max_connections`` so chats never take the connections the rest of the gateway needs);
frame, text and upload sizes; a hello deadline; heartbeats; an idle timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from importlib.resources import files
from string import Template
from typing import Any, Self
from urllib.parse import quote, urlsplit

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from connectors.base import ChannelContext, ChannelMetrics, Ingest
from connectors.form.i18n import pick_language
from connectors.webchat import tokens
from connectors.webchat.i18n import STRINGS
from connectors.webchat.live import (
    Bulletin,
    Conversations,
    HeldReplies,
    Peer,
    WebchatSender,
    reply_frame,
    report,
)
from connectors.webchat.settings import WebchatInboxSettings, WebchatSettings
from core.channel import ChannelEndpoint, DeliveryStatus, SenderSpec
from core.errors import ConfigError, InvalidInput
from core.http import (
    BearerKeys,
    ClientAddress,
    RateLimiter,
    envelope_headers,
    ingest_within,
    json_error,
    json_response,
    read_body,
    refuse_credentials,
    retry_after_value,
)
from core.model import IngestResult, Outcome, RawEnvelope
from core.settings import Settings
from normalizers.form import parse_form
from normalizers.webchat import client_id_of, normalize_webchat, parse_frame

logger = logging.getLogger(__name__)

CHANNEL = "webchat"
PREFIX = "/chat"
# Connections the rest of the gateway keeps whatever the chats hold.
HTTP_HEADROOM = 64
# Close codes (4000-4999 are the application's): the widget reads them.
CLOSE_UNAUTHORIZED = 4401
CLOSE_IDLE = 4408
CLOSE_RATE = 4429
CLOSE_PROTOCOL = 4400

_PACKAGE = files("connectors.webchat")
WIDGET_JS = _PACKAGE.joinpath("static/widget.js").read_bytes()
_DEMO = Template(_PACKAGE.joinpath("static/demo.html").read_text(encoding="utf-8"))


def _style_hash(html: str) -> str:
    start = html.index("<style>") + len("<style>")
    css = html[start : html.index("</style>")]
    return base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()


_DEMO_STYLE = _style_hash(_DEMO.template)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Inbox:
    id: str
    tenant: str
    titles: Mapping[str, str]
    greetings: Mapping[str, str]
    identity_secrets: tuple[bytes, ...]
    allowed_origins: frozenset[str]
    allow_missing_origin: bool
    demo_page: bool
    upload_types: tuple[str, ...]
    has_agent_keys: bool

    def upload_allowed(self, content_type: str) -> bool:
        kind = content_type.split(";", 1)[0].strip().lower()
        family = kind.split("/", 1)[0]
        return kind in self.upload_types or f"{family}/*" in self.upload_types


@dataclass(frozen=True, slots=True, kw_only=True)
class _Config:
    channel: WebchatSettings
    inboxes: Mapping[str, _Inbox]
    session_secrets: tuple[bytes, ...]
    max_sockets: int
    client_ip: ClientAddress
    public_url: str | None
    public_host: str | None
    agent_keys: BearerKeys[str]


def _secret_bytes(*secrets_: Any) -> tuple[bytes, ...]:
    return tuple(s.get_secret_value().encode() for s in secrets_ if s is not None)


class WebchatConnector:
    """Serves the widget and its socket; configuration only, the live state is built in ``setup``."""

    name = CHANNEL

    def __init__(self, config: _Config) -> None:
        self._config = config

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        channel = settings.channel(CHANNEL, WebchatSettings)
        if channel is None:
            return None
        if channel.session_secret is None:
            raise ConfigError(
                "the web chat needs session_secret to sign visitor sessions",
                file=settings.source,
                key="channels.webchat.session_secret",
            )
        room = settings.server.max_connections - HTTP_HEADROOM
        max_sockets = channel.max_sockets or max(1, settings.server.max_connections // 2)
        if max_sockets > room:
            raise ConfigError(
                f"max_sockets ({max_sockets}) must leave {HTTP_HEADROOM} of server.max_connections "
                f"({settings.server.max_connections}) to the rest of the gateway: raise "
                "server.max_connections or lower max_sockets",
                file=settings.source,
                key="channels.webchat.max_sockets",
            )
        inboxes: dict[str, _Inbox] = {}
        agent_keys: BearerKeys[str] = BearerKeys(what="a web chat agent key", source=settings.source)
        for inbox_id, config in channel.inboxes.items():
            for key in config.agent_keys:
                agent_keys.add(key, inbox_id, where=f"channels.webchat.inboxes.{inbox_id}.agent_keys")
            if not inbox_id or "/" in inbox_id:
                raise ConfigError(
                    "web chat inbox ids must be non-empty and contain no '/'",
                    file=settings.source,
                    key="channels.webchat.inboxes",
                )
            inbox = settings.inbox(inbox_id, key=f"channels.webchat.inboxes.{inbox_id}")
            if config.demo_page and config.identity_secret is not None:
                # The demo page signs whatever user id its URL names: anyone can be anyone there.
                logger.warning(
                    "webchat %s: demo_page signs any ?user_id= with the identity secret; development only",
                    inbox_id,
                )
            inboxes[inbox_id] = _inbox(inbox_id, inbox.tenant, inbox.name, config)
        public_url = (settings.server.public_url or "").rstrip("/") or None
        return cls(
            _Config(
                channel=channel,
                inboxes=inboxes,
                session_secrets=_secret_bytes(channel.session_secret, channel.previous_session_secret),
                max_sockets=max_sockets,
                client_ip=ClientAddress(settings.server.trusted_proxies),
                public_url=public_url,
                public_host=urlsplit(public_url).netloc.lower() if public_url else None,
                agent_keys=agent_keys,
            )
        )

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        found = []
        for inbox_id, inbox in self._config.inboxes.items():
            base = f"{base_url}{PREFIX}/{quote(inbox_id)}"
            found.append(ChannelEndpoint(inbox=inbox_id, kind="embed", address=f"{base}/widget.js"))
            if inbox.demo_page:
                found.append(ChannelEndpoint(inbox=inbox_id, kind="demo", address=base))
        return found

    def setup(self, ctx: ChannelContext) -> None:
        conversations = Conversations()
        held = HeldReplies(ctx.state, self._config.channel.held_replies)
        bulletin = Bulletin(ctx.state, held, conversations)
        sender = WebchatSender(held, conversations, ctx.clock.now, bulletin)
        inboxes = tuple(self._config.inboxes)
        interval = self._config.channel.bulletin_interval
        ctx.spawn("reply-bulletin", lambda: bulletin.watch(inboxes, interval), restart_after=interval)
        handlers = _Handlers(self._config, ctx, conversations, held)
        sub = web.Application()
        sub.router.add_get("/{inbox}", handlers.demo)
        sub.router.add_get("/{inbox}/widget.js", handlers.widget)
        sub.router.add_get("/{inbox}/ws", handlers.socket)
        sub.router.add_post("/{inbox}/messages", handlers.post_message)
        sub.router.add_route("OPTIONS", "/{inbox}/messages", handlers.preflight)
        sub.router.add_route("OPTIONS", "/{inbox}/files/{sha256}", handlers.preflight)
        sub.router.add_get("/{inbox}/files/{sha256}", handlers.reply_file)
        sub.router.add_post("/{inbox}/agent/typing", handlers.agent_typing)
        sub.router.add_post("/{inbox}/agent/read", handlers.agent_read)
        sub.router.add_get("/{inbox}/agent/activity", handlers.agent_activity)
        sub.on_shutdown.append(handlers.shutdown)

        async def stop_sender(_app: web.Application) -> None:
            await sender.close()

        sub.on_cleanup.append(stop_sender)
        ctx.add_app(PREFIX, sub)
        # The chat is always open: no reply window; pushing costs nothing, so the rate is generous.
        ctx.add_sender(SenderSpec(sender=sender, window=None, rate=50.0, burst=100, idempotent=True))


def _inbox(inbox_id: str, tenant: str, name: str | None, config: WebchatInboxSettings) -> _Inbox:
    english = config.title or name or STRINGS["en"]["default_title"]
    chinese = config.title_zh or config.title or name or STRINGS["zh"]["default_title"]
    return _Inbox(
        id=inbox_id,
        tenant=tenant,
        titles={"en": english, "zh": chinese},
        greetings={
            "en": config.greeting or STRINGS["en"]["default_greeting"],
            "zh": config.greeting_zh or STRINGS["zh"]["default_greeting"],
        },
        identity_secrets=_secret_bytes(config.identity_secret, config.previous_identity_secret),
        allowed_origins=frozenset(config.allowed_origins),
        allow_missing_origin=config.allow_missing_origin,
        demo_page=config.demo_page,
        upload_types=tuple(t.lower() for t in config.upload_types),
        has_agent_keys=bool(config.agent_keys),
    )


def _origin_of(request: web.Request) -> str | None:
    """The page's origin; ``None`` for none, an opaque ``null`` or a page that is not on the web
    (``file://``, an app's own scheme: an H5 page in a WebView), which only ``allow_missing_origin``
    admits. A browser never lets a web page claim such an origin."""
    origin = (request.headers.get("Origin") or "").strip().lower()
    if not origin.startswith(("http://", "https://")):
        return None
    return origin


def _page(value: object) -> str | None:
    """The page the visitor is on, without its query and fragment (they may carry a site's tokens)."""
    if not isinstance(value, str):
        return None
    parts = urlsplit(value.strip()[:2000])
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _short(value: object, limit: int) -> str | None:
    return value.strip()[:limit] or None if isinstance(value, str) else None


class _Handlers:
    """The sub-app's handlers. State: the rate limiters and the live conversations (both bounded)."""

    def __init__(
        self, config: _Config, ctx: ChannelContext, conversations: Conversations, held: HeldReplies
    ) -> None:
        self._c = config
        self._ctx = ctx
        self._ingest: Ingest = ctx.ingest
        self._metrics: ChannelMetrics = ctx.metrics
        self._conversations = conversations
        self._held = held
        channel = config.channel
        keys = channel.rate_limit_max_clients
        self._visitor_rate = RateLimiter(
            per_minute=channel.messages_per_minute, burst=channel.message_burst, max_keys=keys
        )
        self._ip_rate = RateLimiter(
            per_minute=channel.ip_messages_per_minute, burst=channel.ip_message_burst, max_keys=keys
        )
        self._connect_rate = RateLimiter(
            per_minute=channel.connects_per_minute, burst=channel.connect_burst, max_keys=keys
        )
        self._reports: set[asyncio.Task[None]] = set()
        # Every frame of a visitor's sockets (messages have their own, lower limit too).
        self._frame_rate = RateLimiter(
            per_minute=channel.frames_per_minute, burst=channel.frame_burst, max_keys=keys
        )
        # Desks watching the visitors' typing and read receipts, per inbox (bounded queues).
        self._watchers: dict[str, set[asyncio.Queue[str]]] = {}
        self._desks: set[web.WebSocketResponse] = set()
        self._agent_failures = RateLimiter(per_minute=10.0, burst=20, max_keys=keys)

    # -- helpers ---------------------------------------------------------------------------------

    def _inbox(self, request: web.Request) -> _Inbox:
        inbox = self._c.inboxes.get(request.match_info["inbox"])
        if inbox is None:
            raise web.HTTPNotFound(text="there is no such chat")
        return inbox

    def _origin_allowed(self, request: web.Request, inbox: _Inbox) -> bool:
        origin = _origin_of(request)
        if origin is None:
            return inbox.allow_missing_origin
        host = urlsplit(origin).netloc
        # Compare hosts for our own pages: behind a TLS proxy we see http, the browser https.
        return origin in inbox.allowed_origins or host in (request.host.lower(), self._c.public_host)

    @staticmethod
    def _cors(inbox: _Inbox, request: web.Request) -> dict[str, str]:
        origin = _origin_of(request) or ""
        if origin in inbox.allowed_origins:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {"Vary": "Origin"}

    def _open(self, inbox: _Inbox, token: object) -> tokens.Session | None:
        if not isinstance(token, str):
            return None
        return tokens.open_token(
            token,
            secrets_=self._c.session_secrets,
            inbox=inbox.id,
            now=self._ctx.clock.time(),
            ttl=self._c.channel.session_ttl,
        )

    def _mint(self, session: tokens.Session) -> str:
        return tokens.mint(self._c.session_secrets[0], session)

    def _limited(self, session: tokens.Session, remote: str | None) -> float:
        """Seconds to wait before this visitor may send again (0: go)."""
        visitor = self._visitor_rate.acquire(f"{session.inbox}/{session.session}")
        address = self._ip_rate.acquire(remote or "unknown")
        return max(visitor, address)

    def _envelope(
        self,
        request: web.Request,
        inbox: _Inbox,
        session: tokens.Session,
        body: bytes,
        content_type: str,
        remote: str | None,
        extra_meta: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> RawEnvelope:
        meta: dict[str, Any] = {
            "session": session.session,
            "conversation": session.conversation,
            "max_text_chars": self._c.channel.max_text_chars,
            "origin": _origin_of(request),
            **{k: v for k, v in extra_meta.items() if v is not None},
        }
        if session.user_id is not None:
            meta["user_id"] = session.user_id
            if session.email is not None:
                meta["email"] = session.email
        if headers is None:
            headers = envelope_headers(request)
        # A socket frame arrives on the upgrade request: its content type is the frame's, not the
        # request's, and the upgrade's headers are the same for every frame (read them once).
        return RawEnvelope(
            channel=CHANNEL,
            tenant=inbox.tenant,
            inbox=inbox.id,
            body=body,
            received_at=datetime.now(UTC),
            content_type=content_type,
            headers=headers,
            signature_verified=True,  # the session token is ours; the identity was checked
            remote=remote,
            meta=meta,
        )

    async def _deliver(self, envelope: RawEnvelope) -> IngestResult:
        return await ingest_within(self._ingest, envelope, normalize_webchat, self._c.channel.ingest_timeout)

    @staticmethod
    def _outcome_frame(client_id: str, result: IngestResult) -> dict[str, Any]:
        """``ack`` only for what is stored; otherwise ``error`` with whether to send it again."""
        if result.stored:
            first = result.placements[0] if result.placements else None
            return {
                "type": "ack",
                "client_id": client_id,
                "status": result.outcome.value,
                "message_id": first.message_id if first else None,
                "thread_id": first.thread_id if first else None,
            }
        if result.outcome is Outcome.RETRY:
            return {
                "type": "error",
                "client_id": client_id,
                "code": "retry",
                "reason": result.reason or "not stored now",
                "retry_after": result.retry_after or 5.0,
            }
        code = "too_large" if result.status == 413 else "rejected"
        return {
            "type": "error",
            "client_id": client_id,
            "code": code,
            "reason": result.reason or "the message was rejected",
        }

    def _report(self, reply_ids: Sequence[str], status: DeliveryStatus) -> None:
        for reply_id in reply_ids:
            task = asyncio.get_running_loop().create_task(
                report(lambda rid, st: self._ctx.report_delivery(rid, st), reply_id, status)
            )
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)

    # -- pages -----------------------------------------------------------------------------------

    async def widget(self, request: web.Request) -> web.Response:
        self._inbox(request)
        return web.Response(
            body=WIDGET_JS,
            content_type="application/javascript",
            charset="utf-8",
            headers={
                "Cache-Control": "public, max-age=300",
                "X-Content-Type-Options": "nosniff",
                "Access-Control-Allow-Origin": "*",
            },
        )

    async def demo(self, request: web.Request) -> web.Response:
        inbox = self._inbox(request)
        if not inbox.demo_page:
            raise web.HTTPNotFound(text="this chat has no demo page (demo_page = true shows one)")
        lang = pick_language(request.headers.get("Accept-Language"), request.query.get("lang"))
        strings = STRINGS[lang]
        widget_url = f"{PREFIX}/{quote(inbox.id, safe='')}/widget.js"
        base = self._c.public_url or f"{request.scheme}://{request.host}"
        snippet = f'<script src="{base}{widget_url}" async></script>'
        html = _DEMO.substitute(
            html_lang=strings["html_lang"],
            heading=escape(strings["demo_heading"]),
            body=escape(strings["demo_body"].format(inbox=inbox.id)),
            embed_label=escape(strings["demo_embed"]),
            snippet=escape(snippet),
            widget_url=escape(widget_url),
            inbox=escape(inbox.id),
        )
        html = html.replace(
            f'data-inbox="{escape(inbox.id)}"',
            f'data-inbox="{escape(inbox.id)}"{self._demo_identity(request, inbox)}',
        )
        return web.Response(
            text=html,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": (
                    f"default-src 'none'; script-src 'self'; style-src 'sha256-{_DEMO_STYLE}'; "
                    "connect-src 'self'; img-src 'self' blob: data:; base-uri 'none'; frame-ancestors 'self'"
                ),
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-store",
            },
        )

    @staticmethod
    def _demo_identity(request: web.Request, inbox: _Inbox) -> str:
        """``?user_id=&email=&name=``: the demo page plays the site's backend and signs the user."""
        user_id = request.query.get("user_id")
        if not user_id or not inbox.identity_secrets:
            return ""
        email = request.query.get("email") or None
        signature = tokens.sign_identity(inbox.identity_secrets[0], user_id, email)
        attributes = {"data-user-id": user_id, "data-user-hash": signature}
        if email:
            attributes["data-user-email"] = email
        if request.query.get("name"):
            attributes["data-user-name"] = request.query["name"]
        return "".join(f' {k}="{escape(v)}"' for k, v in attributes.items())

    # -- HTTP messages and uploads ---------------------------------------------------------------

    async def preflight(self, request: web.Request) -> web.Response:
        inbox = self._inbox(request)
        origin = _origin_of(request) or ""
        if origin not in inbox.allowed_origins:
            return json_error(403, "origin_not_allowed", "this origin may not use this chat")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            },
        )

    async def post_message(self, request: web.Request) -> web.Response:
        """A message (JSON, as on the socket) or an upload (multipart), with the session token as a
        bearer credential; answered as the socket answers (``ack`` 200/202, ``error``)."""
        inbox = self._inbox(request)
        remote = self._c.client_ip(request)
        cors = self._cors(inbox, request)
        if not self._origin_allowed(request, inbox):
            self._metrics.refused("auth", inbox=inbox.id)
            logger.warning(
                "webchat %s: refused a message from origin %s", inbox.id, _origin_of(request) or "-"
            )
            return json_error(
                403, "origin_not_allowed", "this chat does not accept messages from this origin"
            )
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        session = self._open(inbox, token.strip()) if scheme.lower() == "bearer" else None
        if session is None:
            self._metrics.refused("signature", inbox=inbox.id)
            logger.warning("webchat %s: message without a valid session token from %s", inbox.id, remote)
            return json_error(
                401,
                "unauthorized",
                "a valid chat session token is required",
                headers={**cors, "WWW-Authenticate": "Bearer"},
            )
        wait = self._limited(session, remote)
        if wait > 0:
            self._metrics.refused("rate_limit", inbox=inbox.id)
            return json_error(
                429,
                "rate_limited",
                "too many messages; retry later",
                headers={**cors, "Retry-After": retry_after_value(wait)},
            )
        content_type = request.headers.get("Content-Type", "")
        multipart = content_type.lower().startswith("multipart/form-data")
        limit = self._c.channel.max_upload_bytes + 64 * 1024 if multipart else self._c.channel.max_frame_bytes
        try:
            body = await read_body(request, limit)
            client_id = self._check(inbox, body, content_type, multipart)
        except InvalidInput as exc:
            self._metrics.refused("size" if exc.status == 413 else "malformed", inbox=inbox.id)
            logger.info("webchat %s: refused a message from %s: %s", inbox.id, remote, exc.reason)
            code = {413: "too_large", 415: "unsupported_media_type"}.get(exc.status, "malformed")
            return json_error(exc.status, code, exc.reason, headers=cors)
        envelope = self._envelope(
            request,
            inbox,
            session,
            body,
            content_type,
            remote,
            {
                "page": _page(request.headers.get("Referer")),
            },
        )
        result = await self._deliver(envelope)
        frame = self._outcome_frame(client_id, result)
        if result.stored:
            # Other tabs and devices of the conversation show the message as sent too.
            await self._conversations.push(inbox.id, session.conversation, {**frame, "type": "echo"})
            return json_response(
                frame, status=202 if result.outcome is Outcome.ACCEPTED else 200, headers=cors
            )
        if result.outcome is Outcome.RETRY:
            logger.warning("webchat %s: could not store a message now: %s", inbox.id, result.reason)
            return json_response(
                frame,
                status=503,
                headers={**cors, "Retry-After": retry_after_value(result.retry_after or 5.0)},
            )
        status = result.status if result.status and 400 <= result.status < 500 else 400
        return json_response(frame, status=status, headers=cors)

    def _check(self, inbox: _Inbox, body: bytes, content_type: str, multipart: bool) -> str:
        """The client id of a readable message; ``InvalidInput`` for what the widget must not send."""
        if multipart:
            submission = parse_form(body, content_type)
            client_id = client_id_of(submission.get("client_id"))
            if not submission.attachments and not submission.get("text"):
                raise InvalidInput("the upload has no file")
            for attachment in submission.attachments:
                if attachment.size > self._c.channel.max_upload_bytes:
                    raise InvalidInput(f"{attachment.name} is over the upload limit", status=413)
                if not inbox.upload_allowed(attachment.content_type):
                    raise InvalidInput(
                        f"files of type {attachment.content_type} are not accepted", status=415
                    )
            return client_id
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise InvalidInput("send JSON or multipart/form-data", status=415)
        frame = parse_frame(body)
        client_id = client_id_of(frame.get("client_id"))
        text = frame.get("text")
        if isinstance(text, str) and len(text) > self._c.channel.max_text_chars:
            raise InvalidInput(f"the message is over {self._c.channel.max_text_chars} characters", status=413)
        return client_id

    async def reply_file(self, request: web.Request) -> web.StreamResponse:
        """A file an agent attached to a reply, for the visitor it was sent to (session token as a
        bearer credential; only files of the conversation's held replies)."""
        inbox = self._inbox(request)
        cors = self._cors(inbox, request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        session = self._open(inbox, token.strip()) if scheme.lower() == "bearer" else None
        if session is None:
            self._metrics.refused("signature", inbox=inbox.id)
            return json_error(
                401,
                "unauthorized",
                "a valid chat session token is required",
                headers={**cors, "WWW-Authenticate": "Bearer"},
            )
        sha256 = request.match_info["sha256"]
        held = await self._held_for(inbox, session)
        found = next((f for item in held for f in item.get("files", ()) if f.get("sha256") == sha256), None)
        data = await self._ctx.blobs.read(sha256) if found is not None else None
        if found is None or data is None:
            return json_error(404, "not_found", "no such file in this conversation", headers=cors)
        name = str(found.get("name") or "file")
        return web.Response(
            body=data,
            content_type=str(found.get("type") or "application/octet-stream"),
            headers={
                **cors,
                "Cache-Control": "private, max-age=3600",
                "X-Content-Type-Options": "nosniff",
                "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name, safe='')}",
            },
        )

    # -- the socket ------------------------------------------------------------------------------

    async def socket(self, request: web.Request) -> web.StreamResponse:
        inbox = self._inbox(request)
        remote = self._c.client_ip(request) or "unknown"
        if not self._origin_allowed(request, inbox):
            self._metrics.refused("auth", inbox=inbox.id)
            logger.warning(
                "webchat %s: refused a socket from origin %s", inbox.id, _origin_of(request) or "-"
            )
            return json_error(403, "origin_not_allowed", "this chat cannot be opened from this origin")
        wait = self._connect_rate.acquire(remote)
        if wait > 0:
            self._metrics.refused("rate_limit", inbox=inbox.id)
            return json_error(
                429,
                "rate_limited",
                "too many connections; retry later",
                headers={"Retry-After": retry_after_value(wait)},
            )
        channel = self._c.channel
        if not self._conversations.admit(
            remote, total=self._c.max_sockets, per_ip=channel.max_sockets_per_ip
        ):
            self._metrics.event("socket_refused_full", inbox=inbox.id)
            return json_error(
                503,
                "overloaded",
                "the chat is full right now; retry in a moment",
                headers={"Retry-After": "5"},
            )
        try:
            ws = web.WebSocketResponse(
                heartbeat=channel.heartbeat,
                max_msg_size=channel.max_frame_bytes,
                compress=False,
            )
            await ws.prepare(request)
            # Open sockets = socket_opened - socket_closed (ticketgate_channel_events_total).
            self._metrics.event("socket_opened", inbox=inbox.id)
            try:
                await self._converse(request, ws, inbox, remote)
            finally:
                self._metrics.event("socket_closed", inbox=inbox.id)
            return ws
        finally:
            self._conversations.release(remote)

    async def _converse(
        self, request: web.Request, ws: web.WebSocketResponse, inbox: _Inbox, remote: str
    ) -> None:
        channel = self._c.channel
        try:
            first = await ws.receive(timeout=channel.hello_timeout)
        except TimeoutError:
            await ws.close(code=CLOSE_PROTOCOL, message=b"no hello")
            return
        hello = _json_frame(first)
        if hello is None or hello.get("type") != "hello":
            await ws.close(code=CLOSE_PROTOCOL, message=b"the first frame must be hello")
            return
        session = await self._welcome(ws, inbox, hello)
        if session is None:
            return
        peer = Peer(ws, inbox.id, session.conversation)
        self._conversations.add(peer)
        meta = {
            "page": _page(hello.get("page")),
            "name": _short(hello.get("name"), 200),
            "lang": _short(hello.get("lang"), 20),
        }
        headers = envelope_headers(request)  # the upgrade's: the same for every frame
        try:
            while True:
                try:
                    message = await ws.receive(timeout=channel.idle_timeout)
                except TimeoutError:
                    self._metrics.event("socket_idle_closed", inbox=inbox.id)
                    await ws.close(code=CLOSE_IDLE, message=b"idle")
                    return
                if message.type is WSMsgType.ERROR:
                    if getattr(message.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
                        self._metrics.refused("size", inbox=inbox.id)
                    return
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    return
                if self._frame_rate.acquire(f"{inbox.id}/{session.session}") > 0:
                    # Receipts and typing cost store reads and desk pushes: a flood ends the socket.
                    self._metrics.refused("rate_limit", inbox=inbox.id)
                    await ws.close(code=CLOSE_RATE, message=b"too many frames")
                    return
                frame = _json_frame(message)
                if frame is None:
                    await peer.send(
                        {"type": "error", "code": "malformed", "reason": "frames are JSON objects"}
                    )
                    continue
                await self._on_frame(request, peer, inbox, session, frame, message, remote, meta, headers)
        finally:
            self._conversations.discard(peer)

    async def _welcome(
        self, ws: web.WebSocketResponse, inbox: _Inbox, hello: Mapping[str, Any]
    ) -> tokens.Session | None:
        """The session of this socket (resumed, signed in, or new), announced with what is held."""
        now = self._ctx.clock.time()
        session = self._open(inbox, hello.get("token"))
        identity = hello.get("identity")
        user_id = email = None
        identity_refused = False
        if isinstance(identity, dict):
            user_id = _short(identity.get("user_id"), tokens.MAX_USER_ID)
            email = _short(identity.get("email"), tokens.MAX_EMAIL)
            signature = identity.get("signature")
            if user_id is not None and not (
                isinstance(signature, str)
                and tokens.check_identity(inbox.identity_secrets, user_id, email, signature)
            ):
                identity_refused = True
                self._metrics.refused("signature", inbox=inbox.id)
                logger.warning("webchat %s: a visitor's identity signature did not verify", inbox.id)
                user_id = email = None
        if session is not None and session.user_id is not None and session.user_id != user_id:
            session = None  # another person (or signed out) on this browser: never show their chat
        if session is None:
            session = tokens.Session(inbox=inbox.id, session=tokens.new_session_id(), issued=now)
            self._metrics.event("session_started", inbox=inbox.id)
        if user_id is not None and (session.user_id != user_id or session.email != email):
            session = tokens.Session(
                inbox=inbox.id, session=session.session, issued=now, user_id=user_id, email=email
            )
        held = await self._held_for(inbox, session)
        lang = pick_language(_short(hello.get("lang"), 40))
        welcome = {
            "type": "welcome",
            "token": self._mint(session),
            "session": session.session,
            "verified": session.user_id is not None,
            "identity_refused": identity_refused,
            "title": inbox.titles[lang],
            "greeting": inbox.greetings[lang],
            "limits": {
                "text_chars": self._c.channel.max_text_chars,
                "upload_bytes": self._c.channel.max_upload_bytes,
                "upload_types": list(inbox.upload_types),
            },
            "replies": [reply_frame(item) for item in held],
        }
        await ws.send_str(orjson.dumps(welcome).decode())
        return session

    async def _held_for(self, inbox: _Inbox, session: tokens.Session) -> list[dict[str, Any]]:
        try:
            return await self._held.items(inbox.id, session.conversation)
        except Exception:  # the chat still works; held replies come on the next connection
            logger.exception("webchat %s: could not read held replies", inbox.id)
            return []

    async def _on_frame(
        self,
        request: web.Request,
        peer: Peer,
        inbox: _Inbox,
        session: tokens.Session,
        frame: Mapping[str, Any],
        message: Any,
        remote: str,
        meta: Mapping[str, Any],
        headers: Mapping[str, str],
    ) -> None:
        kind = frame.get("type")
        if kind == "message":
            await self._on_message(request, peer, inbox, session, frame, message, remote, meta, headers)
        elif kind == "ping":
            await peer.send({"type": "pong"})
        elif kind in ("received", "read"):
            ids = (
                [i for i in frame.get("ids", ()) if isinstance(i, str)][:200]
                if isinstance(frame.get("ids"), list)
                else []
            )
            status: DeliveryStatus = "delivered" if kind == "received" else "read"
            if not ids:
                return
            try:
                moved = await self._held.mark(inbox.id, session.conversation, ids, status)
            except Exception:
                logger.exception("webchat %s: could not record a %s receipt", inbox.id, kind)
                return
            self._report(moved, status)
            if kind == "read" and moved:
                self._tell_desk(
                    inbox.id, {"type": "read", "conversation": session.conversation, "reply_ids": moved}
                )
            if kind == "read":
                # The visitor's other tabs stop showing these as unread.
                await self._conversations.push(
                    inbox.id, session.conversation, {"type": "read", "ids": moved}, skip=peer
                )
        elif kind == "typing":
            # Not a ticket: counted, and streamed to the desks watching this inbox.
            self._metrics.event("visitor_typing", inbox=inbox.id)
            self._tell_desk(inbox.id, {"type": "typing", "conversation": session.conversation})
        else:
            await peer.send(
                {"type": "error", "code": "unknown_frame", "reason": f"unknown frame type {kind!r}"}
            )

    async def _on_message(
        self,
        request: web.Request,
        peer: Peer,
        inbox: _Inbox,
        session: tokens.Session,
        frame: Mapping[str, Any],
        message: Any,
        remote: str,
        meta: Mapping[str, Any],
        headers: Mapping[str, str],
    ) -> None:
        try:
            client_id = client_id_of(frame.get("client_id"))
        except InvalidInput as exc:
            self._metrics.refused("malformed", inbox=inbox.id)
            await peer.send({"type": "error", "code": "malformed", "reason": exc.reason})
            return
        text = frame.get("text")
        if isinstance(text, str) and len(text) > self._c.channel.max_text_chars:
            self._metrics.refused("size", inbox=inbox.id)
            await peer.send(
                {
                    "type": "error",
                    "client_id": client_id,
                    "code": "too_large",
                    "reason": f"at most {self._c.channel.max_text_chars} characters",
                }
            )
            return
        wait = self._limited(session, remote)
        if wait > 0:
            self._metrics.refused("rate_limit", inbox=inbox.id)
            await peer.send(
                {
                    "type": "error",
                    "client_id": client_id,
                    "code": "rate_limited",
                    "reason": "too many messages",
                    "retry_after": wait,
                }
            )
            return
        body = (
            message.data.encode("utf-8", "surrogatepass") if isinstance(message.data, str) else message.data
        )
        envelope = self._envelope(request, inbox, session, body, "application/json", remote, meta, headers)
        result = await self._deliver(envelope)
        answer = self._outcome_frame(client_id, result)
        if result.outcome is Outcome.RETRY:
            logger.warning("webchat %s: could not store a message now: %s", inbox.id, result.reason)
        await peer.send(answer)
        if result.stored:
            await self._conversations.push(
                inbox.id,
                session.conversation,
                {**answer, "type": "echo", "text": frame.get("text")},
                skip=peer,
            )

    # -- the desk's side: agent typing and read receipts, and the visitors' activity ---------------

    def _agent(self, request: web.Request, inbox: _Inbox) -> web.Response | None:
        """``None`` when the request carries an agent key of this inbox; else the refusal."""
        if not inbox.has_agent_keys:
            raise web.HTTPNotFound(text="this chat has no agent keys (agent_keys)")
        if self._c.agent_keys.lookup(request) == inbox.id:
            return None
        remote = self._c.client_ip(request)
        logger.warning("webchat %s: agent request without a valid key from %s", inbox.id, remote)
        refusal = refuse_credentials(
            self._agent_failures,
            remote,
            present="Authorization" in request.headers,
            challenge='Bearer realm="webchat"',
            required="an agent key of this chat",
        )
        self._metrics.refused("rate_limit" if refusal.status == 429 else "auth", inbox=inbox.id)
        return refusal

    async def _agent_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await read_body(request, 16 * 1024))
        except (InvalidInput, orjson.JSONDecodeError):
            raise web.HTTPBadRequest(text="send a JSON object of at most 16 KiB") from None
        if not isinstance(body, dict) or not isinstance(body.get("conversation"), str):
            raise web.HTTPBadRequest(text='the body needs "conversation" (message.extra.conversation)')
        return body

    async def agent_typing(self, request: web.Request) -> web.Response:
        """An agent is typing: the visitor's widgets show it for a few seconds."""
        inbox = self._inbox(request)
        if (refusal := self._agent(request, inbox)) is not None:
            return refusal
        body = await self._agent_body(request)
        frame = {"type": "typing", "agent": _short(body.get("agent"), 100)}
        pushed = await self._conversations.push(inbox.id, body["conversation"], frame)
        return json_response({"sockets": pushed})

    async def agent_read(self, request: web.Request) -> web.Response:
        """An agent read the visitor's messages (by message id): the widget marks them read."""
        inbox = self._inbox(request)
        if (refusal := self._agent(request, inbox)) is not None:
            return refusal
        body = await self._agent_body(request)
        ids = body.get("message_ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(ids) > 500:
            raise web.HTTPBadRequest(text='"message_ids" must be a list of at most 500 message ids')
        pushed = await self._conversations.push(
            inbox.id, body["conversation"], {"type": "seen", "message_ids": ids}
        )
        return json_response({"sockets": pushed})

    def _tell_desk(self, inbox: str, event: Mapping[str, Any]) -> None:
        text = orjson.dumps(event).decode()
        for queue in self._watchers.get(inbox, ()):
            try:
                queue.put_nowait(text)
            except asyncio.QueueFull:
                self._metrics.event("activity_dropped", inbox=inbox)

    async def agent_activity(self, request: web.Request) -> web.StreamResponse:
        """A WebSocket for the desk: the visitors' typing and read receipts of this inbox, as they
        happen (``{"type": "typing"|"read", "conversation", ...}``). Not stored: a desk that is
        not connected misses them (the read state also reaches the bus as ``reply.read``)."""
        inbox = self._inbox(request)
        if (refusal := self._agent(request, inbox)) is not None:
            return refusal
        ws = web.WebSocketResponse(heartbeat=self._c.channel.heartbeat, max_msg_size=4096)
        await ws.prepare(request)
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1000)
        watchers = self._watchers.setdefault(inbox.id, set())
        watchers.add(queue)
        self._desks.add(ws)
        loop = asyncio.get_running_loop()
        reader = loop.create_task(ws.receive())
        getter = loop.create_task(queue.get())
        try:
            while not ws.closed:
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    await ws.send_str(getter.result())
                    getter = loop.create_task(queue.get())
                if reader in done:
                    if reader.result().type in _CLOSED:
                        break
                    reader = loop.create_task(ws.receive())  # the desk has nothing to say; ignored
        finally:
            reader.cancel()
            getter.cancel()
            watchers.discard(queue)
            self._desks.discard(ws)
            with contextlib.suppress(Exception):
                await ws.close()
        return ws

    async def shutdown(self, _app: web.Application) -> None:
        """Going away: every widget reconnects (to another instance, or to this one restarted)."""
        sockets = [p.ws for p in self._conversations.all()] + list(self._desks)
        await asyncio.gather(
            *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"restarting") for ws in sockets),
            return_exceptions=True,
        )
        for task in list(self._reports):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._reports, return_exceptions=True)


_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


def _json_frame(message: Any) -> Mapping[str, Any] | None:
    if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
        return None
    try:
        frame = orjson.loads(message.data)
    except orjson.JSONDecodeError:
        return None
    return frame if isinstance(frame, dict) else None
