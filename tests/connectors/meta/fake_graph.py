"""A local server that answers like the Graph API: WhatsApp media lookup and download, uploads, the
Cloud API's and the Send API's ``/messages``, a CDN for attachment URLs, and Meta's error objects."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

VERSION = "v21.0"


def graph_error(
    status: int,
    code: int,
    message: str,
    *,
    subcode: int | None = None,
    details: str | None = None,
    retry_after: int | None = None,
) -> web.Response:
    error: dict[str, Any] = {
        "message": message,
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "AbCdEfGh123",
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    if details is not None:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response({"error": error}, status=status, headers=headers)


@dataclass
class FakeGraph:
    token: str = "graph-token"
    media: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # media id -> (bytes, mime)
    cdn: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # path -> (bytes, mime)
    # Statuses to answer before the real answer, per media id / CDN path (503, 429 ...).
    failures: dict[str, deque[int]] = field(default_factory=dict)
    # The next /messages answers: errors to give before accepting.
    send_errors: deque[web.Response] = field(default_factory=deque)
    # Downloads to truncate, per media id.
    corrupt: dict[str, int] = field(default_factory=dict)
    sent: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[tuple[str, bytes, str]] = field(default_factory=list)
    cdn_authorization: list[str | None] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    base: str = ""
    # Notified on every call (made in app(), inside the running loop).
    seen: asyncio.Condition | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        self.seen = asyncio.Condition()
        app = web.Application()
        app.router.add_get(f"/{VERSION}/{{media_id}}", self.media_info)
        app.router.add_get("/download/{media_id}", self.download)
        app.router.add_get("/cdn/{path}", self.cdn_get)
        app.router.add_post(f"/{VERSION}/{{owner}}/media", self.upload)
        app.router.add_post(f"/{VERSION}/{{owner}}/messages", self.messages)
        return app

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    def _failing(self, key: str) -> web.Response | None:
        pending = self.failures.get(key)
        if pending:
            status = pending.popleft()
            if status == 429:
                return graph_error(429, 80007, "Rate limit hit", retry_after=1)
            return web.Response(status=status, text="temporarily unavailable")
        return None

    async def media_info(self, request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        self.calls.append(f"media_info {media_id}")
        if self.seen is not None:
            async with self.seen:
                self.seen.notify_all()
        if not self._authorized(request):
            return graph_error(401, 190, "Error validating access token: Session has expired")
        failing = self._failing(media_id)
        if failing is not None:
            return failing
        if media_id not in self.media:
            return graph_error(
                400, 100, f"Unsupported get request. Object with ID '{media_id}' does not exist"
            )
        data, mime = self.media[media_id]
        return web.json_response(
            {
                "messaging_product": "whatsapp",
                "url": f"{self.base}download/{media_id}",
                "mime_type": mime,
                "sha256": hashlib.sha256(data).hexdigest(),
                "file_size": len(data),
                "id": media_id,
            }
        )

    async def download(self, request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        if not self._authorized(request):
            return web.Response(status=401)
        data, mime = self.media[media_id]
        if self.corrupt.get(media_id, 0) > 0:
            self.corrupt[media_id] -= 1
            data = data[: len(data) // 2]  # a truncated transfer
        return web.Response(body=data, content_type=mime)

    async def cdn_get(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        self.cdn_authorization.append(request.headers.get("Authorization"))
        failing = self._failing(path)
        if failing is not None:
            return failing
        if path not in self.cdn:
            return web.Response(status=403, text="URL signature expired")
        data, mime = self.cdn[path]
        return web.Response(body=data, content_type=mime)

    async def upload(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return graph_error(401, 190, "Error validating access token")
        form = await request.post()
        file = form["file"]
        assert isinstance(file, web.FileField)
        self.uploads.append((request.match_info["owner"], file.file.read(), str(form["type"])))
        return web.json_response({"id": f"upload-{next(self._ids)}"})

    async def messages(self, request: web.Request) -> web.Response:
        owner = request.match_info["owner"]
        if not self._authorized(request):
            return graph_error(401, 190, "Error validating access token")
        if request.content_type == "multipart/form-data":
            form = await request.post()
            payload: dict[str, Any] = {k: (v if isinstance(v, str) else "<file>") for k, v in form.items()}
        else:
            payload = await request.json()
        payload["_owner"] = owner
        if self.send_errors:
            return self.send_errors.popleft()
        self.sent.append(payload)
        n = next(self._ids)
        if payload.get("messaging_product") == "whatsapp":
            return web.json_response(
                {
                    "messaging_product": "whatsapp",
                    "contacts": [{"input": payload["to"], "wa_id": payload["to"]}],
                    "messages": [{"id": f"wamid.SENT{n:06d}"}],
                }
            )
        recipient = payload.get("recipient")
        return web.json_response({"recipient_id": str(recipient), "message_id": f"m_SENT{n:06d}"})
