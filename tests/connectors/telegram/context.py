"""An in-memory ChannelContext for channel tests, and a local server that answers like the Bot API.

``MemoryContext`` keeps what the real context would put in the store: idempotency keys claimed
atomically (so concurrent deliveries race for real), the "published" events, the media queue with
leases and attempts, and the channel state with compare-and-set.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web

from core.channel import LinkOutcome, Normalizer
from core.errors import InvalidInput, NormalizationError
from core.media import MediaFetch
from core.model import CanonicalMessage, Identity, IngestResult, Outcome, Placement, RawEnvelope
from core.settings import Settings
from normalizers.telegram import normalize

START = datetime(2025, 12, 5, 8, 0, tzinfo=UTC)


class FixedClock:
    def __init__(self, now: datetime = START) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current

    def time(self) -> float:
        return self.current.timestamp()

    def monotonic(self) -> float:
        return self.current.timestamp()

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


class MemoryState:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        return self.values.get(key)

    async def put(self, key: str, value: bytes) -> None:
        self.values[key] = value

    async def compare_and_set(self, key: str, expected: bytes | None, value: bytes) -> bool:
        if self.values.get(key) != expected:
            return False
        self.values[key] = value
        return True


class MemoryMedia:
    def __init__(self) -> None:
        self.fetches: dict[str, MediaFetch] = {}
        self.blobs: dict[str, bytes] = {}
        self.fail_enqueue = False

    async def enqueue(self, fetches: Sequence[MediaFetch]) -> None:
        if self.fail_enqueue:
            raise OSError("media queue unavailable")
        for fetch in fetches:
            self.fetches.setdefault(fetch.key, fetch)

    async def claim(self, now: datetime, limit: int, lease: float) -> list[MediaFetch]:
        due = [
            f for f in self.fetches.values()
            if f.state == "pending" and (f.next_attempt_at is None or f.next_attempt_at <= now)
        ][:limit]
        for fetch in due:
            self.fetches[fetch.key] = replace(
                fetch, attempts=fetch.attempts + 1, next_attempt_at=now + timedelta(seconds=lease)
            )
        return [self.fetches[f.key] for f in due]

    async def done(self, key: str, data: bytes, *, content_type: str, name: str | None) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        self.fetches[key] = replace(
            self.fetches[key], state="done", sha256=digest, size=len(data), content_type=content_type,
            name=name,
        )
        return digest

    async def failed(self, key: str, error: str, *, retry_at: datetime | None) -> None:
        state = "pending" if retry_at is not None else "failed"
        self.fetches[key] = replace(self.fetches[key], state=state, error=error, next_attempt_at=retry_at)

    async def get(self, key: str) -> MediaFetch | None:
        return self.fetches.get(key)

    async def read(self, sha256: str) -> bytes | None:
        return self.blobs.get(sha256)


class NoLinks:
    async def link_verified(
        self, *, tenant: str, owner: Identity, identity: Identity, evidence: dict[str, Any]
    ) -> LinkOutcome | None:
        return None


class CountingMetrics:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def event(self, event: str, *, inbox: str = "") -> None:
        self.counts[(event, inbox)] += 1

    def refused(self, reason: str, *, inbox: str = "") -> None:
        self.counts[(f"refused:{reason}", inbox)] += 1


@dataclass
class Client:
    base_url: str
    session: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return f"{self.base_url.rstrip('/')}/{path.lstrip('/')}"


@dataclass
class MemoryContext:
    """The context a channel's ``setup`` receives, with a pipeline that claims keys like the store."""

    settings: Settings
    session: aiohttp.ClientSession
    channel: str = "telegram"
    clock: FixedClock = field(default_factory=FixedClock)
    state: MemoryState = field(default_factory=MemoryState)
    media: MemoryMedia = field(default_factory=MemoryMedia)
    identities: NoLinks = field(default_factory=NoLinks)
    metrics: CountingMetrics = field(default_factory=CountingMetrics)
    app: web.Application = field(default_factory=web.Application)
    spawned: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    lifecycles: list[Callable[[], AbstractAsyncContextManager[None]]] = field(default_factory=list)
    # What the store would hold: claimed idempotency keys and the events of accepted messages.
    claimed: dict[str, str] = field(default_factory=dict)
    events: list[CanonicalMessage] = field(default_factory=list)
    quarantined: list[RawEnvelope] = field(default_factory=list)
    ingests: int = 0
    store_down: bool = False
    store_delay: float = 0.0

    @property
    def blobs(self) -> MemoryMedia:
        return self.media

    async def ingest(self, envelope: RawEnvelope, normalize_with: Normalizer | None = None) -> IngestResult:
        self.ingests += 1
        try:
            messages = list((normalize_with or normalize)(envelope))
        except InvalidInput as exc:
            return IngestResult(outcome=Outcome.REJECTED, reason=exc.reason, status=exc.status)
        except NormalizationError as exc:
            self.quarantined.append(envelope)
            return IngestResult(outcome=Outcome.QUARANTINED, reason=str(exc), quarantine_id="q-1")
        # Let concurrent deliveries interleave here, as they do while the store's writer is busy.
        await asyncio.sleep(self.store_delay)
        if self.store_down:
            return IngestResult(outcome=Outcome.RETRY, reason="store unavailable", retry_after=7.0)
        placements = []
        for message in messages:
            key = message.idempotency_key()
            duplicate = key in self.claimed
            if not duplicate:
                self.claimed[key] = message.message_id()
                self.events.append(message)
            placements.append(Placement(
                message_id=self.claimed[key], thread_id="t-1", customer_id="c-1", sequence=len(self.events),
                is_new_thread=False, duplicate=duplicate,
            ))
        if placements and all(p.duplicate for p in placements):
            return IngestResult(outcome=Outcome.DUPLICATE, placements=tuple(placements))
        return IngestResult(outcome=Outcome.ACCEPTED, placements=tuple(placements))

    def add_app(self, prefix: str, app: web.Application) -> None:
        self.app.add_subapp(prefix, app)

    def add_lifecycle(self, lifecycle: Callable[[], AbstractAsyncContextManager[None]]) -> None:
        self.lifecycles.append(lifecycle)

    def spawn(self, name: str, run: Callable[[], Awaitable[None]], *, restart_after: float = 1.0) -> None:
        self.spawned[name] = run

    def http(self, base_url: str, *, timeout: float = 15.0) -> Client:
        return Client(base_url, self.session)


@dataclass
class FakeBotApi:
    """Answers like api.telegram.org: scripted getFile answers per file_id, files, getUpdates."""

    token: str
    files: dict[str, bytes] = field(default_factory=dict)
    # file_id -> answers to give in order before the real one: (HTTP status, error body).
    file_errors: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    file_sizes: dict[str, int] = field(default_factory=dict)
    updates: list[dict[str, Any]] = field(default_factory=list)
    update_errors: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    offsets_asked: list[int | None] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Until ``predicate`` holds after some call the server answered."""
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(predicate)

    async def _answered(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self._method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._file)
        return app

    async def _method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            unauthorized = {"ok": False, "error_code": 401, "description": "Unauthorized"}
            return web.json_response(unauthorized, status=401)
        method = request.match_info["method"]
        self.calls[method] += 1
        payload = await request.json()
        if method == "getFile":
            return self._get_file(payload["file_id"])
        if method == "getUpdates":
            if self.update_errors:
                status, body = self.update_errors.pop(0)
                return web.json_response(body, status=status)
            offset = payload.get("offset")
            self.offsets_asked.append(offset)
            result = [u for u in self.updates if offset is None or u["update_id"] >= offset]
            await self._answered()
            return web.json_response({"ok": True, "result": result[: payload.get("limit", 100)]})
        return web.json_response({"ok": False, "error_code": 404, "description": "Not Found"}, status=404)

    def _get_file(self, file_id: str) -> web.Response:
        errors = self.file_errors.get(file_id)
        if errors:
            status, body = errors.pop(0)
            return web.json_response(body, status=status)
        if file_id not in self.files:
            return web.json_response(
                {"ok": False, "error_code": 400, "description": "Bad Request: invalid file_id"}, status=400
            )
        size = self.file_sizes.get(file_id, len(self.files[file_id]))
        return web.json_response({"ok": True, "result": {
            "file_id": file_id, "file_unique_id": f"u-{file_id[-6:]}", "file_size": size,
            "file_path": f"photos/{file_id[-8:]}.jpg",
        }})

    async def _file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=404)
        self.calls["download"] += 1
        wanted = request.match_info["path"]
        for file_id, data in self.files.items():
            if wanted == f"photos/{file_id[-8:]}.jpg":
                return web.Response(body=data, content_type="image/jpeg")
        return web.Response(status=404)


def too_many_requests(retry_after: int) -> tuple[int, dict[str, Any]]:
    return 429, {
        "ok": False, "error_code": 429, "description": f"Too Many Requests: retry after {retry_after}",
        "parameters": {"retry_after": retry_after},
    }


def server_error() -> tuple[int, dict[str, Any]]:
    return 502, {"ok": False, "error_code": 502, "description": "Bad Gateway"}
