"""A local server answering like Weibo's fan-service reply API (``/2/messages/reply.json``):
form-encoded requests, the sent message as JSON, errors as ``{"error", "error_code", "request"}``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

REQUEST = "/2/messages/reply.json"


def weibo_error(code: int, error: str, status: int = 400) -> tuple[int, dict[str, Any]]:
    return status, {"error": error, "error_code": code, "request": REQUEST}


@dataclass
class FakeWeibo:
    token: str
    sent: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: int = 4_981_000_000_000_000

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(REQUEST, self._reply)
        return app

    async def _reply(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-www-form-urlencoded":
            status, body = weibo_error(10008, "param error, see doc for more info")
            return web.json_response(body, status=status)
        form = await request.post()
        if form.get("access_token") != self.token:
            status, body = weibo_error(21332, "invalid_access_token", 401)
            return web.json_response(body, status=status)
        if self.errors:
            status, body = self.errors.pop(0)
            return web.json_response(body, status=status)
        data = orjson.loads(str(form["data"]))
        self._ids += 1
        self.sent.append(
            {
                "type": form["type"],
                "receiver_id": form["receiver_id"],
                "data": data,
                "save_sender_box": form.get("save_sender_box"),
            }
        )
        self.changed.set()
        return web.json_response(
            {
                "id": self._ids,
                "idstr": str(self._ids),
                "type": form["type"],
                "receiver_id": int(str(form["receiver_id"])),
                "text": data.get("text"),
            }
        )
