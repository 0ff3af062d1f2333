"""``GET /media/{channel}/{inbox}/{ref}``: provider media that channels fetched after the commit.

200 with the bytes once fetched, 202 with ``Retry-After`` while pending, 410 when it cannot be
fetched any more, 404 when the gateway does not know it. The blob token of ``/blobs`` applies.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from urllib.parse import quote

from aiohttp import web

from core.events import media_path
from core.http import BearerKeys, ClientAddress, RateLimiter, refuse_credentials
from core.settings import ServerSettings
from gateway.keys import SETTINGS, STORE

logger = logging.getLogger(__name__)

_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*$")
# Shown in the browser when opened: types that run nothing. Everything else is a download.
_INLINE = re.compile(r"^(?:image/(?:png|jpeg|gif|webp|bmp|avif)|audio/[\w.+-]+|video/[\w.+-]+|text/plain)$")


async def serve_media(request: web.Request) -> web.StreamResponse:
    refused = request.config_dict[BLOB_AUTH].refusal(request)
    if refused is not None:
        return refused
    match = request.match_info
    key = media_path(match["channel"], match["inbox"], match["ref"])
    store = request.config_dict[STORE]
    record = await store.media_get(key)
    if record is None:
        return web.json_response({"status": "unknown"}, status=404)
    if record.state == "pending":
        wait = 5.0
        if record.next_attempt_at is not None:
            wait = (record.next_attempt_at - datetime.now(UTC)).total_seconds()
        return web.json_response(
            {"status": "pending", "attempts": record.attempts},
            status=202,
            headers={"Retry-After": str(min(max(1, round(wait)), 3600))},
        )
    if record.state == "failed" or record.sha256 is None:
        return web.json_response({"status": "failed", "error": record.error}, status=410)
    data = await store.read_blob(record.sha256)
    if data is None:
        logger.error("media %s: blob %s is missing", key, record.sha256)
        return web.json_response({"status": "missing"}, status=404)
    return file_response(data, sha256=record.sha256, content_type=record.content_type, name=record.name)


def file_response(
    data: bytes, *, sha256: str, content_type: str | None, name: str | None = None
) -> web.Response:
    """Stored bytes as a desk fetches them (``/blobs`` and ``/media``), under the type they came with.

    The type is the sender's word, so nothing the gateway serves may run in its origin: a type a
    browser would render as a page or a script (HTML, SVG, XML, anything not on the inline list)
    goes out as a download, every answer forbids sniffing, and a sandbox CSP disables scripts even
    where a browser shows it anyway.
    """
    if content_type is None or not _MEDIA_TYPE.match(content_type):
        content_type = "application/octet-stream"
    content_type = content_type.lower()
    headers = {
        "Cache-Control": "private, max-age=31536000, immutable",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox; default-src 'none'",
        "ETag": f'"{sha256}"',
        "X-Content-SHA256": sha256,
    }
    disposition = "inline" if _INLINE.match(content_type) else "attachment"
    if name:
        disposition += f"; filename*=UTF-8''{quote(name, safe='')}"
    if name or disposition == "attachment":
        headers["Content-Disposition"] = disposition
    return web.Response(body=data, content_type=content_type, headers=headers)


class BlobAuth:
    """The one check of ``server.blob_token`` for ``/blobs`` and ``/media``, with a failed-auth
    limiter per client IP as the API has for its keys; no token configured, no check."""

    def __init__(self, server: ServerSettings) -> None:
        self._keys: BearerKeys[bool] | None = None
        if server.blob_token is not None:
            self._keys = BearerKeys(what="the blob token", source=None)
            self._keys.add(server.blob_token, True, where="server.blob_token")
        self._client_ip = ClientAddress(server.trusted_proxies)
        self._failures = RateLimiter(
            per_minute=server.blob_auth_failures_per_minute, burst=server.blob_auth_failures_burst
        )

    def refusal(self, request: web.Request) -> web.Response | None:
        """``None`` when the request may fetch; else the 401 (or 429) to answer."""
        if self._keys is None or self._keys.lookup(request):
            return None
        remote = self._client_ip(request)
        present = "Authorization" in request.headers
        logger.warning("%s: %s blob token from %s", request.path.split("/", 2)[1], "wrong" if present
                       else "missing", remote)
        return refuse_credentials(
            self._failures, remote, present=present, challenge=_CHALLENGE, required="the blob token"
        )


BLOB_AUTH = web.AppKey("blob_auth", BlobAuth)
_CHALLENGE = 'Bearer realm="ticketgate-blobs"'


def setup_media(app: web.Application) -> None:
    app[BLOB_AUTH] = BlobAuth(app[SETTINGS].server)
    app.router.add_get("/media/{channel}/{inbox}/{ref:.+}", serve_media)
