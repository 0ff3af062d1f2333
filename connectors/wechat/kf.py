"""WeChat Customer Service (微信客服): ``/wechat_kf/{app}`` callbacks and the ``sync_msg`` pull.

The callback (WeCom-style: ``msg_signature``, AES with the corp id) only announces that messages
wait (event ``kf_msg_or_event`` with a ``Token`` and the ``OpenKfId``). The handler verifies it,
durably remembers the customer service account (so a restart syncs it even without a new
callback), answers at once, and starts a sync. A sync pulls pages with ``sync_msg`` from the
durable cursor (``store.state_get``); each page is one envelope through ``ingest`` (one commit, in
WeChat's order, idempotent by ``msgid``) followed by its media queue, and only then is the page's
``next_cursor`` saved. A crash between the commit and the cursor re-pulls that page, which the
idempotency keys absorb: nothing is missed, nothing is published twice. Every known account is
also synced at start-up and every ``poll_interval``, in case a callback was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, Self

import aiohttp
import orjson
from aiohttp import web

from connectors.base import ChannelContext, ChannelMetrics, Ingest
from connectors.wechat.api import ApiError, Credentials, WeChatApi
from connectors.wechat.app import (
    CALLBACK,
    RUNTIME,
    Endpoint,
    _endpoint,
    _open_encrypted,
    _refusal,
    _Runtime,
    _table_options,
    _wecom_handshake,
    callback_urls,
    commit,
)
from connectors.wechat.media import MediaPolicy, WeChatMedia
from connectors.wechat.security import CallbackSecurity, Clock
from connectors.wechat.sender import WINDOW_48H, Account, ApiPool, KfSender
from connectors.wechat.settings import WeChatKfSettings
from core.channel import ChannelEndpoint, ChannelState, DeliveryStatus, ReplyFailure, SenderSpec
from core.errors import InvalidInput, RetryableError, VerificationError
from core.http import read_body
from core.model import RawEnvelope
from core.settings import Settings, revealed_all
from normalizers.wechat import parse_callback_xml
from normalizers.wechat_kf import normalize_kf

logger = logging.getLogger(__name__)

CHANNEL = "wechat_kf"

# msg_send_fail's fail_type -> reply.failed reason: 4 session expired (48 h), 5 session closed,
# 6 the 5-message limit, 10 the customer refuses messages, 1 account deleted, 2 app closed.
SEND_FAIL_REASONS: dict[int, ReplyFailure] = {
    1: "recipient_unreachable", 2: "auth", 4: "window_closed", 5: "window_closed", 6: "window_closed",
    10: "blocked",
}


class Report(Protocol):
    async def __call__(
        self, provider_message_id: str, status: DeliveryStatus, *, reason: ReplyFailure | None = None,
        detail: str | None = None,
    ) -> bool: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class KfApp:
    """One configured ``[channels.wechat_kf.apps.<name>]``, resolved."""

    name: str
    tenant: str
    inbox: str
    corp_id: str
    credentials: Credentials
    open_kfids: tuple[str, ...] = ()


def cursor_key(account: str, open_kfid: str) -> str:
    return f"{account}:{open_kfid}:cursor"


def _known_key(account: str) -> str:
    return f"{account}:open_kfids"


class KfSyncer:
    """Pulls each customer service account's messages from its durable cursor."""

    def __init__(
        self,
        apps: Mapping[str, KfApp],
        ingest: Ingest,
        media: WeChatMedia | None,
        *,
        limit: int = 1000,
        poll_interval: float = 300.0,
    ) -> None:
        self.apps = dict(apps)
        self._ingest = ingest
        self._media = media
        self._limit = limit
        self._poll_interval = poll_interval
        self._state: ChannelState | None = None
        self._report: Report | None = None
        self._apis: Mapping[str, WeChatApi] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._wanted: dict[tuple[str, str], str | None] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    def bind(self, state: ChannelState, report: Report | None = None) -> None:
        """The durable state (cursors), and where WeChat's reports on our replies go
        (``ctx.report_delivery``)."""
        self._state = state
        self._report = report

    def start(self, apis: Mapping[str, WeChatApi]) -> None:
        self._apis = apis

    @property
    def state(self) -> ChannelState:
        if self._state is None:
            raise RuntimeError("wechat_kf syncer is not bound to the channel's state")
        return self._state

    async def known(self, account: str) -> list[str]:
        """The customer service accounts to sync: configured ones and every one a callback named."""
        raw = await self.state.get(_known_key(account))
        seen: list[str] = orjson.loads(raw) if raw else []
        return list(dict.fromkeys([*self.apps[account].open_kfids, *seen]))

    async def announce(self, account: str, open_kfid: str, token: str | None) -> None:
        """A verified callback: remember the account durably (before the answer), then sync it."""
        known = await self.known(account)
        if open_kfid not in known:
            await self.state.put(_known_key(account), orjson.dumps([*known, open_kfid]))
        self.kick(account, open_kfid, token)

    def kick(self, account: str, open_kfid: str, token: str | None = None) -> None:
        """Sync in the background; a kick during a running sync makes it run once more."""
        key = (account, open_kfid)
        self._wanted[key] = token or self._wanted.get(key)
        if key not in self._tasks:
            task = asyncio.create_task(self._drain(key), name=f"ticketgate-kf-sync-{account}")
            self._tasks[key] = task

    async def _drain(self, key: tuple[str, str]) -> None:
        try:
            while key in self._wanted:
                token = self._wanted.pop(key)
                try:
                    await self.sync(*key, token=token)
                except Exception as exc:
                    # The cursor did not move past anything unstored; the next kick or poll resumes.
                    reason = exc.reason if isinstance(exc, RetryableError) else f"{type(exc).__name__}: {exc}"
                    logger.warning("%s/%s: sync of %s stopped: %s", CHANNEL, key[0], key[1], reason)
                    return
        finally:
            self._tasks.pop(key, None)

    async def sync(self, account: str, open_kfid: str, *, token: str | None = None) -> int:
        """Pull every waiting page; returns how many messages were handed to ``ingest``."""
        app, api = self.apps[account], self._apis[account]
        lock = self._locks.setdefault((account, open_kfid), asyncio.Lock())
        handed = 0
        async with lock:
            key = cursor_key(account, open_kfid)
            raw = await self.state.get(key)
            cursor = raw.decode() if raw else None
            while True:
                try:
                    page = await api.sync_msg(
                        cursor=cursor, token=token, limit=self._limit, open_kfid=open_kfid
                    )
                except ApiError:
                    if token is None:
                        raise
                    token = None  # the callback's token expires after 10 minutes: go on without it
                    continue
                items = page.get("msg_list")
                if isinstance(items, list) and items:
                    envelope = RawEnvelope(
                        channel=CHANNEL,
                        tenant=app.tenant,
                        inbox=app.inbox,
                        body=orjson.dumps(page),
                        received_at=datetime.now(UTC),
                        content_type="application/json",
                        # Pulled over TLS from WeChat with our own credentials.
                        signature_verified=True,
                        meta={"corp_id": app.corp_id, "account": account, "open_kfid": open_kfid},
                    )
                    result = await commit(self._ingest, envelope, normalize_kf, self._media, account)
                    if not result.stored:
                        raise RetryableError(f"page not stored: {result.reason}", retry_after=5.0)
                    handed += len(items)
                    await self._report_failures(items)
                next_cursor = page.get("next_cursor")
                if isinstance(next_cursor, str) and next_cursor and next_cursor != cursor:
                    # Only now: every message of the page is committed. Another instance that
                    # moved the cursor meanwhile wins; go on from where it got to.
                    if not await self.state.compare_and_set(key, raw, next_cursor.encode()):
                        raw = await self.state.get(key)
                        cursor = raw.decode() if raw else None
                        continue
                    raw, cursor = next_cursor.encode(), next_cursor
                if not page.get("has_more"):
                    return handed

    async def _report_failures(self, items: list[Any]) -> None:
        """``msg_send_fail`` events name a reply of ours WeChat did not deliver: ``reply.failed``.
        Reported after the page's commit; a page pulled again reports again (the ledger keeps one
        outcome per reply)."""
        if self._report is None:
            return
        for item in items:
            event = item.get("event") if isinstance(item, dict) else None
            if not isinstance(event, dict) or event.get("event_type") != "msg_send_fail":
                continue
            msgid = event.get("fail_msgid")
            if not isinstance(msgid, str) or not msgid:
                continue
            fail_type = event.get("fail_type")
            reason: ReplyFailure = "provider_error"
            if isinstance(fail_type, int):
                reason = SEND_FAIL_REASONS.get(fail_type, reason)
            try:
                detail = f"msg_send_fail fail_type {fail_type}"
                await self._report(msgid, "failed", reason=reason, detail=detail)
            except Exception:
                # The event itself is stored and published; only the reply's outcome is missing.
                logger.exception("%s: reporting the failure of reply message %s failed", CHANNEL, msgid)

    async def run(self) -> None:
        """Sync every known account at start and every ``poll_interval``."""
        while True:
            for account in self.apps:
                try:
                    for open_kfid in await self.known(account):
                        self.kick(account, open_kfid)
                except Exception:
                    logger.exception("%s/%s: listing customer service accounts failed", CHANNEL, account)
            await asyncio.sleep(self._poll_interval)

    async def idle(self) -> None:
        """Wait until the syncs under way (and those they were asked to repeat) are over."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


KF_SYNCER = web.AppKey("wechat_kf_syncer", KfSyncer)


class WeChatKfConnector:
    """WeChat Customer Service, one route per ``[channels.wechat_kf.apps.<name>]``."""

    name: ClassVar[str] = CHANNEL

    def __init__(
        self,
        apps: Mapping[str, KfApp],
        endpoints: Mapping[str, Endpoint],
        table: WeChatKfSettings,
        clock: Clock,
    ) -> None:
        self.apps = dict(apps)
        self.endpoints = dict(endpoints)
        self.table = table
        self.clock = clock
        self.options: dict[str, Any] = _table_options(table)

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock = time.time) -> Self | None:
        table = settings.channel(CHANNEL, WeChatKfSettings)
        if table is None or not table.apps:
            return None
        apps: dict[str, KfApp] = {}
        endpoints: dict[str, Endpoint] = {}
        for name, app in table.apps.items():
            base = f"channels.{CHANNEL}.apps.{name}"
            token = settings.required(app.token, key=f"{base}.token", why=CALLBACK)
            settings.required(app.encoding_aes_key, key=f"{base}.encoding_aes_key", why=CALLBACK)
            secret = settings.required(app.secret, key=f"{base}.secret", why="messages cannot be pulled")
            tenant = settings.inbox(app.inbox, key=f"{base}.inbox").tenant
            credentials = Credentials(
                flavor="wecom", api_base=app.api_base, app_id=app.corp_id, secret=secret
            )
            apps[name] = KfApp(
                name=name,
                tenant=tenant,
                inbox=app.inbox,
                corp_id=app.corp_id,
                credentials=credentials,
                open_kfids=app.open_kfids,
            )
            endpoints[name] = Endpoint(
                name=name,
                tenant=tenant,
                inbox=app.inbox,
                credentials=credentials,
                security=CallbackSecurity(
                    flavor="wecom",
                    receive_id=app.corp_id,
                    tokens=(token, *revealed_all(app.previous_token)),
                    aes_keys=revealed_all(app.encoding_aes_key, app.previous_encoding_aes_key),
                    replay_window=app.replay_window,
                    clock=clock,
                ),
            )
        return cls(apps, endpoints, table, clock)

    def media_fetcher(self) -> WeChatMedia:
        policy: MediaPolicy = self.options["media_policy"]
        return WeChatMedia(CHANNEL, frozenset(self.apps), policy)

    def syncer(self, ingest: Ingest, media: WeChatMedia | None) -> KfSyncer:
        return KfSyncer(
            self.apps, ingest, media, limit=self.table.sync_limit, poll_interval=self.table.poll_interval
        )

    def apis(
        self, session: aiohttp.ClientSession, *, state: ChannelState | None = None
    ) -> dict[str, WeChatApi]:
        """A client per app; with ``state`` their tokens are shared by every instance through the store."""
        return {
            name: WeChatApi(session, app.credentials, timeout=self.table.api_timeout, state=state)
            for name, app in self.apps.items()
        }

    def sender(self, pool: ApiPool, ctx: ChannelContext) -> KfSender:
        accounts = {
            name: Account(name=name, inbox=app.inbox, app_id=app.corp_id) for name, app in self.apps.items()
        }
        return KfSender(accounts, pool, blobs=ctx.blobs, state=ctx.state)

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        """The callback URL of every app (what the 微信客服 admin is given)."""
        return callback_urls(base_url, CHANNEL, self.endpoints)

    def setup(self, ctx: ChannelContext) -> None:
        """``/wechat_kf/{app}`` callbacks, and the sync and media tasks."""
        fetcher = self.media_fetcher()
        syncer = self.syncer(ctx.ingest, fetcher)
        fetcher.bind(ctx.media, ctx.metrics)
        syncer.bind(ctx.state, ctx.report_delivery)
        ctx.add_app(f"/{CHANNEL}", self.build_subapp(ctx.ingest, syncer, metrics=ctx.metrics))
        # Each app's credentials carry their API base (WeChatApi joins it); one client pools them.
        bases = sorted(app.credentials.api_base for app in self.apps.values())
        http = ctx.http(bases[0], timeout=self.table.api_timeout + 5.0)
        # One client per app (so one token, shared through the store) for the syncer, the media
        # fetcher and the sender.
        pool = ApiPool(lambda: self.apis(http.session, state=ctx.state))
        # 微信客服 takes 5 messages within 48 hours of the customer's last message (95001 after).
        ctx.add_sender(SenderSpec(sender=self.sender(pool, ctx), window=WINDOW_48H, rate=10.0, burst=20,
                                  idempotent=True))

        @contextlib.asynccontextmanager
        async def syncing() -> AsyncIterator[None]:
            apis = pool.get()
            syncer.start(apis)
            async with fetcher.running(apis):
                poller = asyncio.create_task(syncer.run(), name="ticketgate-kf-poll")
                try:
                    yield
                finally:
                    poller.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await poller
                    await syncer.stop()

        ctx.add_lifecycle(syncing)

    def build_subapp(
        self, ingest: Ingest, syncer: KfSyncer, *, metrics: ChannelMetrics | None = None
    ) -> web.Application:
        sub = web.Application()
        sub[RUNTIME] = _Runtime(
            channel=CHANNEL,
            endpoints=self.endpoints,
            ingest=ingest,
            max_body_bytes=self.options["max_body_bytes"],
            ingest_timeout=self.options["ingest_timeout"],
            clock=self.clock,
            metrics=metrics,
        )
        sub[KF_SYNCER] = syncer
        sub.router.add_get("/{name}", _wecom_handshake, allow_head=False)
        sub.router.add_post("/{name}", _kf_callback)
        return sub


async def _kf_callback(request: web.Request) -> web.StreamResponse:
    runtime, endpoint = _endpoint(request)
    try:
        body = await read_body(request, runtime.max_body_bytes)
        plaintext = _open_encrypted(endpoint, body, request.query, runtime.max_body_bytes)
        fields = parse_callback_xml(plaintext, max_bytes=runtime.max_body_bytes)
    except (VerificationError, InvalidInput) as exc:
        return _refusal(runtime, endpoint, request, exc)
    event = fields.get("Event")
    open_kfid = fields.get("OpenKfId")
    if event != "kf_msg_or_event" or not isinstance(open_kfid, str) or not open_kfid.strip():
        logger.info("%s/%s: ignoring callback event %r", CHANNEL, endpoint.name, event)
        return web.Response(text="")
    token = fields.get("Token")
    try:
        await asyncio.wait_for(
            request.app[KF_SYNCER].announce(
                endpoint.name, open_kfid.strip(), token if isinstance(token, str) else None
            ),
            runtime.ingest_timeout,
        )
    except (TimeoutError, RetryableError):
        return web.Response(status=503, text="retry", headers={"Retry-After": "5"})
    return web.Response(text="")
