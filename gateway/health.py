"""Operations endpoints: liveness, readiness, Prometheus metrics, and attachment fetch for desks."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime

from aiohttp import web

from gateway.keys import METRICS, RELAY, SETTINGS, STORE
from gateway.media import BLOB_AUTH, file_response

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok"})


# A readiness probe that has not answered in this time is an answer: not ready. Load balancers probe
# with timeouts of their own of a few seconds; a hung disk or store must not hang the probe instead.
READY_PROBE_TIMEOUT = 2.0


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the store takes a real write within a bound, and the broker is connected (and
    heartbeating: a stalled connection is dropped by the publisher) or the backlog is under its bound."""
    app = request.app
    problems: list[str] = []
    store_problem = await probe_store(app)
    if store_problem is not None:
        problems.append(f"store: {store_problem}")
    status = await app[STORE].outbox_status()
    connected = app[RELAY].status.connected
    limit = app[SETTINGS].outbox.max_backlog
    if not connected and status.backlog >= limit:
        problems.append(f"broker disconnected and outbox backlog {status.backlog} at its bound {limit}")
    body = {
        "status": "ready" if not problems else "unavailable",
        "problems": problems,
        "broker_connected": connected,
        "outbox_backlog": status.backlog,
    }
    return web.json_response(body, status=200 if not problems else 503)


_PROBE: web.AppKey[dict[str, asyncio.Task[None]]] = web.AppKey("ready_probe", dict)


async def probe_store(app: web.Application) -> str | None:
    """Run the store's write probe for at most READY_PROBE_TIMEOUT; the reason it failed, or None.

    A probe that outlives its bound keeps running (a write to a hung disk cannot be taken back), and
    later probes wait on that one instead of piling up more writes behind it.
    """
    probes = app[_PROBE]
    task = probes.get("store")
    if task is None or task.done():
        task = probes["store"] = asyncio.ensure_future(app[STORE].ping())
    done, _ = await asyncio.wait({task}, timeout=READY_PROBE_TIMEOUT)
    if task not in done:
        return f"a write did not complete within {READY_PROBE_TIMEOUT:g}s"
    exc = task.exception()
    if exc is None:
        return None
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({type(exc).__name__})"
    return str(exc) or type(exc).__name__


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    status = await app[STORE].outbox_status()
    oldest = status.oldest_created_at
    age = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else None
    registry = app[METRICS]
    registry.outbox_status(status.backlog, age)
    registry.broker_connected.set(1 if app[RELAY].status.connected else 0)
    replies = await app[STORE].reply_backlog()
    oldest_reply = replies.oldest_requested_at
    registry.reply_status(
        replies.pending + replies.sending,
        (datetime.now(UTC) - oldest_reply).total_seconds() if oldest_reply is not None else None,
    )
    return web.Response(body=registry.exposition(), content_type="text/plain", charset="utf-8")


async def blob(request: web.Request) -> web.StreamResponse:
    """Attachments by content hash, for desks (``Authorization: Bearer <server.blob_token>``)."""
    refused = request.config_dict[BLOB_AUTH].refusal(request)
    if refused is not None:
        return refused
    digest = request.match_info["sha256"]
    if not _SHA256.match(digest):
        raise web.HTTPBadRequest(text="not a sha256")
    store = request.app[STORE]
    data = await store.read_blob(digest)
    if data is None:
        raise web.HTTPNotFound()
    return file_response(data, sha256=digest, content_type=await store.blob_content_type(digest))


def setup_health(app: web.Application) -> None:
    app[_PROBE] = {}
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/blobs/{sha256}", blob)
