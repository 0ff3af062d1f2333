"""The unionid of an Official Account follower, asked from the user-info API after the answer.

A message carries the follower's ``openid`` (one per account); its ``unionid`` (one per person
across a brand's accounts, mini programs and WeCom contacts) only when the account is bound to an
Open Platform account and WeChat chose to include it. For an account with ``app_secret`` and
``fetch_unionid = true``, every stored callback whose sender has no unionid schedules a lookup
(``GET /cgi-bin/user/info``) in a background task, with bounded concurrency: the callback has
already been answered, and a failing lookup never touches the message.

An answer with a ``unionid`` is linked to the customer that owns the openid as verified evidence
(the WeChat API is authoritative) through the channel context's identity links, in one
transaction: an
unknown unionid is added to that customer; a unionid another customer already owns (the same
person wrote to another account of the brand) merges that customer into this one, and the
``customer.merged`` event commits with the merge.

The result is kept durably per openid (``wechat/unionid/{app_id}/{openid}``): a known unionid is
never asked again; "none" (no unionid, or an error a retry cannot fix such as an account without
the user-info permission) is asked again after ``recheck_none``. Token errors are refreshed by the
API client; a busy or rate-limited API (45009) pauses the account's lookups, and the next message
of the openid asks again. Nothing is queued durably: the marker is written only after the link, so
a lookup lost to a restart is made on the follower's next message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from connectors.wechat.api import ApiError, ApiUnavailable, WeChatApi
from core.channel import ChannelState, IdentityLinks
from core.model import CanonicalMessage, Identity, IdentityKind

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
USER_INFO = "/cgi-bin/user/info"


def marker_key(app_id: str, openid: str) -> str:
    """The marker's key in the channel's state (kept as ``wechat/unionid/...`` in the store)."""
    return f"unionid/{app_id}/{openid}"


@dataclass(frozen=True, slots=True, kw_only=True)
class UnionIdPolicy:
    concurrency: int = 4
    # Lookups waiting for a slot beyond this are dropped (the openid's next message asks again).
    max_pending: int = 1000
    recheck_none: float = 86400.0  # seconds before an openid without unionid is asked again
    first_backoff: float = 60.0  # pause of an account's lookups after a busy / rate-limited answer
    max_backoff: float = 3600.0
    drain: float = 5.0  # seconds lookups still running at shutdown get to finish


@dataclass(frozen=True, slots=True, kw_only=True)
class _Marker:
    unionid: str | None
    checked_at: float

    def encode(self) -> bytes:
        return orjson.dumps({"unionid": self.unionid, "checked_at": self.checked_at})

    @classmethod
    def decode(cls, raw: bytes) -> _Marker | None:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(value, dict):
            return None
        unionid, checked_at = value.get("unionid"), value.get("checked_at")
        if not isinstance(checked_at, int | float) or not (unionid is None or isinstance(unionid, str)):
            return None
        return cls(unionid=unionid or None, checked_at=float(checked_at))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Lookup:
    account: str
    app_id: str
    tenant: str
    openid: str


class UnionIdResolver:
    """Looks up and links the unionids of one channel's followers; ``accounts`` maps the names of
    the accounts with ``fetch_unionid`` (and API credentials) to their AppID."""

    def __init__(
        self,
        accounts: Mapping[str, str],
        policy: UnionIdPolicy | None = None,
        *,
        clock: Clock,
    ) -> None:
        self.accounts = dict(accounts)
        self.policy = policy or UnionIdPolicy()
        self._clock = clock
        self._state: ChannelState | None = None
        self._identities: IdentityLinks | None = None
        self._apis: Mapping[str, WeChatApi] = {}
        self._gate = asyncio.Semaphore(self.policy.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: set[tuple[str, str]] = set()
        # account -> (clock reading before which it is not asked, current pause)
        self._paused: dict[str, tuple[float, float]] = {}

    def bind(self, state: ChannelState, identities: IdentityLinks) -> None:
        self._state = state
        self._identities = identities

    def start(self, apis: Mapping[str, WeChatApi]) -> None:
        self._apis = apis

    @property
    def state(self) -> ChannelState:
        if self._state is None:
            raise RuntimeError("unionid resolver is not bound to the channel's state")
        return self._state

    @property
    def identities(self) -> IdentityLinks:
        if self._identities is None:
            raise RuntimeError("unionid resolver is not bound to the identity links")
        return self._identities

    def schedule(self, messages: Sequence[CanonicalMessage], account: str) -> int:
        """Start lookups for the senders of stored messages that came without a unionid; returns how
        many were started. Synchronous: it never delays the callback's answer."""
        app_id = self.accounts.get(account)
        if app_id is None:
            return 0
        started = 0
        for message in messages:
            openid = _openid_without_unionid(message.identities, app_id)
            if openid is None or (account, openid) in self._in_flight:
                continue
            if len(self._tasks) >= self.policy.max_pending:
                logger.warning("wechat/%s: %d unionid lookups waiting; not adding more", account,
                               len(self._tasks))
                break
            lookup = _Lookup(account=account, app_id=app_id, tenant=message.tenant, openid=openid)
            self._in_flight.add((account, openid))
            task = asyncio.create_task(self._guarded(lookup), name=f"ticketgate-wechat-unionid-{account}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        return started

    async def join(self) -> None:
        """Wait until every lookup started so far has finished (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def resolve(self, account: str, tenant: str, openid: str) -> str | None:
        """Look up one openid now (unless its marker makes that unnecessary) and link its unionid;
        returns the unionid known for it, or ``None``."""
        app_id = self.accounts.get(account)
        if app_id is None:
            raise KeyError(account)
        lookup = _Lookup(account=account, app_id=app_id, tenant=tenant, openid=openid)
        return await self._resolve(lookup)

    @contextlib.asynccontextmanager
    async def running(self, apis: Mapping[str, WeChatApi]) -> AsyncIterator[None]:
        """Accept lookups for the duration of the block; at its end those running get ``drain``
        seconds to finish and are then cancelled (their openids are asked again on a later message)."""
        self.start(apis)
        try:
            yield
        finally:
            tasks = list(self._tasks)
            if tasks:
                await asyncio.wait(tasks, timeout=self.policy.drain)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------

    async def _guarded(self, lookup: _Lookup) -> None:
        try:
            async with self._gate:
                await self._resolve(lookup)
        except Exception:
            logger.exception("wechat/%s: unionid lookup failed", lookup.account)
        finally:
            self._in_flight.discard((lookup.account, lookup.openid))

    async def _resolve(self, lookup: _Lookup) -> str | None:
        key = marker_key(lookup.app_id, lookup.openid)
        raw = await self.state.get(key)
        marker = _Marker.decode(raw) if raw is not None else None
        now = self._clock()
        if marker is not None and (
            marker.unionid is not None or now - marker.checked_at < self.policy.recheck_none
        ):
            return marker.unionid
        paused_until, _ = self._paused.get(lookup.account, (0.0, 0.0))
        if now < paused_until:
            return None
        api = self._apis.get(lookup.account)
        if api is None:
            logger.warning("wechat/%s: no API client for unionid lookups", lookup.account)
            return None
        try:
            answer = await api.get_json(USER_INFO, {"openid": lookup.openid, "lang": "zh_CN"})
        except ApiUnavailable as exc:
            self._pause(lookup.account, exc.retry_after)
            logger.warning("wechat/%s: user info unavailable (%s); unionid lookups paused",
                           lookup.account, exc.reason)
            return None
        except ApiError as exc:
            # A retry will not fix it (no permission, invalid openid): ask again after recheck_none.
            logger.warning("wechat/%s: user info refused: %s", lookup.account, exc)
            await self.state.put(key, _Marker(unionid=None, checked_at=now).encode())
            return None
        self._paused.pop(lookup.account, None)
        unionid = answer.get("unionid")
        if not isinstance(unionid, str) or not unionid.strip():
            await self.state.put(key, _Marker(unionid=None, checked_at=now).encode())
            return None
        unionid = unionid.strip()
        openid = Identity(kind=IdentityKind.WECHAT_OPENID, value=f"{lookup.app_id}:{lookup.openid}")
        linked = await self.identities.link_verified(
            tenant=lookup.tenant,
            owner=openid,
            identity=Identity(kind=IdentityKind.WECHAT_UNIONID, value=unionid, verified=True),
            evidence={
                "source": "wechat_api",
                "api": "user/info",
                "app_id": lookup.app_id,
                "openid": openid.value,
                "unionid": unionid,
            },
        )
        if linked is None:
            # The openid is not stored (yet): leave no marker, a later message asks again.
            logger.warning("wechat/%s: no customer owns the openid; unionid not linked", lookup.account)
            return unionid
        if linked.merged_customers:
            logger.info("wechat/%s: unionid merged customers %s into %s", lookup.account,
                        ", ".join(linked.merged_customers), linked.customer_id)
        await self.state.put(key, _Marker(unionid=unionid, checked_at=now).encode())
        return unionid

    def _pause(self, account: str, retry_after: float | None) -> None:
        _, previous = self._paused.get(account, (0.0, 0.0))
        pause = min(max(previous * 2, self.policy.first_backoff, retry_after or 0.0), self.policy.max_backoff)
        self._paused[account] = (self._clock() + pause, pause)


def _openid_without_unionid(identities: Sequence[Identity], app_id: str) -> str | None:
    prefix = f"{app_id}:"
    openid: str | None = None
    for identity in identities:
        if identity.kind == IdentityKind.WECHAT_UNIONID:
            return None
        if identity.kind == IdentityKind.WECHAT_OPENID and identity.value.startswith(prefix):
            openid = identity.value[len(prefix):] or None
    return openid
