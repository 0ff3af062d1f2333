"""The reply dispatcher: desks' replies out through the channels' senders, in order, durably.

One dispatcher per instance claims due replies from the ledger (:mod:`gateway.store.replies`),
each the first unfinished reply of its thread, under a lease. For each it resolves the thread: the
channel (the desk's choice among the customer's channels, else the channel the customer last wrote
on in this thread), the inbox, the recipient identity, and the ``extra`` of the customer's latest
message there (``answering``). It then enforces the sender's reply window (``window_closed``
without a call unless ``outside_window`` allows it), waits for the inbox's token bucket
(``SenderSpec.rate`` / ``burst``), and makes one call. A success is ``reply.sent`` with the
provider's id; a permanent :class:`~core.channel.SendError` ends the reply (``reply.failed``); a
transient one is retried with capped exponential backoff and jitter until ``max_attempts`` calls
or ``max_age`` (then ``reply.failed`` ``expired``). Every outcome is committed with its event.

A reply sent on a channel with a ``[[replies.fallback]]`` rule (web chat: held for a visitor who
may be gone) schedules, in the commit of its ``reply.sent``, a mail fallback: a new reply of the
thread, due after the rule's delay, to the customer's *verified* email. A ``reply.delivered`` or
``reply.read`` of the original drops it; when it falls due it is claimed like any reply (so one
instance sends it, and a restart keeps it), checked once more, and sent by the email sender.

A crash between the provider's acceptance and our commit leaves the lease to run out; the reply is
then sent once more with the same ``reply_id`` (which a provider with idempotency drops, and which
is the email's Message-ID). docs/replies.md states the guarantee per channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from yarl import URL

from core.channel import (
    DeliveryStatus,
    OutboundAttachment,
    OutboundReply,
    ReplyFailure,
    SendError,
    SenderSpec,
    Sent,
)
from core.model import Identity
from core.settings import ReplyFallback, ReplySettings
from dedupe.engine import new_id
from gateway.metrics import Metrics
from gateway.outbound import AddressNotPermitted, PublicResolver, check_url, not_permitted
from gateway.store.base import Store
from gateway.store.replies import FallbackPlan, ReplyContext, ReplyOutcome, ReplyRecord, ReplyRoute, owned

logger = logging.getLogger(__name__)

# Time kept from the lease for recording the outcome (at most a quarter of it): a call that runs
# past the rest is a timeout.
_LEASE_MARGIN = 5.0
# Attachment URLs: redirects followed (each hop checked like the first URL).
_MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class TokenBucket:
    """``rate`` sends per second with bursts of ``burst``, for one inbox of one instance."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = max(rate, 1e-6)
        self._burst = max(float(burst), 1.0)
        self._tokens = self._burst
        self._clock = clock
        self._at = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now

    async def acquire(self) -> None:
        """Wait for a token (waiters are served in order)."""
        async with self._lock:
            self._refill()
            if self._tokens < 1.0:
                await asyncio.sleep((1.0 - self._tokens) / self._rate)
                self._refill()
            self._tokens -= 1.0


def backoff(attempt: int, settings: ReplySettings, retry_after: float | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: capped exponential with "equal jitter" (half fixed,
    half random, so retries of many replies spread out), never sooner than the provider asked."""
    ceiling = min(settings.backoff_cap, settings.backoff_base * 2 ** max(attempt - 1, 0))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - spreading load, not crypto
    return float(max(delay, retry_after or 0.0))


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolved:
    """Where a reply goes: the route chosen and who it is for."""

    route: ReplyRoute
    recipient: Identity
    last_inbound_at: datetime


class Unresolvable(Exception):
    """The reply cannot go anywhere: ends it with ``reason``."""

    def __init__(self, reason: ReplyFailure, detail: str) -> None:
        super().__init__(detail)
        self.reason: ReplyFailure = reason
        self.detail = detail


def resolve(
    context: ReplyContext,
    *,
    requested: str | None,
    senders: Mapping[str, SenderSpec],
    kinds: Mapping[str, frozenset[str]],
) -> Resolved:
    """Choose the route: the desk's channel among the customer's, else the channel the customer
    last wrote on in this thread that has a sender, else their latest such channel anywhere.
    Messages of someone else in the thread (who wrote into it by its tag) are never answered."""
    mine = [r for r in reversed(context.thread_routes) if owned(r, context.customer_identities)]
    if requested is not None:
        if requested not in senders:
            raise Unresolvable("unsupported", f"channel {requested} cannot send replies here")
        in_thread = [r for r in mine if r.channel == requested]
        anywhere = [r for r in context.customer_routes if r.channel == requested]
        candidates = in_thread[:1] + anywhere
        if not candidates:
            raise Unresolvable("recipient_unreachable", f"the customer never wrote on {requested}")
    else:
        candidates = [r for r in mine if r.channel in senders]
        candidates += [r for r in context.customer_routes if r.channel in senders]
        if not candidates:
            raise Unresolvable("recipient_unreachable", "no channel with a sender reaches this customer")
    route = candidates[0]
    wanted = kinds.get(route.channel, frozenset())
    recipient = next((i for i in route.identities if not wanted or i.kind in wanted), None)
    if recipient is None and wanted:
        # A route without identities (a message stored before the ledger): the customer's own.
        recipient = next((i for i in context.customer_identities if i.kind in wanted), None)
    if recipient is None:
        raise Unresolvable("recipient_unreachable", f"no {route.channel} identity of the customer")
    # The window counts from the customer's latest message on this channel and inbox.
    latest = next(
        (r for r in context.customer_routes if (r.channel, r.inbox) == (route.channel, route.inbox)), route
    )
    return Resolved(
        route=route, recipient=recipient, last_inbound_at=max(latest.received_at, route.received_at)
    )


def verified_email(context: ReplyContext) -> Identity | None:
    """The customer's email a fallback may go to: a verified one only (a web-chat visitor signed
    in by the site's HMAC). An email an anonymous visitor typed is a claim anyone can make:
    mailing an agent's answer there would hand the conversation to whoever wrote the address."""
    return next((i for i in context.customer_identities if i.kind == "email" and i.verified), None)


def resolve_fallback(context: ReplyContext, record: ReplyRecord) -> Resolved:
    """Where a mail fallback goes: the email inbox it was scheduled for, the verified email."""
    recipient = verified_email(context)
    if recipient is None:
        raise Unresolvable("recipient_unreachable", "the customer has no verified email")
    route = ReplyRoute(
        message_id=record.fallback_of or record.id,
        thread_id=context.thread_id,
        channel=record.channel or "email",
        inbox=record.inbox or "",
        external_id=None,
        identities=(recipient,),
        extra={},
        received_at=record.created_at,
    )
    return Resolved(route=route, recipient=recipient, last_inbound_at=record.created_at)


class Dispatcher:
    """Claims due replies and sends them; one per instance, while the gateway runs."""

    def __init__(
        self,
        settings: ReplySettings,
        store: Store,
        metrics: Metrics,
        senders: Mapping[str, SenderSpec],
        *,
        kinds: Mapping[str, frozenset[str]] | None = None,
        on_event: Callable[[], None] | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._senders = senders  # filled by channels' setup; read when replies go out
        self._kinds = kinds if kinds is not None else {}
        self._on_event = on_event
        self._now = now or _utcnow
        self._instance = new_id("disp")
        self._wake = asyncio.Event()
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    def wake(self) -> None:
        """A command was stored: look for due replies now rather than at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ticketgate-replies")

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a bound, not a wait
        """Stop claiming; let calls in flight finish within ``timeout`` (the rest are left to their
        leases, and go out again after a restart)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=timeout)
            for each in pending:
                each.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._http is not None:
            await self._http.close()

    async def run_once(self, limit: int | None = None) -> int:
        """Claim what is due and send it; returns how many were claimed (tests, benchmarks)."""
        claimed = await self._claim(limit or self._settings.concurrency)
        await asyncio.gather(*(self._attempt(r) for r in claimed))
        return len(claimed)

    async def _claim(self, limit: int) -> list[ReplyRecord]:
        owner = f"{self._instance}/{new_id('lease')}"
        return await self._store.reply_claim(self._now(), limit, self._settings.lease, owner)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            free = self._settings.concurrency - len(self._inflight)
            claimed: list[ReplyRecord] = []
            if free > 0:
                try:
                    claimed = await self._claim(free)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("replies: cannot claim due replies now")
            for record in claimed:
                task = asyncio.create_task(self._attempt(record), name=f"ticketgate-reply-{record.id}")
                self._inflight.add(task)
                task.add_done_callback(self._finished)
            if len(claimed) == free and free > 0:
                await asyncio.sleep(0)  # more may be due: claim again once these are under way
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.poll_interval):
                    await self._wake.wait()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()  # a slot is free, and the thread's next reply may be due

    # -- one attempt ------------------------------------------------------------------------------

    async def _attempt(self, record: ReplyRecord) -> None:
        assert record.lease_owner is not None
        try:
            await self._send(record)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A fault of ours (the store): the lease runs out and the reply is tried again then.
            logger.exception("replies: attempt %d of %s could not be recorded", record.attempts, record.id)

    async def _send(self, record: ReplyRecord) -> None:
        started = time.monotonic()
        now = self._now()
        if now - record.created_at > timedelta(seconds=self._settings.max_age):
            await self._fail(record, None, None, "expired", "the command is older than replies.max_age")
            return
        context = await self._store.reply_context(record.id)
        if context is None:
            await self._fail(record, None, None, "rejected", f"thread {record.thread_id} is gone")
            return
        try:
            if record.fallback_of is not None:
                resolved = await self._fallback_due(record, context)
                if resolved is None:
                    return
            else:
                resolved = resolve(
                    context, requested=record.requested_channel, senders=self._senders, kinds=self._kinds
                )
        except Unresolvable as exc:
            await self._fail(record, record.requested_channel, None, exc.reason, exc.detail)
            return
        route = resolved.route
        spec = self._senders[route.channel]
        try:
            attachments = await self._attachments(record)
        except SendError as exc:
            await self._after_error(record, route, exc)
            return
        reply = _outbound(record, context, resolved, attachments)
        if spec.window is not None and not _in_window(spec, reply, now, resolved.last_inbound_at):
            detail = (
                f"the customer's last {route.channel} message was at "
                f"{resolved.last_inbound_at.isoformat()}; the window is {spec.window:.0f} s"
            )
            await self._fail(record, route.channel, route.inbox, "window_closed", detail)
            return
        await self._bucket(route.channel, route.inbox, spec).acquire()
        lease = self._settings.lease
        budget = lease - min(_LEASE_MARGIN, lease / 4) - (time.monotonic() - started)
        if budget <= 0:
            # The lease is (nearly) gone waiting for the rate limit: another instance may hold the
            # reply by now; sending anyway could send it twice. Due again at once instead.
            await self._requeue(record, route)
            return
        try:
            async with asyncio.timeout(budget):
                sent = await spec.sender.send(reply)
        except SendError as exc:
            await self._after_error(record, route, exc)
            return
        except TimeoutError:
            await self._after_error(
                record, route, SendError("timeout", f"no answer in {budget:.0f} s", permanent=False)
            )
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("replies: the %s sender raised for %s", route.channel, record.id)
            await self._after_error(
                record, route, SendError("provider_error", f"{type(exc).__name__}: {exc}", permanent=False)
            )
            return
        await self._sent(record, route, sent, context)

    # -- mail fallbacks ---------------------------------------------------------------------------

    def _rule(self, channel: str, inbox: str) -> ReplyFallback | None:
        return next((r for r in self._settings.fallback if r.matches(channel, inbox)), None)

    def _plan(self, record: ReplyRecord, route: ReplyRoute, context: ReplyContext) -> FallbackPlan | None:
        """The mail fallback a reply just sent on ``route`` gets, if a rule asks for one and
        someone can be mailed (else the reason is logged and counted, and nothing is scheduled)."""
        rule = self._rule(route.channel, route.inbox) if record.fallback_of is None else None
        if rule is None:
            return None
        skipped = None
        if "email" not in self._senders:
            skipped = "no_sender"
        elif verified_email(context) is None:
            skipped = "no_verified_email"
        if skipped is not None:
            logger.info("replies: no mail fallback for %s on %s (%s)", record.id, route.channel, skipped)
            self._metrics.reply_fallback(route.channel, skipped)
            return None
        return FallbackPlan(
            reply_id=new_id("rpl"),
            due_at=self._now() + timedelta(seconds=rule.after),
            channel="email",
            inbox=rule.email_inbox or route.inbox,
        )

    async def _fallback_due(self, record: ReplyRecord, context: ReplyContext) -> Resolved | None:
        """A claimed mail fallback: where it goes, or ``None`` when it was dropped (the original
        was delivered meanwhile, nobody to mail, no email sender)."""
        assert record.fallback_of is not None
        assert record.lease_owner is not None
        reason = None
        if await self._store.reply_delivered(record.fallback_of):
            reason = "cancelled"
        elif (record.channel or "email") not in self._senders:
            reason = "no_sender"
        elif verified_email(context) is None:
            reason = "no_verified_email"
        if reason is None:
            return resolve_fallback(context, record)
        if await self._store.reply_fallback_drop(record.id, record.lease_owner):
            logger.info("replies: mail fallback %s of %s dropped (%s)", record.id, record.fallback_of, reason)
            self._metrics.reply_fallback(record.channel or "email", reason)
        return None

    async def _sent(self, record: ReplyRecord, route: ReplyRoute, sent: Sent, context: ReplyContext) -> None:
        assert record.lease_owner is not None
        plan = self._plan(record, route, context)
        recorded = await self._store.reply_finish(
            ReplyOutcome(
                reply_id=record.id,
                lease_owner=record.lease_owner,
                kind="sent",
                channel=route.channel,
                inbox=route.inbox,
                provider_message_id=sent.provider_message_id,
                fallback=plan,
            )
        )
        if recorded:
            if plan is not None:
                self._metrics.reply_fallback(route.channel, "scheduled")
                logger.info(
                    "replies: %s held on %s; mail fallback %s due at %s",
                    record.id, route.channel, plan.reply_id, plan.due_at.isoformat(),
                )  # fmt: skip
            if record.fallback_of is not None:
                self._metrics.reply_fallback(route.channel, "sent")
            seconds = (self._now() - record.created_at).total_seconds()
            self._metrics.reply_sent(route.channel, route.inbox, max(seconds, 0.0))
            logger.info(
                "replies: %s sent on %s/%s (attempt %d)",
                record.id,
                route.channel,
                route.inbox,
                record.attempts,
            )
            self._announce()

    async def _after_error(self, record: ReplyRecord, route: ReplyRoute, exc: SendError) -> None:
        """Retry a transient failure later, or end the reply."""
        assert record.lease_owner is not None
        if exc.permanent:
            await self._fail(record, route.channel, route.inbox, exc.reason, exc.detail, attempted=True)
            return
        now = self._now()
        delay = backoff(record.attempts, self._settings, exc.retry_after)
        retry_at = now + timedelta(seconds=delay)
        too_old = retry_at - record.created_at > timedelta(seconds=self._settings.max_age)
        if record.attempts >= self._settings.max_attempts or too_old:
            detail = f"gave up after {record.attempts} attempts; last: {exc.reason}: {exc.detail}"
            await self._fail(record, route.channel, route.inbox, "expired", detail, attempted=True)
            return
        logger.info(
            "replies: %s attempt %d on %s failed (%s: %s); again in %.1f s",
            record.id, record.attempts, route.channel, exc.reason, exc.detail, delay,
        )  # fmt: skip
        self._metrics.reply_retry(route.channel)
        await self._store.reply_finish(
            ReplyOutcome(
                reply_id=record.id,
                lease_owner=record.lease_owner,
                kind="retry",
                channel=route.channel,
                inbox=route.inbox,
                reason=exc.reason,
                detail=exc.detail,
                retry_at=retry_at,
            )
        )

    async def _requeue(self, record: ReplyRecord, route: ReplyRoute) -> None:
        assert record.lease_owner is not None
        logger.info(
            "replies: %s waited out its lease for the %s rate limit; due again", record.id, route.channel
        )
        await self._store.reply_finish(
            ReplyOutcome(
                reply_id=record.id,
                lease_owner=record.lease_owner,
                kind="retry",
                channel=route.channel,
                inbox=route.inbox,
                reason="rate_limited",
                detail="waited for the inbox's rate limit past the lease",
                retry_at=self._now(),
            )
        )

    async def _fail(
        self,
        record: ReplyRecord,
        channel: str | None,
        inbox: str | None,
        reason: ReplyFailure,
        detail: str,
        *,
        attempted: bool = False,
    ) -> None:
        assert record.lease_owner is not None
        recorded = await self._store.reply_finish(
            ReplyOutcome(
                reply_id=record.id,
                lease_owner=record.lease_owner,
                kind="failed",
                channel=channel,
                inbox=inbox,
                reason=reason,
                detail=detail,
            )
        )
        if recorded:
            self._metrics.reply_failed(channel, reason, attempted=attempted)
            logger.warning("replies: %s failed (%s): %s", record.id, reason, detail)
            self._announce()

    def _announce(self) -> None:
        if self._on_event is not None:
            self._on_event()

    def _bucket(self, channel: str, inbox: str, spec: SenderSpec) -> TokenBucket:
        bucket = self._buckets.get((channel, inbox))
        if bucket is None:
            bucket = self._buckets[(channel, inbox)] = TokenBucket(spec.rate, spec.burst)
        return bucket

    # -- attachments ------------------------------------------------------------------------------

    async def _attachments(self, record: ReplyRecord) -> tuple[OutboundAttachment, ...]:
        """The command's attachments as blobs: a blob reference read for its size, a URL fetched
        (https, up to ``max_attachment_bytes``) and kept. A missing blob or a refused URL ends the
        reply; a URL that does not answer now is retried."""
        found: list[OutboundAttachment] = []
        cap = self._settings.max_attachment_bytes
        for index, given in enumerate(record.command.get("attachments") or ()):
            name = str(given.get("name") or f"attachment-{index + 1}")
            content_type = str(given.get("content_type") or "application/octet-stream")
            digest = given.get("sha256")
            if digest is not None:
                data = await self._store.read_blob(str(digest))
                if data is None:
                    raise SendError("rejected", f"attachments.{index}: no blob {digest}", permanent=True)
            else:
                data = await self._fetch(str(given.get("url")), index, cap)
                digest = await self._store.blob_put(data, content_type)
            if len(data) > cap:
                raise SendError(
                    "too_large", f"attachments.{index}: {len(data)} bytes, cap {cap}", permanent=True
                )
            found.append(
                OutboundAttachment(name=name, content_type=content_type, size=len(data), sha256=digest)
            )
        return tuple(found)

    async def _fetch(self, url: str, index: int, cap: int) -> bytes:
        """The bytes at ``url``: https only, public addresses only (``fetch_allow_networks`` aside),
        each redirect checked as the first URL was."""
        if self._http is None or self._http.closed:
            ca_file = self._settings.fetch_ca_file
            tls = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._settings.fetch_timeout),
                connector=aiohttp.TCPConnector(
                    ssl=tls, resolver=PublicResolver(self._settings.fetch_allow_networks)
                ),
            )
        target = URL(url)
        for _ in range(_MAX_REDIRECTS + 1):
            if target.scheme != "https":
                raise SendError("rejected", f"attachments.{index}: only https URLs", permanent=True)
            try:
                check_url(target, self._settings.fetch_allow_networks)
                data, location = await self._get(target, index, cap)
            except AddressNotPermitted as exc:
                raise SendError("rejected", f"attachments.{index}: {exc}", permanent=True) from exc
            if location is None:
                return data
            target = location
        raise SendError(
            "rejected", f"attachments.{index}: more than {_MAX_REDIRECTS} redirects", permanent=True
        )

    async def _get(self, url: URL, index: int, cap: int) -> tuple[bytes, URL | None]:
        """One GET: the body, or where a redirect points."""
        assert self._http is not None
        try:
            async with self._http.get(url, allow_redirects=False) as response:
                location = response.headers.get("Location")
                if response.status in _REDIRECTS and location:
                    return b"", response.url.join(URL(location))
                if response.status >= 500 or response.status == 429:
                    raise SendError(
                        "provider_error", f"attachments.{index}: HTTP {response.status}", permanent=False
                    )
                if response.status >= 400:
                    raise SendError(
                        "rejected", f"attachments.{index}: HTTP {response.status}", permanent=True
                    )
                if (response.content_length or 0) > cap:
                    raise SendError("too_large", f"attachments.{index}: past {cap} bytes", permanent=True)
                data = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    data += chunk
                    if len(data) > cap:
                        raise SendError("too_large", f"attachments.{index}: past {cap} bytes", permanent=True)
                return bytes(data), None
        except (aiohttp.ClientError, TimeoutError) as exc:
            refused = not_permitted(exc)
            if refused is not None:
                raise refused from exc
            raise SendError("timeout", f"attachments.{index}: {type(exc).__name__}", permanent=False) from exc

    # -- delivery reports -------------------------------------------------------------------------

    async def report(
        self,
        channel: str,
        provider_message_id: str,
        status: DeliveryStatus,
        at: datetime,
        reason: ReplyFailure | None,
        detail: str | None,
    ) -> bool:
        """``ctx.report_delivery`` of every channel (:data:`gateway.channels.Deliveries`)."""
        known = await self._store.reply_report(channel, provider_message_id, status, at, reason, detail)
        if known:
            self._announce()
            # A client has it: its mail fallback is not needed (checked again when due).
            wanted = status in ("delivered", "read") and bool(self._settings.fallback)
            if wanted and await self._store.reply_fallback_cancel(channel, provider_message_id):
                self._metrics.reply_fallback(channel, "cancelled")
        return known


def _in_window(spec: SenderSpec, reply: OutboundReply, now: datetime, last_inbound_at: datetime) -> bool:
    """Inside the sender's window, or a reply its ``outside_window`` lets go anyway."""
    if spec.window is None or now <= last_inbound_at + timedelta(seconds=spec.window):
        return True
    return spec.outside_window is not None and spec.outside_window(reply)


def _outbound(
    record: ReplyRecord, context: ReplyContext, resolved: Resolved, attachments: Sequence[OutboundAttachment]
) -> OutboundReply:
    route = resolved.route
    command: Mapping[str, Any] = record.command
    same_channel = [r for r in context.thread_routes if r.channel == route.channel and r.external_id]
    references = [r.external_id for r in same_channel if r.external_id is not None]
    references += [pid for channel, pid in context.sent if channel == route.channel]
    return OutboundReply(
        reply_id=record.id,
        command_id=record.command_id,
        tenant=record.tenant,
        channel=route.channel,
        inbox=route.inbox,
        thread_id=context.thread_id,
        thread_number=context.number,
        subject=context.subject,
        recipient=resolved.recipient,
        text=command.get("text"),
        html=command.get("html"),
        attachments=tuple(attachments),
        agent_name=command.get("agent_name"),
        answering=dict(route.extra),
        answering_external_id=route.external_id,
        references=tuple(dict.fromkeys(references)),
        last_inbound_at=resolved.last_inbound_at,
        options=dict(command.get("options") or {}),
        attempt=record.attempts,
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)
