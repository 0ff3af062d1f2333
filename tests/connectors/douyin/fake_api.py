"""A local server answering like open.douyin.com's private-message and comment-reply APIs: HTTP 200
with ``data.error_code`` / ``extra.error_code`` (0 when accepted), errors included."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def douyin_error(code: int, description: str) -> dict[str, Any]:
    """An answer in Douyin's shape refusing with ``code``."""
    return {
        "data": {"error_code": code, "description": description},
        "extra": {
            "error_code": code,
            "description": description,
            "logid": "2025120508000001",
            "now": 1764921600,
            "sub_error_code": 0,
            "sub_description": "",
        },
    }


@dataclass
class FakeDouyin:
    """Accepts sends made with ``token`` for ``account`` (the brand's open_id)."""

    token: str
    account: str
    sent: list[dict[str, Any]] = field(default_factory=list)
    # answers (status, body) given before the real one
    errors: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/im/send/msg/", self._im_send)
        app.router.add_post("/item/comment/reply/", self._comment_reply)
        return app

    async def _refused(self, request: web.Request) -> web.Response | None:
        if request.headers.get("access-token") != self.token:
            return web.json_response(douyin_error(2190002, "access_token无效"))
        if request.query.get("open_id") != self.account:
            return web.json_response(douyin_error(2190015, "access_token与open_id不匹配"))
        if self.errors:
            status, body = self.errors.pop(0)
            return web.json_response(body, status=status)
        return None

    async def _im_send(self, request: web.Request) -> web.Response:
        body = await request.json()
        if (refused := await self._refused(request)) is not None:
            return refused
        if not body.get("conversation_id") or not body.get("msg_id") or not body.get("to_user_id"):
            return web.json_response(douyin_error(2100005, "参数不合法"))
        self._ids += 1
        self.sent.append({"api": "im", **body})
        self.changed.set()
        return web.json_response(
            {
                "data": {"error_code": 0, "description": "", "msg_id": f"@sent{self._ids}=="},
                "extra": {"error_code": 0, "description": "", "logid": "1"},
            }
        )

    async def _comment_reply(self, request: web.Request) -> web.Response:
        body = await request.json()
        if (refused := await self._refused(request)) is not None:
            return refused
        self._ids += 1
        self.sent.append({"api": "comment", **body})
        self.changed.set()
        return web.json_response(
            {
                "data": {"error_code": 0, "description": "", "comment_id": f"@reply{self._ids}=="},
                "extra": {"error_code": 0},
            }
        )
