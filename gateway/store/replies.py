"""The reply ledger (both backends): desks' reply commands, their state, and providers' reports.

A command is keyed by ``(tenant, command_id)`` with a fingerprint of its body: the same body again
changes nothing, another body is refused. Replies of one thread carry a position and go out in that
order: a reply is claimed only when no earlier reply of its thread is still pending or sending.
A claim is a lease (``status = 'sending'`` until ``next_attempt_at``), so an instance that dies
mid-send (SIGKILL) leaves its reply due again once the lease runs out, and another instance never
takes it meanwhile (PostgreSQL: ``FOR UPDATE SKIP LOCKED``). Each lease has its own token
(``lease_owner``), so the outcome of an attempt whose lease was lost cannot undo a later attempt;
a success is recorded whoever reports it (the provider took the reply, that is a fact).

Every outcome is written with its event (``reply.sent``, ``reply.failed``, ``reply.delivered``,
``reply.read``) in one transaction, and the outbox relay publishes it like every other event.

Besides the commands the ledger keeps, for each stored customer message, what answering it needs
(``reply_routes``: channel, inbox, identities and the normalizer's ``extra``), written in the same
transaction as the message. Rows name their customer and thread, so erasing a customer finds them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import orjson

from core.channel import DeliveryStatus, ReplyFailure
from core.events import REPLY_DELIVERED, REPLY_FAILED, REPLY_READ, REPLY_SENT, Event, ReplyView, reply_event
from core.model import Identity

T = TypeVar("T")

ReplyStatus = Literal["pending", "sending", "sent", "failed"]
RequestOutcome = Literal["created", "duplicate", "conflict", "unknown_thread"]

_DELIVERY_EVENTS: Mapping[str, str] = {
    "delivered": REPLY_DELIVERED,
    "read": REPLY_READ,
    "failed": REPLY_FAILED,
}
# How many of a customer's latest messages are read to find where they can be reached.
_ROUTES_READ = 500
_DETAIL_MAX = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyRequest:
    """A desk's command as the ledger records it; ``reply_id`` is used when it is new."""

    reply_id: str
    tenant: str
    command_id: str
    thread_id: str
    fingerprint: str
    command: Mapping[str, Any]
    requested_channel: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyRecord:
    """One reply in the ledger."""

    id: str
    tenant: str
    command_id: str
    fingerprint: str
    thread_id: str
    customer_id: str
    position: int
    command: Mapping[str, Any]
    requested_channel: str | None
    channel: str | None
    inbox: str | None
    status: ReplyStatus
    attempts: int
    next_attempt_at: datetime
    lease_owner: str | None
    provider_message_id: str | None
    reason: str | None
    detail: str | None
    created_at: datetime
    updated_at: datetime
    # A mail fallback: the reply (held for a web-chat visitor) this one sends again by email.
    fallback_of: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyRequested:
    """What recording a command did: ``created``; ``duplicate`` (the same body under a known
    command id: nothing changed); ``conflict`` (another body: refused); ``unknown_thread`` (no such
    thread in the command's tenant: refused). ``record`` is the ledger's row when there is one."""

    outcome: RequestOutcome
    record: ReplyRecord | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyRoute:
    """A stored customer message, as answering it needs it."""

    message_id: str
    thread_id: str
    channel: str
    inbox: str
    external_id: str | None
    identities: tuple[Identity, ...]
    extra: Mapping[str, Any]
    received_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyContext:
    """What resolving one reply reads: its thread, the thread's messages (and those of threads
    merged into it) oldest first, the customer's latest message per (channel, inbox) newest first,
    and the replies of the thread that went out before (channel, provider message id), oldest first."""

    thread_id: str
    tenant: str
    number: int
    subject: str | None
    customer_id: str
    thread_routes: tuple[ReplyRoute, ...]
    customer_routes: tuple[ReplyRoute, ...]
    sent: tuple[tuple[str, str], ...]
    # The customer's identities now: whom to answer when a route does not say (a message stored
    # before the ledger had none).
    customer_identities: tuple[Identity, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyOutcome:
    """What one attempt came to. ``lease_owner`` is the claim's token (:attr:`ReplyRecord.lease_owner`)."""

    reply_id: str
    lease_owner: str
    kind: Literal["sent", "failed", "retry"]
    channel: str | None = None
    inbox: str | None = None
    provider_message_id: str | None = None
    reason: ReplyFailure | None = None
    detail: str | None = None
    retry_at: datetime | None = None
    # With a "sent" outcome: the mail fallback to schedule in the same commit.
    fallback: FallbackPlan | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackPlan:
    """A mail fallback of a sent reply: a new reply (``reply_id``), pending until ``due_at``,
    to go by email from ``inbox``; dropped if the original is delivered before."""

    reply_id: str
    due_at: datetime
    channel: str
    inbox: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyBacklog:
    """Replies not finished yet, and when the oldest of them was requested."""

    pending: int
    sending: int
    oldest_requested_at: datetime | None


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class _Connection(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> _Cursor: ...


class _Dialect(Protocol):
    def sql(self, text: str) -> str: ...

    @property
    def ts(self) -> Callable[[datetime], Any]: ...

    @property
    def dt(self) -> Callable[[Any], datetime]: ...

    @property
    def load_json(self) -> Callable[[Any], Any]: ...


_COLUMNS = (
    "id, tenant, command_id, fingerprint, thread_id, customer_id, position, command, requested_channel,"
    " channel, inbox, status, attempts, next_attempt_at, lease_owner, provider_message_id, reason, detail,"
    " created_at, updated_at, fallback_of"
)
_ROUTE_COLUMNS = "message_id, thread_id, channel, inbox, external_id, identities, extra, received_at"
_ROUTE_COLUMNS_R = ", ".join(f"r.{c.strip()}" for c in _ROUTE_COLUMNS.split(","))
ROUTE_INSERT = (
    "INSERT INTO reply_routes (message_id, tenant, thread_id, customer_id, channel, inbox, external_id,"
    " identities, extra, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?{json}, ?{json}, ?)"
    " ON CONFLICT (message_id) DO NOTHING"
)

_BY_ID = f"SELECT {_COLUMNS} FROM replies WHERE id = ?"  # noqa: S608 - column names only
_BY_COMMAND = f"SELECT {_COLUMNS} FROM replies WHERE tenant = ? AND command_id = ?"  # noqa: S608
# A success counts whoever reports it; a failure or a retry only from the lease still held.
_SENT = (
    "UPDATE replies SET status = 'sent', channel = ?, inbox = ?, provider_message_id = ?,"  # noqa: S608
    " reason = NULL, detail = NULL, lease_owner = NULL, updated_at = ?"
    f" WHERE id = ? AND status IN ('pending', 'sending') RETURNING {_COLUMNS}"
)
_FAILED = (
    "UPDATE replies SET status = 'failed', channel = ?, inbox = ?, reason = ?, detail = ?,"  # noqa: S608
    " lease_owner = NULL, updated_at = ?"
    f" WHERE id = ? AND status = 'sending' AND lease_owner = ? RETURNING {_COLUMNS}"
)
_RETRY = (
    "UPDATE replies SET status = 'pending', channel = ?, inbox = ?, reason = ?, detail = ?,"  # noqa: S608
    " next_attempt_at = ?, lease_owner = NULL, updated_at = ?"
    f" WHERE id = ? AND status = 'sending' AND lease_owner = ? RETURNING {_COLUMNS}"
)


def _record(d: _Dialect, row: Sequence[Any]) -> ReplyRecord:
    return ReplyRecord(
        id=row[0],
        tenant=row[1],
        command_id=row[2],
        fingerprint=row[3],
        thread_id=row[4],
        customer_id=row[5],
        position=int(row[6]),
        command=d.load_json(row[7]),
        requested_channel=row[8],
        channel=row[9],
        inbox=row[10],
        status=row[11],
        attempts=int(row[12]),
        next_attempt_at=d.dt(row[13]),
        lease_owner=row[14],
        provider_message_id=row[15],
        reason=row[16],
        detail=row[17],
        created_at=d.dt(row[18]),
        updated_at=d.dt(row[19]),
        fallback_of=row[20],
    )


def _route(d: _Dialect, row: Sequence[Any]) -> ReplyRoute:
    return ReplyRoute(
        message_id=row[0],
        thread_id=row[1],
        channel=row[2],
        inbox=row[3],
        external_id=row[4],
        identities=tuple(
            Identity(kind=k, value=v, verified=bool(verified)) for k, v, verified in d.load_json(row[5])
        ),
        extra=d.load_json(row[6]),
        received_at=d.dt(row[7]),
    )


def _view(record: ReplyRecord, number: int | None) -> ReplyView:
    return ReplyView(
        id=record.id,
        command_id=record.command_id,
        tenant=record.tenant,
        thread_id=record.thread_id,
        thread_number=number,
        customer_id=record.customer_id,
        channel=record.channel,
        inbox=record.inbox,
        attempts=record.attempts,
        requested_at=record.created_at,
        provider_message_id=record.provider_message_id,
        fallback_of=record.fallback_of,
    )


class ReplyLedger(abc.ABC):
    """The ledger's methods of :class:`gateway.store.engine.SqlStore` (:class:`gateway.store.base.Store`)."""

    dialect: ClassVar[_Dialect]
    _clock: Callable[[], datetime]

    @abc.abstractmethod
    async def _write(self, fn: Callable[[Any], T], *, events: bool = False) -> T: ...

    @abc.abstractmethod
    async def _read(self, fn: Callable[[Any], T]) -> T: ...

    @abc.abstractmethod
    def _add_events(self, conn: Any, events: Sequence[Event], now: datetime) -> None:
        """Enqueue ``events`` in the outbox inside the open transaction (not bounded by the backlog:
        they record outcomes that already happened)."""

    # -- helpers inside a transaction -------------------------------------------------------------

    def _reply_row(self, conn: _Connection, sql: str, params: Sequence[Any]) -> ReplyRecord | None:
        row = conn.execute(self.dialect.sql(sql), params).fetchone()
        return _record(self.dialect, row) if row is not None else None

    def _thread_number(self, conn: _Connection, thread_id: str) -> int | None:
        row = conn.execute(
            self.dialect.sql("SELECT number FROM threads WHERE id = ?"), (thread_id,)
        ).fetchone()
        return int(row[0]) if row is not None else None

    # -- commands ---------------------------------------------------------------------------------

    async def reply_request(self, request: ReplyRequest) -> ReplyRequested:
        d = self.dialect
        command_json = orjson.dumps(dict(request.command)).decode()

        def job(conn: _Connection) -> ReplyRequested:
            now = self._clock()
            known = self._reply_row(conn, _BY_COMMAND, (request.tenant, request.command_id))
            if known is not None:
                return _repeat(known, request)
            # The row lock orders concurrent commands of one thread (PostgreSQL); SQLite's one writer does.
            thread = conn.execute(
                d.sql("SELECT tenant, customer_id FROM threads WHERE id = ?{for_update}"),
                (request.thread_id,),
            ).fetchone()
            if thread is None or thread[0] != request.tenant:
                return ReplyRequested(outcome="unknown_thread")
            row = conn.execute(
                d.sql("SELECT coalesce(max(position), 0) FROM replies WHERE thread_id = ?"),
                (request.thread_id,),
            ).fetchone()
            position = int(row[0]) + 1
            inserted = conn.execute(
                d.sql(
                    "INSERT INTO replies (id, tenant, command_id, fingerprint, thread_id, customer_id,"
                    " position, command, requested_channel, status, attempts, next_attempt_at, created_at,"
                    " updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?{json}, ?, 'pending', 0, ?, ?, ?)"
                    " ON CONFLICT (tenant, command_id) DO NOTHING"
                ),
                (
                    request.reply_id, request.tenant, request.command_id, request.fingerprint,
                    request.thread_id, thread[1], position, command_json, request.requested_channel,
                    d.ts(now), d.ts(now), d.ts(now),
                ),
            )  # fmt: skip
            if inserted.rowcount != 1:
                # A concurrent command with this id committed first (PostgreSQL waited for it).
                raced = self._reply_row(conn, _BY_COMMAND, (request.tenant, request.command_id))
                if raced is None:
                    raise RuntimeError(f"reply command {request.command_id!r} vanished")
                return _repeat(raced, request)
            created = self._reply_row(conn, _BY_ID, (request.reply_id,))
            return ReplyRequested(outcome="created", record=created)

        return await self._write(job)

    async def reply_get(self, reply_id: str) -> ReplyRecord | None:
        return await self._read(lambda conn: self._reply_row(conn, _BY_ID, (reply_id,)))

    async def reply_by_command(self, tenant: str, command_id: str) -> ReplyRecord | None:
        return await self._read(lambda conn: self._reply_row(conn, _BY_COMMAND, (tenant, command_id)))

    async def reply_list(self, thread_id: str) -> list[ReplyRecord]:
        d = self.dialect

        def read(conn: _Connection) -> list[ReplyRecord]:
            rows = conn.execute(
                d.sql(f"SELECT {_COLUMNS} FROM replies WHERE thread_id = ? ORDER BY position"),  # noqa: S608
                (thread_id,),
            ).fetchall()
            return [_record(d, r) for r in rows]

        return await self._read(read)

    # -- dispatch ---------------------------------------------------------------------------------

    async def reply_claim(self, now: datetime, limit: int, lease: float, owner: str) -> list[ReplyRecord]:
        """Lease up to ``limit`` due replies until ``now + lease``; ``owner`` must be new for every
        claim (it is the lease's token, see :class:`ReplyOutcome`)."""
        d = self.dialect

        def job(conn: _Connection) -> list[ReplyRecord]:
            # Due (pending, or sending with a lapsed lease) and first of its thread among the
            # unfinished: an earlier reply of the thread still pending holds the later ones back.
            # A waiting mail fallback holds back only later fallbacks (their mails keep the thread's
            # order), never the thread's own replies.
            rows = conn.execute(
                d.sql(
                    "UPDATE replies SET status = 'sending', attempts = attempts + 1, next_attempt_at = ?,"  # noqa: S608
                    " lease_owner = ?, updated_at = ? WHERE id IN ("
                    "SELECT r.id FROM replies r WHERE r.status IN ('pending', 'sending')"
                    " AND r.next_attempt_at <= ?"
                    " AND NOT EXISTS (SELECT 1 FROM replies e WHERE e.thread_id = r.thread_id"
                    " AND e.position < r.position AND e.status IN ('pending', 'sending')"
                    " AND (e.fallback_of IS NULL OR r.fallback_of IS NOT NULL))"
                    " ORDER BY r.next_attempt_at LIMIT ?{skip_locked})"
                    f" RETURNING {_COLUMNS}"
                ),
                (d.ts(now + timedelta(seconds=lease)), owner, d.ts(now), d.ts(now), limit),
            ).fetchall()
            return sorted((_record(d, r) for r in rows), key=lambda r: (r.created_at, r.id))

        return await self._write(job)

    async def reply_context(self, reply_id: str) -> ReplyContext | None:
        d = self.dialect

        def read(conn: _Connection) -> ReplyContext | None:
            row = conn.execute(
                d.sql(
                    "SELECT t.id, t.tenant, t.number, t.subject, t.customer_id FROM replies p"
                    " JOIN threads t ON t.id = p.thread_id WHERE p.id = ?"
                ),
                (reply_id,),
            ).fetchone()
            if row is None:
                return None
            thread_id, customer_id = row[0], row[4]
            thread_rows = conn.execute(
                d.sql(
                    f"SELECT {_ROUTE_COLUMNS} FROM reply_routes WHERE thread_id = ? OR thread_id IN"  # noqa: S608
                    " (SELECT id FROM threads WHERE merged_into = ?) ORDER BY received_at, message_id LIMIT ?"
                ),
                (thread_id, thread_id, _ROUTES_READ),
            ).fetchall()
            # The customer as it is now: threads move to the surviving customer of a merge.
            customer_rows = conn.execute(
                d.sql(
                    f"SELECT {_ROUTE_COLUMNS_R} FROM reply_routes r JOIN threads t ON t.id = r.thread_id"  # noqa: S608
                    " WHERE t.customer_id = ? ORDER BY r.received_at DESC, r.message_id DESC LIMIT ?"
                ),
                (customer_id, _ROUTES_READ),
            ).fetchall()
            identities = tuple(
                Identity(kind=k, value=v, verified=bool(verified))
                for k, v, verified in conn.execute(
                    d.sql(
                        "SELECT kind, value, verified FROM identities WHERE customer_id = ?"
                        " ORDER BY created_at, kind, value"
                    ),
                    (customer_id,),
                ).fetchall()
            )
            latest: dict[tuple[str, str], ReplyRoute] = {}
            for each in customer_rows:
                route = _route(d, each)
                if owned(route, identities):
                    latest.setdefault((route.channel, route.inbox), route)
            sent = conn.execute(
                d.sql(
                    "SELECT channel, provider_message_id FROM replies WHERE thread_id = ? AND status = 'sent'"
                    " AND position < (SELECT position FROM replies WHERE id = ?) ORDER BY position"
                ),
                (thread_id, reply_id),
            ).fetchall()
            return ReplyContext(
                customer_identities=identities,
                thread_id=thread_id,
                tenant=row[1],
                number=int(row[2]),
                subject=row[3],
                customer_id=customer_id,
                thread_routes=tuple(_route(d, r) for r in thread_rows),
                customer_routes=tuple(latest.values()),
                sent=tuple((c, p) for c, p in sent if c is not None and p is not None),
            )

        return await self._read(read)

    async def reply_finish(self, outcome: ReplyOutcome) -> bool:
        """Record one attempt's outcome with its event; ``False`` when it changed nothing (a success
        already recorded, or a failure or retry from a lease that was lost)."""
        d = self.dialect
        detail = outcome.detail[:_DETAIL_MAX] if outcome.detail is not None else None

        def job(conn: _Connection) -> bool:
            now = self._clock()
            if outcome.kind == "sent":
                sql = _SENT
                params: tuple[Any, ...] = (
                    outcome.channel,
                    outcome.inbox,
                    outcome.provider_message_id,
                    d.ts(now),
                    outcome.reply_id,
                )
            elif outcome.kind == "failed":
                sql = _FAILED
                params = (
                    outcome.channel,
                    outcome.inbox,
                    outcome.reason,
                    detail,
                    d.ts(now),
                    outcome.reply_id,
                    outcome.lease_owner,
                )
            else:
                if outcome.retry_at is None:
                    raise ValueError("a retry needs retry_at")
                sql = _RETRY
                params = (
                    outcome.channel,
                    outcome.inbox,
                    outcome.reason,
                    detail,
                    d.ts(outcome.retry_at),
                    d.ts(now),
                    outcome.reply_id,
                    outcome.lease_owner,
                )
            row = conn.execute(d.sql(sql), params).fetchone()
            if row is None:
                return False
            record = _record(d, row)
            if outcome.kind == "sent" and outcome.fallback is not None:
                self._add_fallback(conn, record, outcome.fallback, now)
            if outcome.kind != "retry":
                view = _view(record, self._thread_number(conn, record.thread_id))
                event_type = REPLY_SENT if outcome.kind == "sent" else REPLY_FAILED
                event = reply_event(event_type, view, occurred_at=now, reason=outcome.reason, detail=detail)
                self._add_events(conn, [event], now)
            return True

        return await self._write(job, events=outcome.kind != "retry")

    def _add_fallback(
        self, conn: _Connection, original: ReplyRecord, plan: FallbackPlan, now: datetime
    ) -> None:
        """The fallback row: the original's command under its own reply id and a derived command
        id, after the thread's replies, requested (``created_at``) when it falls due."""
        d = self.dialect
        # The thread's row lock orders this with a command being stored (PostgreSQL).
        conn.execute(d.sql("SELECT id FROM threads WHERE id = ?{for_update}"), (original.thread_id,))
        row = conn.execute(
            d.sql("SELECT coalesce(max(position), 0) FROM replies WHERE thread_id = ?"), (original.thread_id,)
        ).fetchone()
        conn.execute(
            d.sql(
                "INSERT INTO replies (id, tenant, command_id, fingerprint, thread_id, customer_id, position,"
                " command, requested_channel, channel, inbox, status, attempts, next_attempt_at, created_at,"
                " updated_at, fallback_of)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?{json}, ?, ?, ?, 'pending', 0, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, command_id) DO NOTHING"
            ),
            (
                plan.reply_id, original.tenant, f"{original.command_id}#{plan.channel}-fallback",
                original.fingerprint, original.thread_id, original.customer_id, int(row[0]) + 1,
                orjson.dumps(dict(original.command)).decode(), plan.channel, plan.channel, plan.inbox,
                d.ts(plan.due_at), d.ts(plan.due_at), d.ts(now), original.id,
            ),
        )  # fmt: skip

    async def reply_delivered(self, reply_id: str) -> bool:
        d = self.dialect

        def read(conn: _Connection) -> bool:
            row = conn.execute(
                d.sql("SELECT 1 FROM reply_reports WHERE reply_id = ? AND status IN ('delivered', 'read')"),
                (reply_id,),
            ).fetchone()
            return row is not None

        return await self._read(read)

    async def reply_fallback_cancel(self, channel: str, provider_message_id: str) -> int:
        d = self.dialect

        def job(conn: _Connection) -> int:
            return conn.execute(
                d.sql(
                    "DELETE FROM replies WHERE status = 'pending' AND fallback_of IN"
                    " (SELECT id FROM replies WHERE channel = ? AND provider_message_id = ?)"
                ),
                (channel, provider_message_id),
            ).rowcount

        return await self._write(job)

    async def reply_fallback_drop(self, reply_id: str, lease_owner: str) -> bool:
        d = self.dialect

        def job(conn: _Connection) -> bool:
            return (
                conn.execute(
                    d.sql(
                        "DELETE FROM replies WHERE id = ? AND fallback_of IS NOT NULL AND status = 'sending'"
                        " AND lease_owner = ?"
                    ),
                    (reply_id, lease_owner),
                ).rowcount
                == 1
            )

        return await self._write(job)

    async def reply_report(
        self,
        channel: str,
        provider_message_id: str,
        status: DeliveryStatus,
        at: datetime,
        reason: ReplyFailure | None = None,
        detail: str | None = None,
    ) -> bool:
        """A provider's report on a reply that went out: its event, once per (reply, status).
        ``False`` when no reply of ``channel`` has that provider message id."""
        d = self.dialect
        detail = detail[:_DETAIL_MAX] if detail is not None else None

        def job(conn: _Connection) -> bool:
            now = self._clock()
            record = self._reply_row(
                conn,
                f"SELECT {_COLUMNS} FROM replies WHERE channel = ? AND provider_message_id = ?",  # noqa: S608
                (channel, provider_message_id),
            )
            if record is None:
                return False
            first = conn.execute(
                d.sql(
                    "INSERT INTO reply_reports (reply_id, status, at, reason, detail) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (reply_id, status) DO NOTHING"
                ),
                (record.id, status, d.ts(at), reason, detail),
            )
            if first.rowcount == 1:  # a provider repeating its report makes no second event
                view = _view(record, self._thread_number(conn, record.thread_id))
                event = reply_event(
                    _DELIVERY_EVENTS[status], view, occurred_at=now, at=at,
                    reason=(reason or "provider_error") if status == "failed" else None, detail=detail,
                )  # fmt: skip
                self._add_events(conn, [event], now)
            return True

        return await self._write(job, events=True)

    async def reply_backlog(self) -> ReplyBacklog:
        d = self.dialect

        def read(conn: _Connection) -> ReplyBacklog:
            row = conn.execute(
                d.sql(
                    "SELECT coalesce(sum(CASE WHEN status = 'pending' THEN 1 ELSE 0 END), 0),"
                    " coalesce(sum(CASE WHEN status = 'sending' THEN 1 ELSE 0 END), 0), min(created_at)"
                    " FROM replies WHERE status IN ('pending', 'sending')"
                    " AND (fallback_of IS NULL OR created_at <= ?)"
                ),
                (d.ts(self._clock()),),
            ).fetchone()
            oldest = d.dt(row[2]) if row[2] is not None else None
            return ReplyBacklog(pending=int(row[0]), sending=int(row[1]), oldest_requested_at=oldest)

        return await self._read(read)


def owned(route: ReplyRoute, identities: Sequence[Identity]) -> bool:
    """Whether ``route`` is a message of the customer with ``identities`` (or cannot tell: a route
    without identities, a customer whose identities are unknown). Someone else can write into a
    customer's thread (a guessed ``[#TG-n]`` tag, a forwarded mail): a reply must not go to them."""
    if not route.identities or not identities:
        return True
    keys = {(i.kind, i.value) for i in identities}
    return any((i.kind, i.value) in keys for i in route.identities)


def _repeat(known: ReplyRecord, request: ReplyRequest) -> ReplyRequested:
    """A command id seen before: the same body is a repeat, another body a conflict."""
    if known.fingerprint == request.fingerprint and known.thread_id == request.thread_id:
        return ReplyRequested(outcome="duplicate", record=known)
    return ReplyRequested(outcome="conflict", record=known)
