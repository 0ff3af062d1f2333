"""The daemon's side of the channel seam: the registry of channel descriptors and the context each
channel's ``setup`` receives (see ``core/channel.py`` for what a channel may use).

Channels are found through the ``ticketgate.channels`` entry-point group, so a third party ships a
channel as its own package; a channel's module (and its SDK) is imported only when the channel is
configured, or when a quarantined message of that channel is replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Any, TypeVar, cast

import aiohttp
from aiohttp import web

from core.channel import (
    ENTRY_POINT_GROUP,
    ChannelDescriptor,
    ChannelEndpoint,
    Connector,
    DeliveryStatus,
    DescribesEndpoints,
    HttpClient,
    Lifecycle,
    LinkOutcome,
    Normalizer,
    Refusal,
    ReplyFailure,
    SenderSpec,
    normalizer_for,
)
from core.errors import ConfigError
from core.events import Event
from core.media import MediaFetch
from core.model import Identity, IngestResult, RawEnvelope
from core.settings import Settings
from dedupe.graph import GraphError, link
from dedupe.tx import Tx
from gateway.metrics import Metrics
from gateway.offload import NormalizeWorker
from gateway.store.base import Store

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

Ingest = Callable[[RawEnvelope, Normalizer], Awaitable[IngestResult]]
"""The pipeline's ingest (or a test's stand-in)."""

Deliveries = Callable[[str, str, DeliveryStatus, datetime, ReplyFailure | None, str | None], Awaitable[bool]]
"""(channel, provider message id, status, at, reason, detail) -> whether a reply of ours had that id."""

# Tables under [channels] that are not channels: the desk API is the daemon's own; [channels.meta]
# holds the Meta apps that WhatsApp, Messenger and Instagram share.
NOT_CHANNELS = frozenset({"identity", "meta"})

# What channels share (``ctx.shared``), one mapping per gateway app, so every context set up on the
# same app meets the same objects.
SHARED = web.AppKey("channel_shared", dict[str, Any])


class Registry:
    """Channel descriptors by name, loaded from their entry points on first use."""

    def __init__(self, targets: Mapping[str, Callable[[], ChannelDescriptor]]) -> None:
        self._targets = dict(targets)
        self._loaded: dict[str, ChannelDescriptor] = {}

    @classmethod
    def installed(cls) -> Registry:
        """Every channel installed in this environment (ours and third parties')."""
        return cls({ep.name: ep.load for ep in entry_points(group=ENTRY_POINT_GROUP)})

    @classmethod
    def of(cls, *descriptors: ChannelDescriptor) -> Registry:
        """A registry of the given descriptors only (tests, embedding)."""
        return cls({d.name: functools.partial(_same, d) for d in descriptors})

    def names(self) -> list[str]:
        return sorted(self._targets)

    def get(self, name: str) -> ChannelDescriptor:
        """The descriptor of ``name``; ``KeyError`` for a channel that is not installed."""
        descriptor = self._loaded.get(name)
        if descriptor is None:
            loaded = self._targets[name]()
            if not isinstance(loaded, ChannelDescriptor) or loaded.name != name:
                raise TypeError(f"entry point {ENTRY_POINT_GROUP}:{name} is not the descriptor of {name!r}")
            descriptor = self._loaded[name] = loaded
        return descriptor

    def normalizer(self, channel: str, settings: Settings) -> Normalizer:
        """The normalizer live ingest uses for ``channel`` (quarantine replay takes the same one)."""
        return normalizer_for(self.get(channel), settings)

    def configured(self, settings: Settings) -> list[tuple[ChannelDescriptor, Connector]]:
        """Build the connector of every enabled ``[channels.*]`` table; ``ConfigError`` for an
        unknown channel or a misconfigured one (fail closed, before anything listens)."""
        built: list[tuple[ChannelDescriptor, Connector]] = []
        for name, raw in settings.channels.items():
            if name in NOT_CHANNELS or raw.get("enabled", True) is False:
                continue
            if name not in self._targets:
                close = difflib.get_close_matches(name, self._targets, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"unknown channel (installed: {', '.join(self.names())}){hint}",
                    file=settings.source,
                    key=f"channels.{name}",
                )
            descriptor = self.get(name)
            connector = descriptor.connector.from_settings(settings)
            if connector is not None:
                built.append((descriptor, connector))
        return built


def _same(descriptor: ChannelDescriptor) -> ChannelDescriptor:
    return descriptor


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class _StoreAccess:
    """Holds the store a context reaches; a test context without one fails loudly when used."""

    def __init__(self, store: Store | None) -> None:
        self._store = store

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("this channel context has no store")
        return self._store


class _State(_StoreAccess):
    def __init__(self, store: Store | None, prefix: str) -> None:
        super().__init__(store)
        self._prefix = prefix

    async def get(self, key: str) -> bytes | None:
        return await self.store.state_get(self._prefix + key)

    async def put(self, key: str, value: bytes) -> None:
        await self.store.state_put(self._prefix + key, value)

    async def compare_and_set(self, key: str, expected: bytes | None, value: bytes) -> bool:
        return await self.store.state_cas(self._prefix + key, expected, value)


class _Media(_StoreAccess):
    def __init__(self, store: Store | None, channel: str) -> None:
        super().__init__(store)
        self._channel = channel

    async def enqueue(self, fetches: Sequence[MediaFetch]) -> None:
        foreign = [f.key for f in fetches if f.channel != self._channel]
        if foreign:
            raise ValueError(f"{self._channel}: media of another channel: {foreign[0]}")
        await self.store.media_enqueue(fetches)

    async def claim(self, now: datetime, limit: int, lease: float) -> list[MediaFetch]:
        return await self.store.media_claim(now, limit, lease, channel=self._channel)

    async def done(self, key: str, data: bytes, *, content_type: str, name: str | None) -> str:
        return await self.store.media_done(key, data, content_type=content_type, name=name)

    async def failed(self, key: str, error: str, *, retry_at: datetime | None) -> None:
        await self.store.media_failed(key, error, retry_at=retry_at)

    async def get(self, key: str) -> MediaFetch | None:
        return await self.store.media_get(key)


class _Blobs(_StoreAccess):
    async def read(self, sha256: str) -> bytes | None:
        return await self.store.read_blob(sha256)


class _IdentityLinks(_StoreAccess):
    async def link_verified(
        self, *, tenant: str, owner: Identity, identity: Identity, evidence: dict[str, Any]
    ) -> LinkOutcome | None:
        verified = Identity(kind=identity.kind, value=identity.value, verified=True)

        def work(tx: Tx, now: datetime) -> tuple[LinkOutcome | None, Sequence[Event]]:
            owners = tx.find_identities(tenant, [owner])
            if not owners:
                return None, ()
            try:
                linking = link(owners[0].customer_id, identities=[verified], evidence=evidence)
                result, events = linking(tx, now)
            except GraphError:
                return None, ()
            merged = tuple(result.merge.merged_customers) if result.merge is not None else ()
            return LinkOutcome(customer_id=result.customer_id, merged_customers=merged), events

        return await self.store.transact(work)


class _Metrics:
    def __init__(self, metrics: Metrics, channel: str) -> None:
        self._metrics = metrics
        self._channel = channel

    def event(self, event: str, *, inbox: str = "") -> None:
        self._metrics.channel_event(self._channel, inbox, event)

    def refused(self, reason: Refusal, *, inbox: str = "") -> None:
        self._metrics.refused(self._channel, inbox, reason)


class _Http:
    """One provider client; its session is made inside the running loop on first use."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    def url(self, path: str) -> str:
        return f"{self._base_url}/{path.lstrip('/')}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class GatewayContext:
    """The :class:`core.channel.ChannelContext` the daemon hands a channel's ``setup``."""

    def __init__(
        self,
        app: web.Application,
        descriptor: ChannelDescriptor,
        *,
        settings: Settings,
        ingest: Ingest,
        store: Store | None,
        metrics: Metrics,
        clock: SystemClock | None = None,
        senders: dict[str, SenderSpec] | None = None,
        deliveries: Deliveries | None = None,
        offload: NormalizeWorker | None = None,
    ) -> None:
        self._app = app
        self._offload = offload
        if SHARED not in app:
            app[SHARED] = {}
        self._shared: dict[str, Any] = app[SHARED]
        self._senders = senders if senders is not None else {}
        self._deliveries = deliveries
        self._descriptor = descriptor
        self._settings = settings
        self._ingest = ingest
        self._clock = clock or SystemClock()
        self._normalize = normalizer_for(descriptor, settings)
        name = descriptor.name
        self._state = _State(store, prefix=f"{name}/")
        self._media = _Media(store, name)
        self._blobs = _Blobs(store)
        self._identities = _IdentityLinks(store)
        self._metrics = _Metrics(metrics, name)
        self._clients: list[_Http] = []

    @property
    def channel(self) -> str:
        return self._descriptor.name

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def clock(self) -> SystemClock:
        return self._clock

    @property
    def state(self) -> _State:
        return self._state

    @property
    def media(self) -> _Media:
        return self._media

    @property
    def blobs(self) -> _Blobs:
        return self._blobs

    @property
    def identities(self) -> _IdentityLinks:
        return self._identities

    @property
    def metrics(self) -> _Metrics:
        return self._metrics

    async def ingest(self, envelope: RawEnvelope, normalize: Normalizer | None = None) -> IngestResult:
        if envelope.channel != self.channel:
            raise ValueError(f"{self.channel}: envelope of channel {envelope.channel!r}")
        return await self._ingest(envelope, normalize or self._normalize)

    async def compute(self, fn: Callable[..., _T], /, *args: Any) -> _T:
        if self._offload is not None:
            done, value = await self._offload.call(fn, *args)
            if done:
                return cast(_T, value)
        return fn(*args)

    def add_app(self, prefix: str, app: web.Application) -> None:
        self._app.add_subapp(prefix, app)

    def add_lifecycle(self, lifecycle: Lifecycle) -> None:
        async def entry(app: web.Application) -> AsyncIterator[None]:
            async with lifecycle():
                yield

        self._app.cleanup_ctx.append(entry)

    def spawn(self, name: str, run: Callable[[], Awaitable[None]], *, restart_after: float = 1.0) -> None:
        task_name = f"ticketgate-{self.channel}-{name}"

        @contextlib.asynccontextmanager
        async def supervised() -> AsyncIterator[None]:
            task = asyncio.create_task(_supervise(task_name, run, restart_after), name=task_name)
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        self.add_lifecycle(supervised)

    def http(self, base_url: str, *, timeout: float = 15.0) -> HttpClient:
        client = _Http(base_url, timeout)
        if not self._clients:

            @contextlib.asynccontextmanager
            async def sessions() -> AsyncIterator[None]:
                try:
                    yield
                finally:
                    for each in self._clients:
                        await each.close()

            self.add_lifecycle(sessions)
        self._clients.append(client)
        return client

    def add_sender(self, spec: SenderSpec) -> None:
        if self.channel in self._senders:
            raise RuntimeError(f"{self.channel}: a sender is already registered")
        self._senders[self.channel] = spec

    def shared(self, key: str, build: Callable[[], _T]) -> _T:
        if key not in self._shared:
            self._shared[key] = build()
        return cast(_T, self._shared[key])

    async def report_delivery(
        self,
        provider_message_id: str,
        status: DeliveryStatus,
        *,
        at: datetime | None = None,
        reason: ReplyFailure | None = None,
        detail: str | None = None,
    ) -> bool:
        if self._deliveries is None:
            logger.debug("%s: no reply ledger for %s (%s)", self.channel, provider_message_id, status)
            return False
        when = at or self._clock.now()
        return await self._deliveries(self.channel, provider_message_id, status, when, reason, detail)


async def _supervise(name: str, run: Callable[[], Awaitable[None]], restart_after: float) -> None:
    """Run ``run`` until cancelled; when it raises or returns, log it and start it again after a
    pause that doubles (up to a minute) while it keeps failing fast."""
    pause = restart_after
    while True:
        started = time.monotonic()
        try:
            await run()
            logger.warning("%s returned; starting it again in %.1f s", name, pause)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s failed; starting it again in %.1f s", name, pause)
        if time.monotonic() - started > 60.0:
            pause = restart_after  # it ran for a while: a fresh failure, not a crash loop
        await asyncio.sleep(pause)
        pause = min(pause * 2, 60.0)


@dataclass(frozen=True, slots=True)
class EnabledChannel:
    """A channel that was set up, with the endpoints its connector describes (``None``: it does not)
    and how long its provider waits for an answer (``ChannelDescriptor.deadline``)."""

    name: str
    endpoints: Sequence[ChannelEndpoint] | None
    deadline: float = 10.0


def setup_channels(
    app: web.Application,
    settings: Settings,
    *,
    ingest: Ingest,
    store: Store | None,
    metrics: Metrics,
    registry: Registry | None = None,
    base_url: str = "",
    senders: dict[str, SenderSpec] | None = None,
    kinds: dict[str, frozenset[str]] | None = None,
    deliveries: Deliveries | None = None,
    offload: NormalizeWorker | None = None,
) -> list[EnabledChannel]:
    """Build and set up every configured channel; returns them with the endpoints their connectors
    describe under ``base_url`` (where the HTTP server is reached).

    ``senders`` receives the :class:`SenderSpec` each channel registers (by channel name) and
    ``kinds`` each channel's identity kinds; ``deliveries`` takes the channels' delivery reports
    (the reply dispatcher's); ``offload`` computes what a channel hands ``ctx.compute``."""
    registry = registry or Registry.installed()
    enabled: list[EnabledChannel] = []
    for descriptor, connector in registry.configured(settings):
        if kinds is not None:
            kinds[descriptor.name] = descriptor.identity_kinds
        ctx = GatewayContext(
            app,
            descriptor,
            settings=settings,
            ingest=ingest,
            store=store,
            metrics=metrics,
            senders=senders,
            deliveries=deliveries,
            offload=offload,
        )
        connector.setup(ctx)
        metrics.declare_channel(descriptor.name)
        described = None
        if isinstance(connector, DescribesEndpoints):
            described = connector.describe_endpoints(base_url)
            for endpoint in described:
                metrics.recent.declare(descriptor.name, endpoint.inbox)
        enabled.append(EnabledChannel(descriptor.name, described, descriptor.deadline))
    return enabled
