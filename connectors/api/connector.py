"""The authenticated API channel: ``POST /api/v1/messages`` for apps and call-center systems.

``Authorization: Bearer <key>``; the key decides the inbox (several keys per inbox, so a key can be
rotated without downtime). ``Idempotency-Key`` makes a retried request return the first answer.
The body is validated with :class:`normalizers.api.ApiMessage` before anything is stored. The
OpenAPI description is served at ``GET /api/v1/openapi.yaml``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib.resources import files
from typing import Self
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import Field, field_validator, model_validator

from connectors.api.callback import Callback, CallbackSender
from connectors.base import ChannelContext, ChannelMetrics, Ingest
from core.channel import ChannelEndpoint, SenderSpec
from core.errors import InvalidInput
from core.http import (
    MIN_KEY_LENGTH,
    BearerKeys,
    ClientAddress,
    RateLimiter,
    ingest_within,
    json_error,
    read_body,
    refuse_credentials,
    request_envelope,
    result_response,
    retry_after_value,
)
from core.model import Outcome
from core.settings import ChannelSettings, Duration, Secret, Settings
from normalizers.api import ApiMessage, normalizer_for, parse_api_message

logger = logging.getLogger(__name__)

CHANNEL = "api"
PREFIX = "/api/v1"
MiB = 1024 * 1024
OPENAPI = files("connectors.api").joinpath("openapi.yaml").read_bytes()
_IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
_CHALLENGE = 'Bearer realm="ticketgate"'


# A callback secret signs what the app trusts as the desk's words: as long as a random key.
MIN_CALLBACK_SECRET_LENGTH = 16
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class ApiInboxSettings(ChannelSettings):
    """``[channels.api.inboxes.<inbox id>]``."""

    keys: tuple[Secret, ...] = Field(min_length=1)
    trust_identities: bool = False
    # The way back: replies to this inbox's customers are POSTed here, signed with every secret of
    # callback_secrets (the current one first; two while the app moves to a new one).
    callback_url: str | None = None
    callback_secrets: tuple[Secret, ...] = ()

    @field_validator("keys")
    @classmethod
    def _long_enough(cls, value: tuple[Secret, ...]) -> tuple[Secret, ...]:
        if any(len(key.get_secret_value()) < MIN_KEY_LENGTH for key in value):
            raise ValueError(f"every API key needs at least {MIN_KEY_LENGTH} characters")
        return value

    @field_validator("callback_url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme == "https" and parts.hostname:
            return value
        if parts.scheme == "http" and parts.hostname in _LOOPBACK:
            return value  # a receiver on this machine (development, tests)
        raise ValueError("must be an https:// URL (plain http only to this machine)")

    @model_validator(mode="after")
    def _signed(self) -> ApiInboxSettings:
        if self.callback_url is not None and not self.callback_secrets:
            raise ValueError("callback_url needs callback_secrets (replies are always signed)")
        short = [s for s in self.callback_secrets if len(s.get_secret_value()) < MIN_CALLBACK_SECRET_LENGTH]
        if short:
            raise ValueError(f"every callback secret needs at least {MIN_CALLBACK_SECRET_LENGTH} characters")
        return self


class ApiChannelSettings(ChannelSettings):
    """``[channels.api]``."""

    max_body_bytes: int = Field(20 * MiB, gt=0)
    max_attachments: int = Field(10, ge=0, le=20)
    max_attachment_bytes: int = Field(10 * MiB, gt=0)
    max_total_attachment_bytes: int = Field(15 * MiB, gt=0)
    # Per inbox. Call-center and app back ends send in bursts; 100/s sustained keeps a runaway client
    # from filling the outbox without throttling a busy integration.
    rate_limit_per_minute: float = Field(6000.0, gt=0)
    rate_limit_burst: int = Field(500, ge=1)
    auth_failures_per_minute: float = Field(10.0, gt=0)
    auth_failures_burst: int = Field(20, ge=1)
    rate_limit_max_clients: int = Field(100_000, ge=1)
    # Below the channel's deadline (30 s): a store that does not answer by then gets a 503, not a hang.
    ingest_timeout: Duration = 25.0
    # The way back: how long an app's callback gets to answer, and replies per second per inbox.
    callback_timeout: Duration = Field(10.0, gt=0)
    callback_rate: float = Field(20.0, gt=0)
    callback_burst: int = Field(50, ge=1)
    inboxes: dict[str, ApiInboxSettings] = Field(min_length=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Inbox:
    id: str
    tenant: str
    trust_identities: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class _Config:
    channel: ApiChannelSettings
    keys: BearerKeys[_Inbox]
    body_limit: int
    client_ip: ClientAddress


class ApiConnector:
    """Mounts ``/api/v1``; configuration only, no per-request state."""

    name = CHANNEL

    def __init__(self, config: _Config) -> None:
        self._config = config

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        channel = settings.channel(CHANNEL, ApiChannelSettings)
        if channel is None:
            return None
        keys: BearerKeys[_Inbox] = BearerKeys(what="an API key", source=settings.source)
        for inbox_id, config in channel.inboxes.items():
            where = f"channels.api.inboxes.{inbox_id}"
            inbox = _Inbox(
                id=inbox_id,
                tenant=settings.inbox(inbox_id, key=where).tenant,
                trust_identities=config.trust_identities,
            )
            for key in config.keys:
                keys.add(key, inbox, where=f"{where}.keys")
        return cls(
            _Config(
                channel=channel,
                keys=keys,
                body_limit=min(channel.max_body_bytes, settings.server.max_body_bytes),
                client_ip=ClientAddress(settings.server.trusted_proxies),
            )
        )

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        """``POST /api/v1/messages`` for every inbox (the key decides which)."""
        url = f"{base_url}{PREFIX}/messages"
        inboxes = self._config.channel.inboxes
        return [ChannelEndpoint(inbox=inbox, kind="api", address=url) for inbox in inboxes]

    def setup(self, ctx: ChannelContext) -> None:
        handlers = _Handlers(self._config, ctx.ingest, ctx.metrics)
        sub = web.Application()
        sub.router.add_post("/messages", handlers.messages)
        sub.router.add_get("/openapi.yaml", handlers.openapi)
        ctx.add_app(PREFIX, sub)
        callbacks = self.callbacks()
        if callbacks:
            channel = self._config.channel
            http = ctx.http(next(iter(callbacks.values())).url, timeout=channel.callback_timeout + 5.0)
            sender = CallbackSender(
                callbacks, http, blobs=ctx.blobs, clock=ctx.clock, timeout=channel.callback_timeout
            )
            # The app is asked to drop a repeated reply_id, but nothing makes it: not idempotent.
            spec = SenderSpec(sender=sender, rate=channel.callback_rate, burst=channel.callback_burst)
            ctx.add_sender(spec)

    def callbacks(self) -> dict[str, Callback]:
        """The inboxes that take replies at a callback URL."""
        return {
            inbox: Callback(
                url=config.callback_url,
                secrets=tuple(s.get_secret_value() for s in config.callback_secrets),
            )
            for inbox, config in self._config.channel.inboxes.items()
            if config.callback_url is not None
        }


class _Handlers:
    def __init__(self, config: _Config, ingest: Ingest, metrics: ChannelMetrics) -> None:
        self._c = config
        self._ingest = ingest
        self._metrics = metrics
        channel = config.channel
        self._per_inbox = RateLimiter(
            per_minute=channel.rate_limit_per_minute,
            burst=channel.rate_limit_burst,
            max_keys=max(1, len(channel.inboxes)),
        )
        self._failures = RateLimiter(
            per_minute=channel.auth_failures_per_minute,
            burst=channel.auth_failures_burst,
            max_keys=channel.rate_limit_max_clients,
        )

    def _authenticate(self, request: web.Request) -> _Inbox | None:
        return self._c.keys.lookup(request)

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI, content_type="application/yaml", charset="utf-8")

    async def messages(self, request: web.Request) -> web.Response:
        remote = self._c.client_ip(request)
        inbox = self._authenticate(request)
        if inbox is None:
            present = "Authorization" in request.headers
            logger.warning("api: %s API key from %s", "wrong" if present else "missing", remote)
            refusal = refuse_credentials(
                self._failures, remote, present=present, challenge=_CHALLENGE, required="a valid API key"
            )
            self._metrics.refused("rate_limit" if refusal.status == 429 else "auth")
            return refusal
        wait = self._per_inbox.acquire(inbox.id)
        if wait > 0:
            logger.warning("api %s: rate limit exceeded", inbox.id)
            self._metrics.refused("rate_limit", inbox=inbox.id)
            return json_error(
                429,
                "rate_limited",
                "too many requests for this inbox; retry later",
                headers={"Retry-After": retry_after_value(wait)},
            )
        idempotency_key = request.headers.get("Idempotency-Key")
        if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
            logger.info("api %s: invalid Idempotency-Key from %s", inbox.id, remote)
            self._metrics.refused("malformed", inbox=inbox.id)
            return json_error(
                400, "invalid_idempotency_key", "Idempotency-Key must be 1 to 255 printable ASCII characters"
            )
        if request.content_type != "application/json":
            logger.info("api %s: unsupported content type %s", inbox.id, request.content_type)
            self._metrics.refused("malformed", inbox=inbox.id)
            return json_error(415, "unsupported_media_type", "the body must be application/json")
        try:
            body = await read_body(request, self._c.body_limit)
            payload = parse_api_message(body)
            self._check_attachments(payload)
        except InvalidInput as exc:
            code = {400: "invalid_json", 413: "too_large", 422: "invalid_request"}.get(exc.status, "invalid")
            logger.info("api %s: refused a request from %s: %s", inbox.id, remote, exc.reason)
            self._metrics.refused("size" if exc.status == 413 else "malformed", inbox=inbox.id)
            return json_error(exc.status, code, exc.reason)
        envelope = request_envelope(
            request,
            channel=CHANNEL,
            tenant=inbox.tenant,
            inbox=inbox.id,
            body=body,
            signature_verified=True,  # the API key authenticated the caller
            remote=remote,
            meta={"trust_identities": inbox.trust_identities},
            key_reuse="refuse",  # the client reused its Idempotency-Key for another body: say so
        )
        # The body was validated above; normalizing from that payload avoids parsing it twice (long
        # HTML is parsed again, in the normalizer process). normalize_api stays the replay normalizer.
        result = await ingest_within(
            self._ingest, envelope, normalizer_for(payload), self._c.channel.ingest_timeout
        )
        if result.outcome is Outcome.RETRY:
            logger.warning("api %s: could not store a message now: %s", inbox.id, result.reason)
        elif not result.stored:
            logger.info("api %s: message rejected: %s", inbox.id, result.reason)
        return result_response(result)

    def _check_attachments(self, payload: ApiMessage) -> None:
        if not payload.attachments:
            return  # most requests: nothing to add up
        channel = self._c.channel
        if len(payload.attachments) > channel.max_attachments:
            raise InvalidInput(f"attachments: at most {channel.max_attachments} allowed", status=413)
        sizes = [a.size for a in payload.attachments]
        if any(size > channel.max_attachment_bytes for size in sizes):
            raise InvalidInput(
                f"attachments: each may be at most {channel.max_attachment_bytes} bytes", status=413
            )
        if sum(sizes) > channel.max_total_attachment_bytes:
            raise InvalidInput(
                f"attachments: at most {channel.max_total_attachment_bytes} bytes in total", status=413
            )
