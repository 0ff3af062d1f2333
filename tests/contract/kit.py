"""The channel contract suite's kit: what a channel's probe provides, and the gateway it runs against.

A probe (``tests/connectors/<package>/probe.py``, ``PROBES: dict[str, ChannelProbe]``) knows how to
configure its channel, build deliveries and read the provider-facing answer. The gateway is the real
one from the connector down: the channel's context, the pipeline and a SQLite store on a tmp path,
behind a store wrapper that can fail or stall; nothing publishes, so the outbox holds every event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import importlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from core import events
from core.channel import ChannelDescriptor, Connector, normalizer_for
from core.errors import StoreError
from core.model import CanonicalMessage, IngestResult, RawEnvelope
from core.settings import Settings
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.store import build_store
from gateway.store.base import OutboxRow, QuarantineRecord, Store
from normalizers.base import Normalizer
from tests.support.channels import set_up

Client = TestClient[web.Request, web.Application]
TENANT = INBOX = "demo"


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """What the provider sees: ``accepted`` (it stops), ``retry`` (it delivers again later),
    ``refused`` (it gives up), ``error`` (a crash: never right). ``status`` is the HTTP status or
    the SMTP reply code."""

    kind: Literal["accepted", "retry", "refused", "error"]
    status: int
    text: str = ""


class ChannelProbe(Protocol):
    """What the contract suite needs from one channel."""

    # Statuses that mean "not signed / not ours" for this channel (401, 403, 550 ...).
    refusal_statuses: frozenset[int]
    # The channel answers within this under the probe's settings; never above ``descriptor.deadline``.
    answer_within: float

    def tables(self) -> dict[str, Any]:
        """``[channels.*]`` tables (merged into the base config, whose tenant and inbox are ``demo``)."""
        ...

    def valid(self, n: int, text: str | None = None) -> Any:
        """A valid, signed delivery of message ``n`` (provider ids distinct per ``n``) whose text
        is ``text`` (``message {n}`` when not given)."""
        ...

    def forged(self, n: int) -> Any:
        """Message ``n`` unsigned, wrongly signed or not addressed to us; its content is also
        unparseable, so a channel that parsed before verifying would answer a parse error."""
        ...

    def oversized(self) -> Any: ...

    def malformed(self) -> Any:
        """Signed, but its content cannot be parsed."""
        ...

    def serve(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Anything the probe serves beside the gateway (a fake provider API), entered before
        ``tables`` is read."""
        ...

    async def send(self, gateway: Gateway, delivery: Any) -> Answer: ...

    async def settle(self, gateway: Gateway) -> None:
        """Wait until what the last answers started in the background is done."""
        ...


class HttpProbe:
    """The HTTP half of every webhook probe: a delivery is a request, the answer its status."""

    refusal_statuses: frozenset[int] = frozenset({401, 403})
    answer_within: float = 2.0  # probes give the channels an ingest_timeout of 1 s

    def serve(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    async def settle(self, gateway: Gateway) -> None:
        return None

    async def send(self, gateway: Gateway, delivery: Any) -> Answer:
        request = cast(HttpDelivery, delivery)
        async with gateway.client.request(
            request.method, request.path, params=request.query, headers=request.headers, data=request.body
        ) as response:
            return self.answer(response.status, await response.text())

    def answer(self, status: int, text: str) -> Answer:
        if 200 <= status < 300:
            return Answer(kind="accepted", status=status, text=text)
        if status in (429, 503):
            return Answer(kind="retry", status=status, text=text)
        if 400 <= status < 500:
            return Answer(kind="refused", status=status, text=text)
        return Answer(kind="error", status=status, text=text)


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpDelivery:
    path: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    method: str = "POST"


class StoreMode(enum.Enum):
    OK = "ok"
    FAILING = "failing"  # every write raises StoreError
    SLOW = "slow"  # every write waits past the channel's deadline, then fails


class ContractStore:
    """The real store behind a switch; reads pass through, writes obey ``mode``."""

    WRITES = frozenset({
        "accept", "quarantine", "transact", "enqueue", "state_put", "state_cas", "media_enqueue"
    })

    def __init__(self, inner: Store, mode: StoreMode, stall: float) -> None:
        self.inner = inner
        self.mode = mode
        self._stall = stall
        self.release = asyncio.Event()  # set at teardown: a stalled write gives up then

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name not in self.WRITES:
            return method

        async def write(*args: Any, **kwargs: Any) -> Any:
            if self.mode is StoreMode.FAILING:
                raise StoreError("contract suite: the store is down")
            if self.mode is StoreMode.SLOW:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), self._stall)
                raise StoreError("contract suite: the store was too slow")
            return await method(*args, **kwargs)

        return write


@dataclass(slots=True, kw_only=True)
class Gateway:
    """One channel on the real pipeline, with what the suite observes."""

    descriptor: ChannelDescriptor
    settings: Settings
    connector: Connector
    store: Store  # the real store, for reading the outcome
    client: Client
    metrics: Metrics
    ingested: list[RawEnvelope] = field(default_factory=list)  # every envelope handed to ingest
    normalized: list[RawEnvelope] = field(default_factory=list)  # every envelope a normalizer saw

    def refusals(self) -> dict[str, float]:
        """``ticketgate_refusals_total`` of this channel by reason (summed over inboxes), as
        /metrics shows it."""
        counts: dict[str, float] = {}
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "ticketgate_refusals_total" and labels["channel"] == self.descriptor.name:
                    counts[labels["reason"]] = counts.get(labels["reason"], 0.0) + sample.value
        return counts

    def rejected(self) -> float:
        """``ticketgate_messages_total{outcome="rejected"}`` of this channel."""
        value = self.metrics.registry.get_sample_value(
            "ticketgate_messages_total", {"channel": self.descriptor.name, "outcome": "rejected"}
        )
        return value or 0.0

    async def outbox(self, event_type: str = events.MESSAGE_RECEIVED) -> list[OutboxRow]:
        return [row for row in await self.store.outbox_fetch(10_000) if row.type == event_type]

    async def quarantined(self) -> list[QuarantineRecord]:
        return await self.store.quarantine_list()


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def base_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "server": {"normalizer_process": False},
        "store": {"path": str(tmp_path / "gateway.db"), "blob_dir": str(tmp_path / "blobs")},
        "tenants": {TENANT: {}},
        "inboxes": {INBOX: {"tenant": TENANT}},
    }


def probe_module(descriptor: ChannelDescriptor) -> str:
    """``connectors.wechat.kf`` -> ``tests.connectors.wechat.probe``."""
    package = descriptor.connector.__module__.split(".")[1]
    return f"tests.connectors.{package}.probe"


def probe_for(descriptor: ChannelDescriptor) -> ChannelProbe:
    module_name = probe_module(descriptor)
    hint = (
        f"channel {descriptor.name!r} has no contract probe: add PROBES = {{{descriptor.name!r}: ...}} "
        f"(a tests.contract.kit.ChannelProbe) to {module_name.replace('.', '/')}.py"
    )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise LookupError(hint) from None
        raise
    probes: Mapping[str, ChannelProbe] = getattr(module, "PROBES", {})
    if descriptor.name not in probes:
        raise LookupError(hint)
    return probes[descriptor.name]


def _recording(normalize: Normalizer, seen: list[RawEnvelope]) -> Normalizer:
    def recording(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
        seen.append(envelope)
        return normalize(envelope)

    return recording


def recording_descriptor(descriptor: ChannelDescriptor, seen: list[RawEnvelope]) -> ChannelDescriptor:
    """The descriptor with its normalizer (plain and configured) recording every call."""
    configure: Callable[[Settings], Normalizer] = lambda settings: _recording(  # noqa: E731
        normalizer_for(descriptor, settings), seen
    )
    plain = _recording(descriptor.normalizer, seen)
    return dataclasses.replace(descriptor, normalizer=plain, configure=configure)


@contextlib.asynccontextmanager
async def running(
    descriptor: ChannelDescriptor, probe: ChannelProbe, tmp_path: Path, mode: StoreMode = StoreMode.OK
) -> AsyncIterator[Gateway]:
    """The channel set up on the real pipeline and store, served on a local port."""
    async with probe.serve(), _running(descriptor, probe, tmp_path, mode) as gateway:
        yield gateway


@contextlib.asynccontextmanager
async def _running(
    descriptor: ChannelDescriptor, probe: ChannelProbe, tmp_path: Path, mode: StoreMode
) -> AsyncIterator[Gateway]:
    settings = Settings.model_validate(merge(base_config(tmp_path), {"channels": probe.tables()}))
    real = build_store(settings)
    store = ContractStore(real, mode, stall=descriptor.deadline + 1.0)
    metrics = Metrics()
    pipeline = Pipeline(settings, cast(Store, store), metrics)
    connector = descriptor.connector.from_settings(settings)
    assert connector is not None, f"{descriptor.name}: the probe's tables do not configure the channel"
    app = web.Application(client_max_size=settings.server.max_body_bytes)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await real.open()
        yield
        await real.close()

    app.cleanup_ctx.append(store_ctx)
    ingested: list[RawEnvelope] = []
    normalized: list[RawEnvelope] = []

    async def ingest(envelope: RawEnvelope, normalize: Normalizer) -> IngestResult:
        ingested.append(envelope)
        return await pipeline.ingest(envelope, _recording(normalize, normalized))

    set_up(
        app, connector, ingest, settings=settings, store=cast(Store, store), metrics=metrics,
        descriptor=recording_descriptor(descriptor, normalized),
    )
    client: Client = TestClient(TestServer(app))
    gateway = Gateway(
        descriptor=descriptor, settings=settings, connector=connector, store=real, client=client,
        metrics=metrics, ingested=ingested, normalized=normalized,
    )
    await client.start_server()
    try:
        yield gateway
    finally:
        store.release.set()
        await client.close()
