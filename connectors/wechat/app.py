"""The WeChat Official Account (``/wechat/{account}``) and WeCom (``/wecom/{app}``) callback sub-apps.

Each handler verifies first (signature in constant time over the documented fields, then the
replay window), parses only afterwards and only with defusedxml, and answers success only when
``ingest`` reports the message stored. The store gets slightly less than WeChat's 5 s deadline; a
slower commit is not cancelled (WeChat's retry then finds it as a duplicate) but answered 503.

When an account has its API secret configured, the media a message announces are queued in the
store before the answer and fetched afterwards (:mod:`connectors.wechat.media`); they are served
under ``/media/{channel}/...``. An Official Account that also has ``fetch_unionid`` looks up the
unionid of senders whose messages carry none after the answer (:mod:`connectors.wechat.unionid`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

import aiohttp
from aiohttp import web

from connectors.base import (
    ChannelContext,
    ChannelMetrics,
    Ingest,
    WebhookIntake,
    ingest_capturing,
    retry_response,
)
from connectors.wechat.api import Credentials, WeChatApi
from connectors.wechat.media import MediaPolicy, WeChatMedia
from connectors.wechat.security import (
    BadSignature,
    CallbackSecurity,
    Clock,
    Flavor,
    extract_encrypt,
)
from connectors.wechat.sender import (
    WINDOW_48H,
    Account,
    ApiPool,
    OfficialAccountSender,
    WeChatSender,
    WeComSender,
)
from connectors.wechat.settings import WeChatSettings, WeComSettings, _ChannelTable
from connectors.wechat.unionid import UnionIdResolver
from core.channel import ChannelEndpoint, ChannelState, Lifecycle, Refusal, SenderSpec
from core.errors import InvalidInput, RetryableError, VerificationError
from core.http import envelope_headers, read_body
from core.model import IngestResult, RawEnvelope
from core.settings import Settings, revealed_all
from normalizers.base import Normalizer
from normalizers.wechat import normalize, parse_callback_xml

logger = logging.getLogger(__name__)

# Why a callback account or app cannot start without its token and AES key.
CALLBACK = "the callback cannot be verified"


class PlaintextRefused(VerificationError):
    """A plaintext delivery to an account that does not allow it (HTTP 403)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """One configured Official Account or WeCom app, resolved from the settings."""

    name: str
    tenant: str
    inbox: str
    security: CallbackSecurity
    mode: str = "safe"
    allow_plaintext: bool = False
    agent_id: int | None = None  # WeCom only
    # API credentials (AppSecret / corp secret): media are fetched only when they are set.
    credentials: Credentials | None = None
    # Official Accounts with credentials: look up missing unionids with the user-info API.
    fetch_unionid: bool = False


@dataclass(slots=True, kw_only=True)
class _Runtime:
    channel: str
    endpoints: Mapping[str, Endpoint]
    ingest: Ingest
    max_body_bytes: int
    ingest_timeout: float
    clock: Clock
    media: WeChatMedia | None = None
    unionid: UnionIdResolver | None = None
    metrics: ChannelMetrics | None = None  # None in tests that build the sub-app alone
    # The shielded, bounded ingest; what outlived its answer is awaited at cleanup.
    intake: WebhookIntake = field(init=False)

    def __post_init__(self) -> None:
        self.intake = WebhookIntake(self.channel, self.ingest_timeout, what="message")


RUNTIME = web.AppKey("wechat_callback_runtime", _Runtime)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _CallbackConnector:
    name: ClassVar[str]
    flavor: ClassVar[Flavor]
    sender_class: ClassVar[type[WeChatSender]]
    # The reply window (WeChat: 48 h after the follower's last message) and the sends per second
    # per inbox, under the provider's quotas (see connectors.wechat.sender).
    reply_window: ClassVar[float | None] = None
    reply_rate: ClassVar[float] = 10.0
    reply_burst: ClassVar[int] = 20

    def __init__(
        self,
        endpoints: Mapping[str, Endpoint],
        *,
        max_body_bytes: int,
        ingest_timeout: float,
        clock: Clock,
        media_policy: MediaPolicy | None = None,
        api_timeout: float = 15.0,
    ) -> None:
        self.endpoints = dict(endpoints)
        self.max_body_bytes = max_body_bytes
        self.ingest_timeout = ingest_timeout
        self.clock = clock
        self.media_policy = media_policy or MediaPolicy()
        self.api_timeout = api_timeout

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        """The callback URL of every account (what the provider's console is given)."""
        return callback_urls(base_url, self.name, self.endpoints)

    def setup(self, ctx: ChannelContext) -> None:
        """Mount the sub-app under ``/{name}``; with API credentials also the media fetcher, the
        unionid lookups and the reply sender."""
        fetcher = self.media_fetcher()
        resolver = self.unionid_resolver()
        sub = self.build_subapp(ctx.ingest, media=fetcher, unionid=resolver, metrics=ctx.metrics)
        ctx.add_app(f"/{self.name}", sub)
        if fetcher is not None:
            fetcher.bind(ctx.media, ctx.metrics)
            if resolver is not None:
                resolver.bind(ctx.state, ctx.identities)
            pool = self.api_pool(ctx)
            ctx.add_lifecycle(self._api_lifecycle(pool, fetcher, resolver))
            ctx.add_sender(
                SenderSpec(
                    sender=self.sender(pool, ctx),
                    window=self.reply_window,
                    rate=self.reply_rate,
                    burst=self.reply_burst,
                )
            )

    def api_pool(self, ctx: ChannelContext) -> ApiPool:
        """The accounts' API clients on one HTTP client, their tokens shared through the store."""
        # Each account's credentials carry their API base (WeChatApi joins it); the client pools
        # the connections of every account.
        bases = sorted(e.credentials.api_base for e in self.endpoints.values() if e.credentials is not None)
        http = ctx.http(bases[0], timeout=self.api_timeout + 5.0)
        return ApiPool(lambda: self.apis(http.session, state=ctx.state))

    def sender(self, pool: ApiPool, ctx: ChannelContext) -> WeChatSender:
        """The reply sender of the accounts that have API credentials."""
        accounts = {
            name: Account(name=name, inbox=e.inbox, app_id=e.security.receive_id, agent_id=e.agent_id)
            for name, e in self.endpoints.items()
            if e.credentials is not None
        }
        return self.sender_class(accounts, pool, blobs=ctx.blobs, state=ctx.state)

    def media_fetcher(self) -> WeChatMedia | None:
        """A fetcher for the accounts that have API credentials; ``None`` when none has."""
        accounts = frozenset(name for name, e in self.endpoints.items() if e.credentials is not None)
        return WeChatMedia(self.name, accounts, self.media_policy) if accounts else None

    def unionid_resolver(self) -> UnionIdResolver | None:
        """A resolver for the accounts with credentials and ``fetch_unionid``; ``None`` when none has."""
        accounts = {
            name: e.security.receive_id
            for name, e in self.endpoints.items()
            if e.credentials is not None and e.fetch_unionid
        }
        return UnionIdResolver(accounts, clock=self.clock) if accounts else None

    def apis(
        self, session: aiohttp.ClientSession, *, state: ChannelState | None = None
    ) -> dict[str, WeChatApi]:
        """A client per account with credentials; with ``state`` their tokens are shared by every
        instance through the store."""
        return {
            name: WeChatApi(session, e.credentials, timeout=self.api_timeout, state=state)
            for name, e in self.endpoints.items()
            if e.credentials is not None
        }

    def _api_lifecycle(
        self, pool: ApiPool, fetcher: WeChatMedia, resolver: UnionIdResolver | None
    ) -> Lifecycle:
        @contextlib.asynccontextmanager
        async def running() -> AsyncIterator[None]:
            # One client (so one access token) per account, shared by media and unionid lookups
            # and the sender.
            async with contextlib.AsyncExitStack() as stack:
                apis = pool.get()
                await stack.enter_async_context(fetcher.running(apis))
                if resolver is not None:
                    await stack.enter_async_context(resolver.running(apis))
                yield

        return running

    def handlers(self) -> tuple[Handler, Handler]:
        """The URL-verification (GET) and callback (POST) handlers of this flavor."""
        if self.flavor == "wecom":
            return _wecom_handshake, _wecom_callback
        return _oa_handshake, _oa_callback

    def build_subapp(
        self,
        ingest: Ingest,
        *,
        media: WeChatMedia | None = None,
        unionid: UnionIdResolver | None = None,
        metrics: ChannelMetrics | None = None,
    ) -> web.Application:
        sub = web.Application()
        sub[RUNTIME] = _Runtime(
            channel=self.name,
            endpoints=self.endpoints,
            ingest=ingest,
            max_body_bytes=self.max_body_bytes,
            ingest_timeout=self.ingest_timeout,
            clock=self.clock,
            media=media,
            unionid=unionid,
            metrics=metrics,
        )
        handshake, callback = self.handlers()
        sub.router.add_get("/{name}", handshake, allow_head=False)
        sub.router.add_post("/{name}", callback)
        sub.on_cleanup.append(_drain)
        return sub


class WeChatConnector(_CallbackConnector):
    """Official Account callbacks, one route per ``[channels.wechat.accounts.<name>]``."""

    name = "wechat"
    flavor = "official_account"
    sender_class = OfficialAccountSender
    reply_window = WINDOW_48H
    # The customer-service API allows 500 000 calls a day per account (~5.8/s).
    reply_rate = 5.0

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock = time.time) -> Self | None:
        table = settings.channel("wechat", WeChatSettings)
        if table is None or not table.accounts:
            return None
        endpoints: dict[str, Endpoint] = {}
        for name, account in table.accounts.items():
            base = f"channels.wechat.accounts.{name}"
            token = settings.required(account.token, key=f"{base}.token", why=CALLBACK)
            aes_keys = revealed_all(account.encoding_aes_key, account.previous_encoding_aes_key)
            if account.mode != "plaintext":
                settings.required(account.encoding_aes_key, key=f"{base}.encoding_aes_key", why=CALLBACK)
            endpoints[name] = Endpoint(
                name=name,
                tenant=settings.inbox(account.inbox, key=f"{base}.inbox").tenant,
                inbox=account.inbox,
                mode=account.mode,
                allow_plaintext=account.allow_plaintext,
                credentials=_credentials(
                    "official_account", account.api_base, account.app_id, account.app_secret
                ),
                fetch_unionid=account.fetch_unionid,
                security=CallbackSecurity(
                    flavor=cls.flavor,
                    receive_id=account.app_id,
                    tokens=(token, *revealed_all(account.previous_token)),
                    aes_keys=aes_keys,
                    replay_window=account.replay_window,
                    clock=clock,
                ),
            )
        return cls(endpoints, clock=clock, **_table_options(table))


class WeComConnector(_CallbackConnector):
    """WeCom self-built application callbacks, one route per ``[channels.wecom.apps.<name>]``."""

    name = "wecom"
    flavor = "wecom"
    sender_class = WeComSender
    # WeCom allows an API 10 000 calls a minute and 150 000 an hour per corp (~40/s), and 30
    # messages a minute to one member; 10/s per app stays well inside.
    reply_rate = 10.0

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock = time.time) -> Self | None:
        table = settings.channel("wecom", WeComSettings)
        if table is None or not table.apps:
            return None
        endpoints: dict[str, Endpoint] = {}
        for name, app in table.apps.items():
            base = f"channels.wecom.apps.{name}"
            token = settings.required(app.token, key=f"{base}.token", why=CALLBACK)
            settings.required(app.encoding_aes_key, key=f"{base}.encoding_aes_key", why=CALLBACK)
            endpoints[name] = Endpoint(
                name=name,
                tenant=settings.inbox(app.inbox, key=f"{base}.inbox").tenant,
                inbox=app.inbox,
                agent_id=app.agent_id,
                credentials=_credentials("wecom", app.api_base, app.corp_id, app.corp_secret),
                security=CallbackSecurity(
                    flavor=cls.flavor,
                    receive_id=app.corp_id,
                    tokens=(token, *revealed_all(app.previous_token)),
                    aes_keys=revealed_all(app.encoding_aes_key, app.previous_encoding_aes_key),
                    replay_window=app.replay_window,
                    clock=clock,
                ),
            )
        return cls(endpoints, clock=clock, **_table_options(table))


def callback_urls(base_url: str, channel: str, endpoints: Mapping[str, Endpoint]) -> list[ChannelEndpoint]:
    return [
        ChannelEndpoint(inbox=e.inbox, kind="webhook", address=f"{base_url}/{channel}/{name}")
        for name, e in endpoints.items()
    ]


def _table_options(table: _ChannelTable) -> dict[str, Any]:
    return {
        "max_body_bytes": table.max_body_bytes,
        "ingest_timeout": table.ingest_timeout,
        "api_timeout": table.api_timeout,
        "media_policy": MediaPolicy(
            concurrency=table.media_concurrency,
            max_bytes=table.media_max_bytes,
            retry_for=table.media_retry_for,
            lease=max(120.0, table.api_timeout * 6),
        ),
    }


def _credentials(flavor: Flavor, api_base: str, app_id: str, secret: Any) -> Credentials | None:
    values = revealed_all(secret)
    return Credentials(flavor=flavor, api_base=api_base, app_id=app_id, secret=values[0]) if values else None


# --- request handling -------------------------------------------------------------------------


def _endpoint(request: web.Request) -> tuple[_Runtime, Endpoint]:
    runtime = request.app[RUNTIME]
    endpoint = runtime.endpoints.get(request.match_info["name"])
    if endpoint is None:
        raise web.HTTPNotFound(text="unknown account")
    return runtime, endpoint


def _refusal(runtime: _Runtime, endpoint: Endpoint, request: web.Request, exc: Exception) -> web.Response:
    """Map a verification or input failure to its 4xx; logged without body or secrets."""
    reason: Refusal
    if isinstance(exc, BadSignature):
        status, reason = 401, "signature"
    elif isinstance(exc, VerificationError):
        status, reason = 403, "signature"  # stale timestamp, plaintext refused
    elif isinstance(exc, InvalidInput):
        status, reason = exc.status, "size" if exc.status == 413 else "malformed"
    else:  # pragma: no cover - callers pass only the kinds above
        raise exc
    if runtime.metrics is not None:
        runtime.metrics.refused(reason, inbox=endpoint.inbox)
    logger.warning(
        "%s/%s: refused %s %s from %s: %s", runtime.channel, endpoint.name, request.method, status,
        request.remote, exc,
    )
    return web.Response(status=status, text=type(exc).__name__)


def _echostr(request: web.Request) -> str:
    # A '+' that reached us unencoded was decoded as a space; base64 has no spaces, so undo it.
    return request.query.get("echostr", "").replace(" ", "+")


async def _oa_handshake(request: web.Request) -> web.Response:
    """Official Account URL verification: echo ``echostr`` when ``signature`` verifies."""
    runtime, endpoint = _endpoint(request)
    query = request.query
    try:
        endpoint.security.verify(
            query.get("signature", ""), query.get("timestamp", ""), query.get("nonce", "")
        )
        echostr = _echostr(request)
        if not echostr:
            raise InvalidInput("echostr missing")
    except (VerificationError, InvalidInput) as exc:
        return _refusal(runtime, endpoint, request, exc)
    return web.Response(text=echostr)


async def _wecom_handshake(request: web.Request) -> web.Response:
    """WeCom URL verification: ``msg_signature`` covers ``echostr``; answer its decryption."""
    runtime, endpoint = _endpoint(request)
    query = request.query
    echostr = _echostr(request)
    try:
        endpoint.security.verify_msg(
            query.get("msg_signature", ""), query.get("timestamp", ""), query.get("nonce", ""), echostr
        )
        plain = endpoint.security.decrypt(echostr)
    except (VerificationError, InvalidInput) as exc:
        return _refusal(runtime, endpoint, request, exc)
    return web.Response(text=plain)


def _open_encrypted(endpoint: Endpoint, body: bytes, query: Mapping[str, str], max_bytes: int) -> str:
    """Verify ``msg_signature`` over the Encrypt value, then parse, decrypt and check the plaintext."""
    encrypt = extract_encrypt(body)  # a regular expression, not an XML parser
    endpoint.security.verify_msg(
        query.get("msg_signature", ""), query.get("timestamp", ""), query.get("nonce", ""), encrypt
    )
    outer = parse_callback_xml(body, max_bytes=max_bytes)
    if outer.get("Encrypt") != encrypt:
        raise InvalidInput("the parsed Encrypt element is not the one that was verified")
    plaintext = endpoint.security.decrypt(encrypt)
    fields = parse_callback_xml(plaintext, max_bytes=max_bytes)
    agent = fields.get("AgentID")
    ours = ("", str(endpoint.agent_id))
    if endpoint.agent_id is not None and isinstance(agent, str) and agent.strip() not in ours:
        raise InvalidInput("callback is for another WeCom application")
    return plaintext


def _open_plaintext(endpoint: Endpoint, body: bytes, query: Mapping[str, str], max_bytes: int) -> str:
    """Plaintext mode: the signature covers only timestamp and nonce, so it must be allowed."""
    if not endpoint.allow_plaintext:
        raise PlaintextRefused("plaintext delivery, but this account does not allow plaintext")
    endpoint.security.verify(query.get("signature", ""), query.get("timestamp", ""), query.get("nonce", ""))
    parse_callback_xml(body, max_bytes=max_bytes)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("body is not UTF-8") from None


async def _oa_callback(request: web.Request) -> web.StreamResponse:
    runtime, endpoint = _endpoint(request)
    query = request.query
    encrypted = "msg_signature" in query or query.get("encrypt_type", "").lower() == "aes"
    try:
        body = await read_body(request, runtime.max_body_bytes)
        if encrypted:
            plaintext = _open_encrypted(endpoint, body, query, runtime.max_body_bytes)
        else:
            plaintext = _open_plaintext(endpoint, body, query, runtime.max_body_bytes)
    except (VerificationError, InvalidInput) as exc:
        return _refusal(runtime, endpoint, request, exc)
    meta = {
        "app_id": endpoint.security.receive_id,
        "mode": endpoint.mode if encrypted else "plaintext",
    }
    envelope = _envelope(runtime, endpoint, request, body, plaintext, meta, verified=encrypted)
    return await _deliver(runtime, endpoint, envelope, ok_body="success")


async def _wecom_callback(request: web.Request) -> web.StreamResponse:
    runtime, endpoint = _endpoint(request)
    try:
        body = await read_body(request, runtime.max_body_bytes)
        plaintext = _open_encrypted(endpoint, body, request.query, runtime.max_body_bytes)
    except (VerificationError, InvalidInput) as exc:
        return _refusal(runtime, endpoint, request, exc)
    meta = {"corp_id": endpoint.security.receive_id, "agent_id": endpoint.agent_id, "mode": "safe"}
    envelope = _envelope(runtime, endpoint, request, body, plaintext, meta, verified=True)
    # WeCom documents an empty 200 as "received, no passive reply".
    return await _deliver(runtime, endpoint, envelope, ok_body="")


def _envelope(
    runtime: _Runtime,
    endpoint: Endpoint,
    request: web.Request,
    body: bytes,
    plaintext: str,
    meta: Mapping[str, Any],
    *,
    verified: bool,
) -> RawEnvelope:
    return RawEnvelope(
        channel=runtime.channel,
        tenant=endpoint.tenant,
        inbox=endpoint.inbox,
        body=body,
        received_at=datetime.fromtimestamp(runtime.clock(), UTC),
        content_type=request.content_type,
        headers=envelope_headers(request),  # credentials dropped, as every channel does
        signature_verified=verified,
        remote=request.remote,
        meta={
            "plaintext": plaintext,
            "account": endpoint.name,
            "encrypted": verified,
            "max_xml_bytes": runtime.max_body_bytes,
            **meta,
        },
    )


async def _deliver(
    runtime: _Runtime, endpoint: Endpoint, envelope: RawEnvelope, *, ok_body: str,
    normalizer: Normalizer = normalize,
) -> web.Response:
    """Await the pipeline (and the media queue) within the deadline; map the result to WeChat's answer."""
    work = commit(runtime.ingest, envelope, normalizer, runtime.media, endpoint.name, unionid=runtime.unionid)
    try:
        # Shielded: cancelling a commit half-way helps nobody; WeChat's retry will find it stored.
        result = await runtime.intake.shielded(work, runtime.ingest_timeout)
    except TimeoutError:
        logger.warning("%s/%s: store did not answer within %.1f s; answering 503",
                       runtime.channel, endpoint.name, runtime.ingest_timeout)
        return retry_response(5.0)
    except RetryableError as exc:
        logger.warning("%s/%s: temporary failure: %s", runtime.channel, endpoint.name, exc.reason)
        return retry_response(exc.retry_after)
    except InvalidInput as exc:
        return web.Response(status=exc.status, text=exc.reason)
    # RETRY, or anything not known to be stored: WeChat retries a non-success answer.
    return runtime.intake.answer(result, name=endpoint.name,
                                 ok=lambda: web.Response(text=ok_body, content_type="text/plain"))


async def commit(
    ingest: Ingest,
    envelope: RawEnvelope,
    normalizer: Normalizer,
    media: WeChatMedia | None,
    account: str,
    *,
    unionid: UnionIdResolver | None = None,
) -> IngestResult:
    """Ingest, then durably queue the media of what was stored (also for a duplicate: the first
    delivery may have been committed by a process that died before queueing its media), and start
    the unionid lookups of its senders (in the background: they never delay the answer)."""
    result, produced = await ingest_capturing(ingest, envelope, normalizer)
    if media is not None and result.stored and produced:
        await media.enqueue(produced, account)
    if unionid is not None and result.stored and produced:
        unionid.schedule(produced, account)
    return result


async def _drain(app: web.Application) -> None:
    """Let ingests that outlived their answer finish before the store closes."""
    await app[RUNTIME].intake.drain(app)
