"""A local server that answers like the Feishu / Lark Open API, errors included: the tenant token,
the contact API, message resources and message create / reply."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

APP_SECRET = "fake-feishu-app-secret"
# (status, JSON body, headers) answered before the real answer.
Scripted = tuple[int, dict[str, Any], dict[str, str]]


@dataclass
class FakeFeishu:
    base: str = ""
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    sent: list[dict[str, Any]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    scripted: dict[str, list[Scripted]] = field(default_factory=dict)
    tokens_issued: int = 0
    revoked: set[str] = field(default_factory=set)
    seen_uuids: dict[str, dict[str, Any]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/open-apis/auth/v3/tenant_access_token/internal", self.token)
        app.router.add_get("/open-apis/contact/v3/users/{open_id}", self.user)
        app.router.add_get("/open-apis/im/v1/messages/{message_id}/resources/{key}", self.resource)
        app.router.add_post("/open-apis/im/v1/messages", self.create)
        app.router.add_post("/open-apis/im/v1/messages/{message_id}/reply", self.reply)
        return app

    def script(self, name: str, *answers: Scripted) -> None:
        self.scripted.setdefault(name, []).extend(answers)

    def _scripted(self, name: str) -> web.Response | None:
        self.calls[name] += 1
        queue = self.scripted.get(name)
        if queue:
            status, body, headers = queue.pop(0)
            return web.json_response(body, status=status, headers=headers)
        return None

    def _authorized(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        if not token.startswith("t-fake-") or token in self.revoked:
            return web.json_response({"code": 99991663, "msg": "Invalid access token for authorization."},
                                     status=400)
        return None

    async def token(self, request: web.Request) -> web.Response:
        if (s := self._scripted("token")) is not None:
            return s
        body = await request.json()
        if body.get("app_secret") != APP_SECRET:
            return web.json_response({"code": 10014, "msg": "app secret invalid"})
        self.tokens_issued += 1
        token = f"t-fake-{self.tokens_issued}"
        return web.json_response({"code": 0, "msg": "ok", "tenant_access_token": token, "expire": 7200})

    async def user(self, request: web.Request) -> web.Response:
        if (s := self._scripted("user")) is not None:
            return s
        if (denied := self._authorized(request)) is not None:
            return denied
        user = self.users.get(request.match_info["open_id"])
        if user is None:
            return web.json_response({"code": 41050, "msg": "no user authority error"}, status=400)
        return web.json_response({"code": 0, "msg": "success", "data": {"user": user}})

    async def resource(self, request: web.Request) -> web.Response:
        if (s := self._scripted("resource")) is not None:
            return s
        if (denied := self._authorized(request)) is not None:
            return denied
        found = self.resources.get((request.match_info["message_id"], request.match_info["key"]))
        if found is None:
            return web.json_response({"code": 234003, "msg": "File not in msg."}, status=400)
        data, content_type = found
        return web.Response(body=data, content_type=content_type,
                            headers={"Content-Disposition": 'attachment; filename="resource.bin"'})

    async def _send(self, request: web.Request, name: str, extra: dict[str, Any]) -> web.Response:
        if (s := self._scripted(name)) is not None:
            return s
        if (denied := self._authorized(request)) is not None:
            return denied
        body = await request.json()
        uuid = body.get("uuid")
        if uuid and uuid in self.seen_uuids:  # Feishu sends one message per uuid within an hour
            return web.json_response({"code": 0, "msg": "success", "data": self.seen_uuids[uuid]})
        record = {**body, **extra, "path": request.path, "query": dict(request.query)}
        self.sent.append(record)
        data = {"message_id": f"om_sent{next(self._ids):06d}",
                "chat_id": body.get("receive_id") or "oc_group", "msg_type": body.get("msg_type")}
        if uuid:
            self.seen_uuids[uuid] = data
        return web.json_response({"code": 0, "msg": "success", "data": data})

    async def create(self, request: web.Request) -> web.Response:
        return await self._send(request, "create", {})

    async def reply(self, request: web.Request) -> web.Response:
        return await self._send(request, "reply", {"replying_to": request.match_info["message_id"]})
