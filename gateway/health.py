"""Operations endpoints: liveness, readiness, Prometheus metrics, and attachment fetch for desks."""

from __future__ import annotations

import hmac
import logging
import re
from datetime import UTC, datetime

from aiohttp import web

from core.http import header_bytes
from gateway.keys import METRICS, RELAY, SETTINGS, STORE
from gateway.media import file_response

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the store can write, and the broker is connected or the backlog is under its bound."""
    app = request.app
    problems: list[str] = []
    try:
        await app[STORE].ping()
    except Exception as exc:
        problems.append(f"store: {exc}")
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


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    status = await app[STORE].outbox_status()
    oldest = status.oldest_created_at
    age = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else None
    registry = app[METRICS]
    registry.outbox_status(status.backlog, age)
    registry.broker_connected.set(1 if app[RELAY].status.connected else 0)
    return web.Response(body=registry.exposition(), content_type="text/plain", charset="utf-8")


async def blob(request: web.Request) -> web.StreamResponse:
    """Attachments by content hash, for desks (``Authorization: Bearer <server.blob_token>``)."""
    settings = request.app[SETTINGS]
    token = settings.server.blob_token
    if token is not None:
        offered = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(header_bytes(offered), token.get_secret_value().encode()):
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"}, text="blob token required")
    digest = request.match_info["sha256"]
    if not _SHA256.match(digest):
        raise web.HTTPBadRequest(text="not a sha256")
    store = request.app[STORE]
    data = await store.read_blob(digest)
    if data is None:
        raise web.HTTPNotFound()
    return file_response(data, sha256=digest, content_type=await store.blob_content_type(digest))


def setup_health(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/blobs/{sha256}", blob)
