"""The web-form channel: ``GET/POST /forms/{inbox}``, CORS for allowed sites, and an embed script.

A plain HTML form (no JavaScript needed) posts multipart to the gateway. Other sites can POST with
``fetch`` (urlencoded, multipart or JSON) when their origin is in the inbox's ``allowed_origins``,
or embed the form with ``<script src=".../forms/{inbox}/embed.js" async></script>``, which shows it
in an iframe (framing is allowed to the same origins only).

Every submission is bounded, rate-limited per client IP, checked against the origin allow-list and
validated before ``ingest``; a bot that fills the hidden honeypot is answered as if it succeeded but
nothing is stored.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Self
from urllib.parse import quote, urlsplit

from aiohttp import web
from pydantic import Field, field_validator, model_validator

from connectors.base import ChannelContext, ChannelMetrics, Ingest
from connectors.form import render
from connectors.form.i18n import STRINGS, pick_language
from core.channel import ChannelEndpoint
from core.errors import ConfigError, InvalidInput
from core.http import (
    ClientAddress,
    RateLimiter,
    accepts_json,
    ingest_within,
    json_error,
    json_response,
    read_body,
    request_envelope,
    result_payload,
    result_response,
    result_status,
    retry_after_value,
)
from core.model import IngestResult, Outcome
from core.settings import ChannelSettings, Duration, Settings
from normalizers.form import (
    FormSubmission,
    describe_errors,
    field_errors,
    normalize_form,
    parse_form,
)

logger = logging.getLogger(__name__)

CHANNEL = "form"
PREFIX = "/forms"
MiB = 1024 * 1024


class FormInboxSettings(ChannelSettings):
    """``[channels.form.inboxes.<inbox id>]``: one public form."""

    title: str | None = None
    title_zh: str | None = None
    allowed_origins: tuple[str, ...] = ()
    allow_missing_origin: bool = False
    phone_region: str = Field("CN", pattern=r"^[A-Z]{2}$")

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        normalized = []
        for origin in value:
            parts = urlsplit(origin.strip())
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
                raise ValueError(f"{origin!r} is not an origin such as 'https://www.example.com'")
            normalized.append(f"{parts.scheme}://{parts.netloc}".lower())
        return tuple(normalized)


class FormChannelSettings(ChannelSettings):
    """``[channels.form]``."""

    max_body_bytes: int = Field(25 * MiB, gt=0)
    max_attachments: int = Field(5, ge=0)
    max_attachment_bytes: int = Field(10 * MiB, gt=0)
    max_total_attachment_bytes: int = Field(20 * MiB, gt=0)
    rate_limit_per_minute: float = Field(10.0, gt=0)
    rate_limit_burst: int = Field(5, ge=1)
    rate_limit_max_clients: int = Field(100_000, ge=1)
    # Below the channel's deadline (10 s): a store that does not answer by then gets a 503, not a hang.
    ingest_timeout: Duration = 8.0
    inboxes: dict[str, FormInboxSettings] = Field(min_length=1)

    @model_validator(mode="after")
    def _total_covers_one(self) -> Self:
        if self.max_total_attachment_bytes < self.max_attachment_bytes:
            raise ValueError("max_total_attachment_bytes must be at least max_attachment_bytes")
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class _Inbox:
    id: str
    tenant: str
    titles: Mapping[str, str]
    allowed_origins: frozenset[str]
    allow_missing_origin: bool
    phone_region: str
    frame_ancestors: str


@dataclass(frozen=True, slots=True, kw_only=True)
class _Config:
    """Everything the handlers need, resolved once from the settings."""

    channel: FormChannelSettings
    inboxes: Mapping[str, _Inbox]
    body_limit: int
    client_ip: ClientAddress
    public_url: str | None  # without a trailing slash
    public_host: str | None
    limits: render.Limits


class FormConnector:
    """Serves the form and accepts submissions; configuration only, no per-request state."""

    name = CHANNEL

    def __init__(
        self, channel: FormChannelSettings, inboxes: Mapping[str, _Inbox], settings: Settings
    ) -> None:
        public_url = (settings.server.public_url or "").rstrip("/") or None
        self._config = _Config(
            channel=channel,
            inboxes=dict(inboxes),
            body_limit=min(channel.max_body_bytes, settings.server.max_body_bytes),
            client_ip=ClientAddress(settings.server.trusted_proxies),
            public_url=public_url,
            public_host=urlsplit(public_url).netloc.lower() if public_url else None,
            limits=render.Limits(
                count=channel.max_attachments, size=channel.max_attachment_bytes,
                total=channel.max_total_attachment_bytes,
            ),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        channel = settings.channel(CHANNEL, FormChannelSettings)
        if channel is None:
            return None
        inboxes = {}
        for inbox_id, config in channel.inboxes.items():
            inbox = settings.inbox(inbox_id, key=f"channels.form.inboxes.{inbox_id}")
            if not config.allowed_origins and not config.allow_missing_origin:
                # Same-origin posts still pass; say why cross-site posts will not.
                logger.info("form inbox %s accepts posts from its own pages only", inbox_id)
            english = config.title or inbox.name or STRINGS["en"]["default_title"]
            chinese = config.title_zh or config.title or inbox.name or STRINGS["zh"]["default_title"]
            inboxes[inbox_id] = _Inbox(
                id=inbox_id,
                tenant=inbox.tenant,
                titles={"en": english, "zh": chinese},
                allowed_origins=frozenset(config.allowed_origins),
                allow_missing_origin=config.allow_missing_origin,
                phone_region=config.phone_region,
                frame_ancestors=" ".join(("'self'", *config.allowed_origins)),
            )
        if any(not inbox_id or "/" in inbox_id for inbox_id in inboxes):
            raise ConfigError("form inbox ids must be non-empty and contain no '/'", file=settings.source,
                              key="channels.form.inboxes")
        return cls(channel, inboxes, settings)

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        """The form page and its embed script, per inbox."""
        found = []
        for inbox in self._config.inboxes:
            page = f"{base_url}{PREFIX}/{quote(inbox)}"
            found.append(ChannelEndpoint(inbox=inbox, kind="form", address=page))
            found.append(ChannelEndpoint(inbox=inbox, kind="embed", address=f"{page}/embed.js"))
        return found

    def setup(self, ctx: ChannelContext) -> None:
        handlers = _Handlers(self._config, ctx.ingest, ctx.metrics)
        sub = web.Application()
        sub.router.add_get("/{inbox}", handlers.show)
        sub.router.add_post("/{inbox}", handlers.submit)
        sub.router.add_route("OPTIONS", "/{inbox}", handlers.preflight)
        sub.router.add_get("/{inbox}/embed.js", handlers.embed)
        ctx.add_app(PREFIX, sub)


def _origin_of(request: web.Request) -> str | None:
    """The Origin header, else the Referer's origin; ``None`` when neither (or an opaque ``null``)."""
    origin = request.headers.get("Origin")
    if origin and origin != "null":
        return origin.strip().lower()
    referer = request.headers.get("Referer")
    if referer:
        parts = urlsplit(referer)
        if parts.scheme and parts.netloc:
            return f"{parts.scheme}://{parts.netloc}".lower()
    return None


class _Handlers:
    """The sub-app's handlers; the rate limiter is the only state, and it is bounded."""

    def __init__(self, config: _Config, ingest: Ingest, metrics: ChannelMetrics) -> None:
        self._c = config
        self._ingest = ingest
        self._metrics = metrics
        channel = config.channel
        self._limiter = RateLimiter(
            per_minute=channel.rate_limit_per_minute, burst=channel.rate_limit_burst,
            max_keys=channel.rate_limit_max_clients,
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _inbox(self, request: web.Request) -> _Inbox:
        inbox = self._c.inboxes.get(request.match_info["inbox"])
        if inbox is None:
            raise web.HTTPNotFound(text=STRINGS[_lang(request)]["not_found"])
        return inbox

    def _form_url(self, request: web.Request, inbox: _Inbox) -> str:
        path = f"{PREFIX}/{quote(inbox.id, safe='')}"
        if self._c.public_url:
            return f"{self._c.public_url}{path}"
        return str(request.url.with_path(path).with_query(None))

    def _same_origin(self, request: web.Request, origin: str) -> bool:
        # Compare hosts, not schemes: behind a TLS-terminating proxy we see http but the browser https.
        host = urlsplit(origin).netloc
        return host in (request.host.lower(), self._c.public_host)

    def _origin_allowed(self, request: web.Request, inbox: _Inbox, origin: str | None) -> bool:
        if origin is None:
            return inbox.allow_missing_origin
        return origin in inbox.allowed_origins or self._same_origin(request, origin)

    @staticmethod
    def _cors(inbox: _Inbox, request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin", "").strip().lower()
        if origin in inbox.allowed_origins:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {"Vary": "Origin"}

    @staticmethod
    def _html(
        text: str, *, status: int, inbox: _Inbox, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.Response(
            text=text, status=status, content_type="text/html", charset="utf-8",
            headers={**render.security_headers(inbox.frame_ancestors), **(headers or {})},
        )

    def _refuse(
        self, request: web.Request, inbox: _Inbox, *, status: int, code: str, reason: str, message_key: str,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        """A rejection: JSON for scripts, a short page for people; always a reason."""
        extra = {**self._cors(inbox, request), **(headers or {})}
        if accepts_json(request):
            return json_error(status, code, reason, headers=extra)
        lang = _lang(request)
        page = render.render_page(
            lang=lang, heading_key=message_key, body_key=None, form_url=self._form_url(request, inbox),
            page_id="tg-error",
        )
        return self._html(page, status=status, inbox=inbox, headers=extra)

    def _form(
        self, request: web.Request, inbox: _Inbox, *, status: int, submission: FormSubmission | None = None,
        errors: Mapping[str, str] | None = None, banner_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        lang = _lang(request)
        page = render.render_form(
            lang=lang, title=inbox.titles[lang], limits=self._c.limits,
            form_url=self._form_url(request, inbox),
            values=submission.fields if submission else None, errors=errors,
            banner=STRINGS[lang][banner_key] if banner_key else None,
        )
        headers = {**self._cors(inbox, request), **(headers or {})}
        return self._html(page, status=status, inbox=inbox, headers=headers)

    def _attachment_errors(self, submission: FormSubmission) -> dict[str, str]:
        files = submission.attachments
        limits = self._c.limits
        if len(files) > limits.count:
            return {"attachments": "too_many"}
        if any(f.size > limits.size for f in files) or sum(f.size for f in files) > limits.total:
            return {"attachments": "too_large"}
        return {}

    # -- handlers --------------------------------------------------------------------------------

    async def show(self, request: web.Request) -> web.Response:
        return self._form(request, self._inbox(request), status=200)

    async def embed(self, request: web.Request) -> web.Response:
        self._inbox(request)
        return web.Response(
            body=render.EMBED_JS, content_type="application/javascript", charset="utf-8",
            headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    async def preflight(self, request: web.Request) -> web.Response:
        inbox = self._inbox(request)
        origin = request.headers.get("Origin", "").strip().lower()
        if origin not in inbox.allowed_origins:
            logger.info("form %s: CORS preflight refused for origin %s", inbox.id, origin or "-")
            return json_error(403, "origin_not_allowed", "this origin may not post to this form")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": "Content-Type, Accept, Accept-Language",
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        })

    async def submit(self, request: web.Request) -> web.Response:
        inbox = self._inbox(request)
        remote = self._c.client_ip(request)
        wait = self._limiter.acquire(remote or "unknown")
        if wait > 0:
            logger.warning("form %s: rate limit exceeded by %s", inbox.id, remote)
            self._metrics.refused("rate_limit", inbox=inbox.id)
            return self._refuse(
                request, inbox, status=429, code="rate_limited", message_key="rate_limited",
                reason="too many submissions from this address; retry later",
                headers={"Retry-After": retry_after_value(wait)},
            )
        origin = _origin_of(request)
        if not self._origin_allowed(request, inbox, origin):
            logger.warning("form %s: refused a post from origin %s (client %s)",
                           inbox.id, origin or "-", remote)
            self._metrics.refused("auth", inbox=inbox.id)  # the origin is the only credential a form has
            return self._refuse(
                request, inbox, status=403, code="origin_not_allowed", message_key="forbidden",
                reason="this form does not accept posts from this origin" if origin
                else "the request has no Origin or Referer, which this form requires",
            )
        try:
            body = await read_body(request, self._c.body_limit)
            submission = parse_form(body, request.headers.get("Content-Type"))
        except InvalidInput as exc:
            logger.info("form %s: unreadable submission from %s: %s", inbox.id, remote, exc.reason)
            self._metrics.refused("size" if exc.status == 413 else "malformed", inbox=inbox.id)
            key = {413: "too_large", 415: "unsupported"}.get(exc.status, "rejected")
            code = {413: "too_large", 415: "unsupported_media_type"}.get(exc.status, "malformed")
            return self._refuse(
                request, inbox, status=exc.status, code=code, reason=exc.reason, message_key=key
            )
        if submission.is_bot:
            # Answer like a success so the bot learns nothing; nothing is stored.
            logger.info("form %s: honeypot filled by %s; dropped", inbox.id, remote)
            return self._fake_success(request, inbox)
        errors = field_errors(submission, region=inbox.phone_region) | self._attachment_errors(submission)
        if errors:
            logger.info("form %s: invalid submission from %s: %s", inbox.id, remote, describe_errors(errors))
            status = 413 if errors.get("attachments") == "too_large" else 400
            self._metrics.refused("size" if status == 413 else "malformed", inbox=inbox.id)
            if accepts_json(request):
                return json_response(
                    {"error": "invalid_fields", "reason": describe_errors(errors), "fields": errors},
                    status=status, headers=self._cors(inbox, request),
                )
            return self._form(request, inbox, status=status, submission=submission, errors=errors)
        envelope = request_envelope(
            request,
            channel=CHANNEL,
            tenant=inbox.tenant,
            inbox=inbox.id,
            body=body,
            signature_verified=False,  # anyone may post a public form
            remote=remote,
            meta={
                "accept_language": request.headers.get("Accept-Language"),
                "origin": origin,
                "phone_region": inbox.phone_region,
            },
        )
        result = await ingest_within(self._ingest, envelope, normalize_form, self._c.channel.ingest_timeout)
        return self._answer(request, inbox, result, submission)

    def _answer(
        self, request: web.Request, inbox: _Inbox, result: IngestResult, submission: FormSubmission
    ) -> web.Response:
        cors = self._cors(inbox, request)
        if result.outcome is Outcome.RETRY:
            logger.warning("form %s: could not store a submission now: %s", inbox.id, result.reason)
        elif not result.stored:
            logger.info("form %s: submission rejected: %s", inbox.id, result.reason)
        if accepts_json(request):
            return result_response(result, headers=cors)
        if result.stored:
            payload = result_payload(result)
            page = render.render_page(
                lang=_lang(request), heading_key="thanks_title", body_key="thanks_body",
                form_url=self._form_url(request, inbox), page_id="tg-thanks",
                details={"reference": str(payload["message_id"])[:8]} if payload["message_id"] else None,
            )
            return self._html(page, status=200, inbox=inbox, headers=cors)
        status = result_status(result)
        if result.outcome is Outcome.RETRY:
            # Keep what the customer typed: the form comes back filled in, with a banner.
            return self._form(
                request, inbox, status=status, submission=submission, banner_key="unavailable",
                headers={"Retry-After": retry_after_value(result.retry_after or 5.0)},
            )
        return self._form(request, inbox, status=status, submission=submission, banner_key="rejected")

    def _fake_success(self, request: web.Request, inbox: _Inbox) -> web.Response:
        if accepts_json(request):
            fake = {"message_id": str(uuid.uuid4()), "thread_id": str(uuid.uuid4()), "status": "accepted"}
            return json_response(fake, status=202, headers=self._cors(inbox, request))
        page = render.render_page(
            lang=_lang(request), heading_key="thanks_title", body_key="thanks_body",
            form_url=self._form_url(request, inbox), page_id="tg-thanks",
            details={"reference": uuid.uuid4().hex[:8]},
        )
        return self._html(page, status=200, inbox=inbox, headers=self._cors(inbox, request))


def _lang(request: web.Request) -> str:
    return pick_language(request.headers.get("Accept-Language"), request.query.get("lang"))
