"""The channel seam: everything a channel may use, and how a channel declares itself.

A channel is a package under ``connectors/`` that exports one :class:`ChannelDescriptor` (name,
settings model, connector, normalizer, identity kinds) through the
``ticketgate.channels`` entry-point group. The daemon builds the connector from the settings and
calls ``connector.setup(ctx)`` with a :class:`ChannelContext`: the only door to the rest of the
gateway. A channel never imports the store, dedupe or the daemon's wiring (import-linter enforces
it), so every channel is written, read and tested against this one file.

Rules a connector keeps (the channel contract suite checks them for every registered channel):
verify before parsing; hand a :class:`~core.model.RawEnvelope` to ``ctx.ingest``; answer success
only when ``result.stored``; answer the provider's "retry" when the result is retryable; never 500
on what a request carried.

The way back (replies): a channel that can answer registers a :class:`SenderSpec` with
``ctx.add_sender`` in ``setup``. The gateway stores every reply command, orders the replies of a
thread, enforces the reply window and the rate, retries with backoff and publishes the outcome; a
sender only turns one :class:`OutboundReply` into one provider call and says how it went (a
:class:`Sent`, or a :class:`SendError` with a reason code).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar, runtime_checkable

from core.media import MediaFetch
from core.model import CanonicalMessage, Identity, IngestResult, RawEnvelope
from core.settings import Settings

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web
    from pydantic import BaseModel

Normalizer = Callable[[RawEnvelope], Sequence[CanonicalMessage]]
"""raw envelope -> canonical messages; pure (see ``normalizers.base``)."""

ENTRY_POINT_GROUP = "ticketgate.channels"

_T = TypeVar("_T")


class Clock(Protocol):
    """The gateway's clock; tests inject a fixed one."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    def time(self) -> float:
        """Seconds since the epoch (provider timestamps, replay windows)."""
        ...

    def monotonic(self) -> float:
        """For intervals and backoff; never compared across processes."""
        ...


class ChannelState(Protocol):
    """Small durable values of one channel (cursors, watermarks, tokens), shared by every instance
    on the same store. Keys are the channel's own; the context namespaces them by channel name."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> None:
        """Returns once the value is committed."""
        ...

    async def compare_and_set(self, key: str, expected: bytes | None, value: bytes) -> bool:
        """Set ``value`` only if the current value is ``expected`` (``None``: absent); whether it was
        set. Two instances advancing one cursor: exactly one wins, the other re-reads."""
        ...


class MediaQueue(Protocol):
    """The durable queue of provider-held media this channel fetches after the commit.

    ``enqueue`` is insert-if-absent by key (a provider's retry adds nothing); ``claim`` leases due
    fetches of this channel (a fetcher that dies leaves them due again after the lease); the gateway
    serves fetched media to desks at ``/media/{key}``.
    """

    async def enqueue(self, fetches: Sequence[MediaFetch]) -> None: ...

    async def claim(self, now: datetime, limit: int, lease: float) -> list[MediaFetch]: ...

    async def done(self, key: str, data: bytes, *, content_type: str, name: str | None) -> str:
        """Keep ``data`` as a blob and mark the fetch done; returns the sha256."""
        ...

    async def failed(self, key: str, error: str, *, retry_at: datetime | None) -> None:
        """Pending again at ``retry_at``, or failed for good when it is ``None``."""
        ...

    async def get(self, key: str) -> MediaFetch | None: ...


class Blobs(Protocol):
    """Read access to the content-addressed blob store (raw bodies, attachments, fetched media)."""

    async def read(self, sha256: str) -> bytes | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkOutcome:
    """What linking a verified identity did: the customer that owns it now, and who merged into it."""

    customer_id: str
    merged_customers: tuple[str, ...] = ()


class IdentityLinks(Protocol):
    """Verified evidence a provider API gives after the message (a WeChat unionid, a directory email)."""

    async def link_verified(
        self, *, tenant: str, owner: Identity, identity: Identity, evidence: dict[str, Any]
    ) -> LinkOutcome | None:
        """Link ``identity`` (verified) to the customer owning ``owner``, in one transaction; a
        customer already owning ``identity`` is merged (recorded, reversible, ``customer.merged``).
        ``None`` when no customer owns ``owner`` (yet)."""
        ...


Refusal = Literal["signature", "auth", "size", "rate_limit", "malformed"]
"""Why a channel refused a delivery before the pipeline: a signature that does not verify (or a
stale one); a missing or wrong key, token, origin or recipient; a body past its bound; a rate limit;
content the channel cannot read."""


class ChannelMetrics(Protocol):
    """Channel-specific counts."""

    def event(self, event: str, *, inbox: str = "") -> None:
        """Count one occurrence (``media_failed``, ``update_ignored`` ...), exported as
        ``ticketgate_channel_events_total{channel,inbox,event}``."""
        ...

    def refused(self, reason: Refusal, *, inbox: str = "") -> None:
        """Count one delivery the channel refused itself (before the pipeline): an outcome
        ``rejected`` in ``ticketgate_messages_total``, and ``ticketgate_refusals_total{reason}``.
        ``inbox`` only when it is a configured one, never a name a request made up."""
        ...


class HttpClient(Protocol):
    """A client for one provider API. ``base_url`` comes from the channel's settings so that tests
    point it at a local server; the session exists while the gateway runs (from start to shutdown)."""

    @property
    def base_url(self) -> str: ...

    @property
    def session(self) -> aiohttp.ClientSession: ...

    def url(self, path: str) -> str:
        """``base_url`` joined with ``path`` (a leading ``/`` is not required)."""
        ...


ReplyFailure = Literal[
    "window_closed",
    "recipient_unreachable",
    "blocked",
    "rejected",
    "auth",
    "rate_limited",
    "too_large",
    "unsupported",
    "provider_error",
    "timeout",
    "expired",
]
"""Why a reply did not go out (``reply.failed`` ``reason``): outside the provider's reply window;
the recipient is unknown or unreachable; the customer blocked or unfollowed; the provider refused the
content; our credentials were refused; the provider's rate limit; an attachment past the provider's
cap; something the channel cannot send; any other provider error; no answer in time; the command
outlived its retries."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundAttachment:
    """A reply's attachment, already in the blob store (``ctx.blobs.read(sha256)``)."""

    name: str
    content_type: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundReply:
    """One reply to send: the desk's command resolved against the thread.

    ``reply_id`` is ours and stays the same over every attempt; a sender passes it to the provider
    as the idempotency key where the provider has one (微信客服 ``msgid``, a mail's ``Message-ID``).
    ``answering`` is the ``extra`` of the customer's latest message on this channel and inbox (what
    the channel's normalizer kept for the way back: a chat id, an open_kfid, a Slack thread),
    ``answering_external_id`` its provider id, and ``references`` the provider ids of the thread's
    messages on this channel, oldest first (mail threading)."""

    reply_id: str
    command_id: str
    tenant: str
    channel: str
    inbox: str
    thread_id: str
    thread_number: int
    subject: str | None
    recipient: Identity
    text: str | None
    html: str | None = None
    attachments: tuple[OutboundAttachment, ...] = ()
    agent_name: str | None = None
    answering: Mapping[str, Any] = field(default_factory=dict)
    answering_external_id: str | None = None
    references: tuple[str, ...] = ()
    last_inbound_at: datetime | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    attempt: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Sent:
    """The provider accepted the reply (``reply.sent``)."""

    provider_message_id: str
    detail: Mapping[str, Any] = field(default_factory=dict)


class SendError(Exception):
    """The provider did not take the reply. ``permanent`` ends it (``reply.failed``); otherwise the
    gateway retries with backoff, after ``retry_after`` seconds at the earliest when the provider
    said so. ``detail`` is the provider's own words (its error code and message)."""

    def __init__(
        self, reason: ReplyFailure, detail: str, *, permanent: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: ReplyFailure = reason
        self.detail = detail
        self.permanent = permanent
        self.retry_after = retry_after


class Sender(Protocol):
    """Sends one reply through one provider call (or one SMTP transaction)."""

    async def send(self, reply: OutboundReply) -> Sent: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SenderSpec:
    """How a channel answers, registered with ``ctx.add_sender`` during ``setup``.

    ``window``: seconds after the customer's last message in which a free-form reply may go (WeChat
    48 h, WhatsApp 24 h); ``None`` for no window. Outside it the gateway fails the reply with
    ``window_closed`` without calling the sender, unless ``outside_window(reply)`` says this reply may
    go anyway (a WhatsApp template). ``rate`` and ``burst``: sends per second per inbox.
    ``idempotent``: the provider drops a repeated ``reply_id``, so a crash between its acceptance and
    our commit sends nothing twice (documented per channel in ``docs/replies.md``)."""

    sender: Sender
    window: float | None = None
    outside_window: Callable[[OutboundReply], bool] | None = None
    rate: float = 10.0
    burst: int = 10
    idempotent: bool = False


DeliveryStatus = Literal["delivered", "read", "failed"]


Lifecycle = Callable[[], AbstractAsyncContextManager[None]]
"""Something started before the gateway serves and stopped after its listeners (an SMTP server)."""


class ChannelContext(Protocol):
    """Everything a channel may use, and nothing else."""

    @property
    def channel(self) -> str: ...

    @property
    def settings(self) -> Settings:
        """The whole configuration (inboxes, server limits, public URL); the channel's own table is
        in ``settings.channel(name, Model)``."""
        ...

    @property
    def clock(self) -> Clock: ...

    @property
    def state(self) -> ChannelState: ...

    @property
    def media(self) -> MediaQueue: ...

    @property
    def blobs(self) -> Blobs: ...

    @property
    def identities(self) -> IdentityLinks: ...

    @property
    def metrics(self) -> ChannelMetrics: ...

    async def ingest(self, envelope: RawEnvelope, normalize: Normalizer | None = None) -> IngestResult:
        """Normalize (the descriptor's normalizer, configured from the settings, unless one is given),
        place and commit. Success may be answered only when ``result.stored``."""
        ...

    def add_app(self, prefix: str, app: web.Application) -> None:
        """Mount an aiohttp sub-application under ``prefix`` (HTTP routes of the channel)."""
        ...

    def add_lifecycle(self, lifecycle: Lifecycle) -> None:
        """Run ``lifecycle()`` while the gateway runs: SMTP listeners, IMAP pollers, stream
        connections. Entered in registration order at start, exited in reverse at shutdown."""
        ...

    def spawn(self, name: str, run: Callable[[], Awaitable[None]], *, restart_after: float = 1.0) -> None:
        """A supervised background task for the gateway's lifetime: started at start-up, restarted
        (after ``restart_after`` seconds, doubling up to a minute) when it raises, cancelled at
        shutdown. For pollers and fetchers."""
        ...

    def http(self, base_url: str, *, timeout: float = 15.0) -> HttpClient:
        """A client for a provider API at ``base_url``; call during ``setup``."""
        ...

    def add_sender(self, spec: SenderSpec) -> None:
        """This channel answers replies through ``spec``; call during ``setup``, at most once."""
        ...

    def shared(self, key: str, build: Callable[[], _T]) -> _T:
        """The object kept under ``key`` for every channel of this gateway, built by ``build()`` the
        first time any channel asks; call during ``setup``. Channels that share one provider
        endpoint (WhatsApp, Messenger and Instagram behind one Meta app) meet here: the first one
        builds and mounts the route, the others register on it. Keys are global: prefix them with
        the family's name."""
        ...

    async def report_delivery(
        self,
        provider_message_id: str,
        status: DeliveryStatus,
        *,
        at: datetime | None = None,
        reason: ReplyFailure | None = None,
        detail: str | None = None,
    ) -> bool:
        """A provider's report on one of our replies (a WhatsApp ``statuses`` item, a LINE read
        receipt): publishes ``reply.delivered``, ``reply.read`` or ``reply.failed``. ``False`` when
        no reply of this channel has that id (not ours, or erased): the caller acknowledges anyway."""
        ...

    async def compute(self, fn: Callable[..., _T], /, *args: Any) -> _T:
        """``fn(*args)``, computed off the event loop's interpreter (in the normalizer process)
        when it runs, here when not. For heavy, pure work on the ack path: ``fn`` must be a
        module-level function and its arguments and result plain data. Raises what ``fn`` raises,
        and ``RuntimeError`` when the process died while computing it (not retried here: the same
        input could take the gateway down with it)."""
        ...


class Compute(Protocol):
    """:meth:`ChannelContext.compute`, handed to the parts of a channel that need it."""

    async def __call__(self, fn: Callable[..., _T], /, *args: Any) -> _T: ...


class Connector(Protocol):
    """One channel's transport. ``from_settings`` returns ``None`` when the channel is not configured
    and raises :class:`core.errors.ConfigError` when it is configured wrongly (fail closed).

    A connector may also describe where it is reached (:class:`DescribesEndpoints`); the daemon
    prints that in its start-up summary."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None: ...

    def setup(self, ctx: ChannelContext) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelEndpoint:
    """Where one inbox of a channel is reached: what a provider's console or a sender is given."""

    inbox: str
    kind: str  # "webhook", "api", "form", "embed", "smtp", "imap", "polling" ...
    address: str  # a URL, or what stands for one (an SMTP listener and its addresses)


@runtime_checkable
class DescribesEndpoints(Protocol):
    """Optional for a connector: its endpoints, for the start-up summary. ``base_url`` is where the
    gateway's HTTP server is reached (``server.public_url``, else its listen address), without a
    trailing slash. A connector without it still works; the summary then names the channel only."""

    def describe_endpoints(self, base_url: str) -> Sequence[ChannelEndpoint]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelDescriptor:
    """How a channel declares itself; exported by the channel's package under ``ENTRY_POINT_GROUP``.

    ``normalizer`` is the one live ingest and quarantine replay use; a channel whose normalizer
    takes bounds from its settings gives ``configure`` (settings -> normalizer) as well, and both
    paths use what it returns. ``deadline`` is how long the provider waits for an answer before it
    retries (seconds); the contract suite holds the connector to it.
    """

    name: str
    connector: type[Connector]
    normalizer: Normalizer
    configure: Callable[[Settings], Normalizer] | None = None
    settings: type[BaseModel] | None = None
    identity_kinds: frozenset[str] = field(default_factory=frozenset)
    deadline: float = 10.0


def normalizer_for(descriptor: ChannelDescriptor, settings: Settings) -> Normalizer:
    """The normalizer of ``descriptor`` under ``settings`` (live ingest and replay alike)."""
    if descriptor.configure is not None:
        return descriptor.configure(settings)
    return descriptor.normalizer
