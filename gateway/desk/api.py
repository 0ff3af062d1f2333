"""The desk API: desks and CRMs look at customers, link and unlink them by hand, and read threads.

Routes (documented in docs/identity-api.md), each behind ``Authorization: Bearer <key>``:

- ``GET  /api/v1/customers/{id}``: identities (kind, value, verified), merges, claimed links;
- ``POST /api/v1/customers/{id}/link``: ``{"identities": [{"kind", "value"}]}`` and/or
  ``{"customer_id": other}``; a desk's word counts as verified evidence, so identities owned by
  other customers (and ``customer_id``) merge those customers into this one, recorded and
  reversible, and ``customer.merged`` goes out through the outbox in the same commit;
- ``POST /api/v1/merges/{id}/undo``: reverses a merge; ``customer.unmerged`` goes out;
- ``POST /api/v1/customers/{id}/erase``: erases the customer's personal data (PIPL / GDPR), as
  ``ticketgate customer erase`` does; an optional ``{"actor": "..."}`` names who asked in the audit
  record; ``customer.erased`` goes out through the outbox; erasing again answers 200 again;
- ``GET  /api/v1/threads/{id}``: a thread's status (open / closed, merged into, previous thread),
  e.g. to see that a ``thread.closed`` sent on the control queue was applied;
- ``POST /api/v1/threads/{id}/replies``: a reply command (docs/replies.md), the same fields as
  ``reply.requested`` on the control queue (``thread_id`` and ``tenant`` may be left out); ``202``
  once it is stored, the same answer for a repeat, ``409`` for a ``command_id`` reused with another
  body; ``GET`` lists the thread's replies and their state.

Keys in ``[channels.identity] keys`` may act on every tenant; keys in
``[channels.identity.tenants.<tenant>] keys`` only on that tenant's customers, merges and threads
(anything else is answered 404, as if unknown). The API channel owns the ``/api/v1`` sub-app, so
these routes are mounted as sub-apps on their own longer prefixes, which aiohttp resolves first.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError, InvalidInput, RetryableError, validation_reason
from core.events import Event, isoformat
from core.http import (
    MIN_KEY_LENGTH,
    BearerKeys,
    ClientAddress,
    RateLimiter,
    json_error,
    json_response,
    read_body,
    refuse_credentials,
    retry_after_value,
)
from core.model import Identity, IdentityKind
from core.settings import ChannelSettings, Secret, Settings
from dedupe import graph
from dedupe.identities import normalize
from dedupe.tx import ClaimedLink, MergeRecord, ThreadRecord, Tx, TxWork
from gateway.reply_commands import CommandError, ReplyIntake, parse_command, record_command
from gateway.store.base import Erasure, Store
from gateway.store.replies import ReplyRecord

logger = logging.getLogger(__name__)

CHANNEL = "identity"
PREFIX = "/api/v1"
MAX_IDENTITIES = 20
_MAX_ID_LENGTH = 200
_CHALLENGE = 'Bearer realm="ticketgate-desk"'
_GRAPH_STATUS = {"not_found": 404, "already_undone": 409}
_INPUT_CODES = {400: "invalid_json", 413: "too_large", 415: "unsupported_media_type", 422: "invalid_request"}

T = TypeVar("T")


def _long_enough(value: tuple[Secret, ...]) -> tuple[Secret, ...]:
    if any(len(key.get_secret_value()) < MIN_KEY_LENGTH for key in value):
        raise ValueError(f"every desk API key needs at least {MIN_KEY_LENGTH} characters")
    return value


class IdentityTenantSettings(ChannelSettings):
    """``[channels.identity.tenants.<tenant>]``: keys that act on this tenant only."""

    keys: tuple[Secret, ...] = Field(min_length=1)

    _check_keys = field_validator("keys")(_long_enough)


class IdentityChannelSettings(ChannelSettings):
    """``[channels.identity]``."""

    # Keys for every tenant (a single-tenant gateway, or a CRM that serves all of them).
    keys: tuple[Secret, ...] = ()
    tenants: dict[str, IdentityTenantSettings] = Field(default_factory=dict)
    max_body_bytes: int = Field(64 * 1024, gt=0)
    auth_failures_per_minute: float = Field(10.0, gt=0)
    auth_failures_burst: int = Field(20, ge=1)
    rate_limit_max_clients: int = Field(100_000, ge=1)

    _check_keys = field_validator("keys")(_long_enough)

    @model_validator(mode="after")
    def _some_key(self) -> Self:
        if not self.keys and not self.tenants:
            raise ValueError("give at least one key (keys or tenants.<tenant>.keys); the API fails closed")
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class _Grant:
    """What a key may touch: one tenant, or every tenant (``None``)."""

    tenant: str | None

    def allows(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant


@dataclass(frozen=True, slots=True, kw_only=True)
class _Config:
    channel: IdentityChannelSettings
    keys: BearerKeys[_Grant]
    body_limit: int
    client_ip: ClientAddress


class DeskApi:
    """Mounts the desk API; configuration only, no per-request state."""

    def __init__(self, config: _Config) -> None:
        self._config = config

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        channel = settings.channel(CHANNEL, IdentityChannelSettings)
        if channel is None:
            return None
        grants: list[tuple[str, Sequence[Secret], _Grant]] = [
            ("channels.identity.keys", channel.keys, _Grant(tenant=None))
        ]
        for tenant, scoped in channel.tenants.items():
            where = f"channels.identity.tenants.{tenant}"
            if tenant not in settings.tenants:
                raise ConfigError("names a tenant that is not in [tenants]", file=settings.source, key=where)
            grants.append((f"{where}.keys", scoped.keys, _Grant(tenant=tenant)))
        keys: BearerKeys[_Grant] = BearerKeys(what="a desk API key", source=settings.source)
        for where, secrets, grant in grants:
            for key in secrets:
                keys.add(key, grant, where=where)
        return cls(
            _Config(
                channel=channel,
                keys=keys,
                body_limit=min(channel.max_body_bytes, settings.server.max_body_bytes),
                client_ip=ClientAddress(settings.server.trusted_proxies),
            )
        )

    def setup(self, app: web.Application, store: Store, *, replies: ReplyIntake | None = None) -> None:
        """Mount the routes; the desk API ingests nothing, it works on the store. ``replies``: how
        reply commands are taken (``None``: replies are off and their routes answer 404)."""
        handlers = _Handlers(self._config, store, replies)
        customers = web.Application()
        customers.router.add_get("/{customer_id}", handlers.authorized(handlers.customer))
        customers.router.add_post("/{customer_id}/link", handlers.authorized(handlers.link))
        customers.router.add_post("/{customer_id}/erase", handlers.authorized(handlers.erase))
        merges = web.Application()
        merges.router.add_post("/{merge_id}/undo", handlers.authorized(handlers.undo))
        threads = web.Application()
        threads.router.add_get("/{thread_id}", handlers.authorized(handlers.thread))
        if replies is not None:
            threads.router.add_post("/{thread_id}/replies", handlers.authorized(handlers.reply))
            threads.router.add_get("/{thread_id}/replies", handlers.authorized(handlers.replies))
        app.add_subapp(f"{PREFIX}/customers", customers)
        app.add_subapp(f"{PREFIX}/merges", merges)
        app.add_subapp(f"{PREFIX}/threads", threads)


# -- request bodies -------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class IdentityIn(_Strict):
    kind: IdentityKind
    value: str = Field(min_length=1, max_length=500)


class LinkRequest(_Strict):
    """``POST /api/v1/customers/{id}/link``."""

    identities: list[IdentityIn] = Field(default_factory=list, max_length=MAX_IDENTITIES)
    customer_id: str | None = Field(None, min_length=1, max_length=_MAX_ID_LENGTH)
    # Kept with the merge as evidence (who decided, and why); shown in customer.merged.
    note: str | None = Field(None, max_length=1000)
    actor: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _something(self) -> Self:
        if not self.identities and self.customer_id is None:
            raise ValueError("give identities, customer_id or both")
        return self


class EraseRequest(_Strict):
    """``POST /api/v1/customers/{id}/erase`` (the body is optional)."""

    # Who asked (a desk user, a ticket of the privacy team): kept in the audit record.
    actor: str | None = Field(None, max_length=200)


def parse_erase(body: bytes) -> EraseRequest:
    if not body.strip():
        return EraseRequest()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("the body is not valid JSON") from None
    try:
        return EraseRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(validation_reason(exc.errors()), status=422) from None


def parse_link(body: bytes) -> tuple[LinkRequest, list[Identity]]:
    """The request and its identities (normalised); ``InvalidInput`` 400 / 422 naming the field."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("the body is not valid JSON") from None
    try:
        request = LinkRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(validation_reason(exc.errors()), status=422) from None
    identities: list[Identity] = []
    for index, given in enumerate(request.identities):
        found = normalize(Identity(kind=given.kind.value, value=given.value, verified=True))
        if not found:
            raise InvalidInput(f"identities.{index}: not a valid {given.kind.value}", status=422)
        identities.extend(found)
    return request, identities


# -- answers --------------------------------------------------------------------------------------


def _identity_json(identity: Identity) -> dict[str, Any]:
    return {"kind": identity.kind, "value": identity.value, "verified": identity.verified}


def merge_json(merge: MergeRecord) -> dict[str, Any]:
    return {
        "id": merge.id,
        "surviving_customer": merge.surviving_customer,
        "merged_customers": list(merge.merged_customers),
        "identities": [{"from": origin, **_identity_json(i)} for origin, i in merge.identities],
        "threads": [{"from": origin, "thread_id": thread} for origin, thread in merge.threads],
        "evidence": dict(merge.evidence),
        "created_at": merge.created_at,
        "undone_at": merge.undone_at,
    }


def _link_json(link: ClaimedLink) -> dict[str, Any]:
    return {
        "id": link.id,
        "customer_id": link.customer_id,
        "other_customer_id": link.other_customer_id,
        "identities": [_identity_json(i) for i in link.identities],
        "message_id": link.message_id,
        "created_at": link.created_at,
    }


def summary_json(summary: graph.CustomerSummary) -> dict[str, Any]:
    customer = summary.customer
    return {
        "id": customer.id,
        "tenant": customer.tenant,
        "display_name": customer.display_name,
        "merged_into": customer.merged_into,
        "identities": [_identity_json(i) for i in summary.identities],
        "merges": [merge_json(m) for m in summary.merges],
        "claimed_links": [_link_json(link) for link in summary.claimed_links],
    }


def erasure_json(erasure: Erasure) -> dict[str, object]:
    """An erasure's audit record as the CLI prints it and the desk API answers it."""
    return {
        "id": erasure.id,
        "tenant": erasure.tenant,
        "customer_id": erasure.customer_id,
        "merged_customers": list(erasure.merged_customers),
        "threads": list(erasure.threads),
        "requested_by": erasure.requested_by,
        "requested_at": isoformat(erasure.requested_at),
        "counts": dict(erasure.counts),
        "digest": erasure.digest,
    }


def thread_json(thread: ThreadRecord) -> dict[str, Any]:
    return {
        "id": thread.id,
        "tenant": thread.tenant,
        "inbox": thread.inbox,
        "customer_id": thread.customer_id,
        "number": thread.number,
        "subject": thread.subject,
        "status": "open" if thread.open else "closed",
        "merged_into": thread.merged_into,
        "previous_id": thread.previous_id,
        "last_activity": thread.last_activity,
    }


# -- work run in one store transaction, scoped to what the key may touch --------------------------


def _no_events(value: T) -> tuple[T, Sequence[Event]]:
    return value, ()


def _customer_in_scope(tx: Tx, customer_id: str, grant: _Grant) -> None:
    customer = tx.find_customer(customer_id)
    if customer is None or not grant.allows(customer.tenant):
        raise graph.GraphError("not_found", f"unknown customer {customer_id}")


def customer_work(customer_id: str, grant: _Grant) -> TxWork[graph.CustomerSummary]:
    summarize = graph.customer_summary(customer_id)

    def work(tx: Tx, now: datetime) -> tuple[graph.CustomerSummary, Sequence[Event]]:
        _customer_in_scope(tx, customer_id, grant)
        summary, events = summarize(tx, now)
        if summary is None:
            raise graph.GraphError("not_found", f"unknown customer {customer_id}")
        return summary, events

    return work


def link_work(
    customer_id: str, grant: _Grant, request: LinkRequest, identities: Sequence[Identity]
) -> TxWork[graph.LinkResult]:
    evidence: dict[str, Any] = {
        "identities": [_identity_json(i) for i in identities],
        "customer_id": request.customer_id,
    }
    if request.note is not None:
        evidence["note"] = request.note
    if request.actor is not None:
        evidence["actor"] = request.actor
    linked = graph.link(
        customer_id, identities=identities, other_customer_id=request.customer_id, evidence=evidence
    )

    def work(tx: Tx, now: datetime) -> tuple[graph.LinkResult, Sequence[Event]]:
        _customer_in_scope(tx, customer_id, grant)  # graph.link keeps the other customer in its tenant
        return linked(tx, now)

    return work


def undo_work(merge_id: str, grant: _Grant) -> TxWork[MergeRecord]:
    undo = graph.undo(merge_id)

    def work(tx: Tx, now: datetime) -> tuple[MergeRecord, Sequence[Event]]:
        merge = tx.get_merge(merge_id)
        if merge is None or not grant.allows(merge.tenant):
            raise graph.GraphError("not_found", f"unknown merge {merge_id}")
        record, events = undo(tx, now)
        return (tx.get_merge(merge_id) or record), events

    return work


def thread_work(thread_id: str, grant: _Grant) -> TxWork[ThreadRecord]:
    def work(tx: Tx, now: datetime) -> tuple[ThreadRecord, Sequence[Event]]:
        thread = tx.get_thread(thread_id)
        if thread is None or not grant.allows(thread.tenant):
            raise graph.GraphError("not_found", f"unknown thread {thread_id}")
        return _no_events(thread)

    return work


# -- handlers -------------------------------------------------------------------------------------

Handler = Callable[[web.Request, _Grant], Awaitable[web.Response]]


class _Handlers:
    def __init__(self, config: _Config, store: Store, replies: ReplyIntake | None = None) -> None:
        self._c = config
        self._store = store
        self._replies = replies
        channel = config.channel
        self._failures = RateLimiter(
            per_minute=channel.auth_failures_per_minute,
            burst=channel.auth_failures_burst,
            max_keys=channel.rate_limit_max_clients,
        )

    def _authenticate(self, request: web.Request) -> _Grant | None:
        return self._c.keys.lookup(request)

    def authorized(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Verify the key first; then run ``handler`` and map store and graph errors to answers."""

        async def guarded(request: web.Request) -> web.Response:
            grant = self._authenticate(request)
            if grant is None:
                return self._refuse(request)
            try:
                return await handler(request, grant)
            except InvalidInput as exc:
                code = _INPUT_CODES.get(exc.status, "invalid")
                logger.info("desk api: refused %s %s: %s", request.method, request.path, exc.reason)
                return json_error(exc.status, code, exc.reason)
            except graph.GraphError as exc:
                return json_error(_GRAPH_STATUS.get(exc.code, 409), exc.code, exc.reason)
            except RetryableError as exc:
                logger.warning("desk api: store unavailable for %s %s: %s", request.method, request.path, exc)
                return json_error(
                    503,
                    "unavailable",
                    "the store cannot take this request now; retry later",
                    headers={"Retry-After": retry_after_value(exc.retry_after)},
                )

        return guarded

    def _refuse(self, request: web.Request) -> web.Response:
        remote = self._c.client_ip(request)
        present = "Authorization" in request.headers
        logger.warning("desk api: %s key from %s", "wrong" if present else "missing", remote)
        return refuse_credentials(
            self._failures, remote, present=present, challenge=_CHALLENGE, required="a valid desk API key"
        )

    @staticmethod
    def _id(request: web.Request, name: str, what: str) -> str:
        value = request.match_info[name]
        if not 0 < len(value) <= _MAX_ID_LENGTH:
            raise graph.GraphError("not_found", f"unknown {what} {value[:_MAX_ID_LENGTH]}")
        return value

    async def _json_body(self, request: web.Request) -> bytes:
        if request.content_type != "application/json":
            raise InvalidInput("the body must be application/json", status=415)
        return await read_body(request, self._c.body_limit)

    async def customer(self, request: web.Request, grant: _Grant) -> web.Response:
        customer_id = self._id(request, "customer_id", "customer")
        summary = await self._store.transact(customer_work(customer_id, grant))
        return json_response(summary_json(summary))

    async def link(self, request: web.Request, grant: _Grant) -> web.Response:
        customer_id = self._id(request, "customer_id", "customer")
        body = await self._json_body(request)
        parsed, identities = parse_link(body)
        result = await self._store.transact(link_work(customer_id, grant, parsed, identities))
        merge = result.merge
        logger.info(
            "desk api: linked %d identities to customer %s%s",
            len(identities),
            result.customer_id,
            f" (merge {merge.id} of {', '.join(merge.merged_customers)})" if merge else "",
        )
        answer: Mapping[str, Any] = {
            "customer_id": result.customer_id,
            "merge_id": merge.id if merge else None,
            "merged_customers": list(merge.merged_customers) if merge else [],
            "added": [_identity_json(i) for i in result.added],
        }
        return json_response(answer)

    async def erase(self, request: web.Request, grant: _Grant) -> web.Response:
        customer_id = self._id(request, "customer_id", "customer")
        body = await read_body(request, self._c.body_limit)
        if body.strip() and request.content_type != "application/json":
            raise InvalidInput("the body must be application/json", status=415)
        parsed = parse_erase(body)
        scope = f" tenant={grant.tenant}" if grant.tenant is not None else ""
        by = f"desk-api{scope}" + (f" actor={parsed.actor}" if parsed.actor else "")
        erasure = await self._store.erase_customer(customer_id, requested_by=by, tenant=grant.tenant)
        if erasure is None:
            raise graph.GraphError("not_found", f"unknown customer {customer_id}")
        logger.info("desk api: customer %s erased (%s, %s)", erasure.customer_id, erasure.id, by)
        return json_response(erasure_json(erasure))

    async def undo(self, request: web.Request, grant: _Grant) -> web.Response:
        merge_id = self._id(request, "merge_id", "merge")
        record = await self._store.transact(undo_work(merge_id, grant))
        logger.info("desk api: merge %s undone", record.id)
        return json_response(merge_json(record))

    async def thread(self, request: web.Request, grant: _Grant) -> web.Response:
        thread_id = self._id(request, "thread_id", "thread")
        thread = await self._store.transact(thread_work(thread_id, grant))
        return json_response(thread_json(thread))

    async def reply(self, request: web.Request, grant: _Grant) -> web.Response:
        """``POST /api/v1/threads/{id}/replies``: store a reply command; 202 once committed."""
        assert self._replies is not None
        thread_id = self._id(request, "thread_id", "thread")
        body = await self._json_body(request)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidInput("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise InvalidInput("the body must be a JSON object", status=422)
        if data.setdefault("thread_id", thread_id) != thread_id:
            raise InvalidInput("thread_id: differs from the thread in the path", status=422)
        if "tenant" not in data:
            # A key of one tenant speaks for it; a key of every tenant takes the thread's.
            thread = await self._store.transact(thread_work(thread_id, grant))
            data["tenant"] = grant.tenant or thread.tenant
        if not isinstance(data["tenant"], str) or not grant.allows(data["tenant"]):
            raise graph.GraphError("not_found", f"unknown thread {thread_id}")
        settings = self._replies.settings
        try:
            command = parse_command(
                data,
                max_attachments=settings.max_attachments,
                max_attachment_bytes=settings.max_attachment_bytes,
            )
        except CommandError as exc:
            raise InvalidInput(exc.reason, status=exc.status) from None
        async with self._replies.order.hold(command.thread_id):
            result = await record_command(self._store, command, wake=self._replies.wake)
        if result.outcome == "unknown_thread":
            raise graph.GraphError("not_found", f"unknown thread {thread_id}")
        assert result.record is not None
        if result.outcome == "conflict":
            return json_error(
                409, "conflict", f"command_id {command.command_id} was used for another reply body"
            )
        logger.info(
            "desk api: reply %s for thread %s %s",
            result.record.id,
            thread_id,
            "stored" if result.outcome == "created" else "repeated",
        )
        return json_response(reply_json(result.record), status=202)

    async def replies(self, request: web.Request, grant: _Grant) -> web.Response:
        """``GET /api/v1/threads/{id}/replies``: the thread's replies in order, with their state."""
        thread_id = self._id(request, "thread_id", "thread")
        await self._store.transact(thread_work(thread_id, grant))  # 404 outside the key's tenant
        records = await self._store.reply_list(thread_id)
        return json_response({"thread_id": thread_id, "replies": [reply_json(r) for r in records]})


def reply_json(record: ReplyRecord) -> dict[str, Any]:
    """A reply as the desk API shows it."""
    return {
        "reply_id": record.id,
        "command_id": record.command_id,
        "thread_id": record.thread_id,
        "tenant": record.tenant,
        "status": record.status,
        "attempts": record.attempts,
        "channel": record.channel,
        "inbox": record.inbox,
        "provider_message_id": record.provider_message_id,
        "reason": record.reason,
        "detail": record.detail,
        "requested_at": record.created_at,
        "updated_at": record.updated_at,
        # A mail fallback names the held web-chat reply it sends again (docs/replies.md).
        "fallback_of": record.fallback_of,
    }
