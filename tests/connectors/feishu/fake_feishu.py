"""A local server that answers like the Feishu / Lark Open API, errors included: the tenant token,
the contact API, message resources and message create / reply."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from connectors.feishu.frame import CONTROL, DATA, Frame, decode, encode

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
    # The long connection: frames sent until answered with code 200, redelivered on a new socket.
    unanswered: dict[str, list[Frame]] = field(default_factory=dict)
    answers: list[Frame] = field(default_factory=list)
    pings: int = 0
    uploads: dict[str, tuple[str, bytes, dict[str, str]]] = field(default_factory=dict)
    connections: int = 0
    drop_after_next_event: bool = False
    closing: bool = False
    _socket: web.WebSocketResponse | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/open-apis/auth/v3/tenant_access_token/internal", self.token)
        app.router.add_get("/open-apis/contact/v3/users/{open_id}", self.user)
        app.router.add_get("/open-apis/im/v1/messages/{message_id}/resources/{key}", self.resource)
        app.router.add_post("/open-apis/im/v1/messages", self.create)
        app.router.add_post("/open-apis/im/v1/messages/{message_id}/reply", self.reply)
        app.router.add_post("/open-apis/im/v1/images", self.upload_image)
        app.router.add_post("/open-apis/im/v1/files", self.upload_file)
        app.router.add_post("/callback/ws/endpoint", self.ws_endpoint)
        app.router.add_get("/ws", self.ws)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, app: web.Application) -> None:
        self.closing = True
        await self.drop()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Any, within: float = 10.0) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(predicate)

    async def _upload(self, request: web.Request, field_name: str, key_name: str) -> web.Response:
        if (s := self._scripted(key_name)) is not None:
            return s
        if (denied := self._authorized(request)) is not None:
            return denied
        form = await request.post()
        upload = form.get(field_name)
        if not isinstance(upload, web.FileField):
            return web.json_response({"code": 234001, "msg": "Invalid request param."}, status=400)
        key = f"{key_name}_{next(self._ids)}"
        self.uploads[key] = (
            upload.filename,
            upload.file.read(),
            {k: str(v) for k, v in form.items() if not isinstance(v, web.FileField)},
        )
        return web.json_response({"code": 0, "msg": "success", "data": {key_name: key}})

    async def upload_image(self, request: web.Request) -> web.Response:
        return await self._upload(request, "image", "image_key")

    async def upload_file(self, request: web.Request) -> web.Response:
        return await self._upload(request, "file", "file_key")

    async def ws_endpoint(self, request: web.Request) -> web.Response:
        if (s := self._scripted("ws_endpoint")) is not None:
            return s
        body = await request.json()
        if body.get("AppSecret") != APP_SECRET:
            return web.json_response({"code": 514, "msg": "auth failed"})
        url = self.base.replace("http://", "ws://") + f"/ws?device_id=d{next(self._ids)}&service_id=7"
        config = {"ReconnectCount": -1, "ReconnectInterval": 120, "ReconnectNonce": 30, "PingInterval": 60}
        return web.json_response({"code": 0, "msg": "", "data": {"URL": url, "ClientConfig": config}})

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        if self.closing or request.query.get("service_id") != "7":
            raise web.HTTPForbidden()
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._socket = socket
        self.connections += 1
        await self._notify()
        for frames in list(self.unanswered.values()):  # Feishu delivers again what was not answered
            for frame in frames:
                await socket.send_bytes(encode(frame))
        async for message in socket:
            if message.type != WSMsgType.BINARY:
                continue
            frame = decode(message.data)
            if frame.method == CONTROL and frame.header("type") == "ping":
                self.pings += 1
                pong = Frame(
                    service=7,
                    method=CONTROL,
                    headers=[("type", "pong")],
                    payload=orjson.dumps({"PingInterval": 60}),
                )
                await socket.send_bytes(encode(pong))
            elif frame.method == DATA:
                self.answers.append(frame)
                if orjson.loads(frame.payload).get("code") == 200:
                    self.unanswered.pop(frame.header("message_id") or "", None)
            await self._notify()
        if self._socket is socket:
            self._socket = None
        await self._notify()
        return socket

    async def push_event(self, event: dict[str, Any], *, parts: int = 1) -> str:
        """Send one event over the long connection, in ``parts`` frames; due until answered 200."""
        message_id = f"ws-msg-{next(self._ids)}"
        payload = orjson.dumps(event)
        size = -(-len(payload) // parts)
        frames = [
            Frame(
                seq_id=next(self._ids),
                service=7,
                method=DATA,
                payload=payload[i * size : (i + 1) * size],
                headers=[
                    ("type", "event"),
                    ("message_id", message_id),
                    ("sum", str(parts)),
                    ("seq", str(i)),
                    ("trace_id", f"trace-{message_id}"),
                ],
            )
            for i in range(parts)
        ]
        self.unanswered[message_id] = frames
        socket = self._socket
        if socket is not None and not socket.closed:
            for frame in frames:
                await socket.send_bytes(encode(frame))
        if self.drop_after_next_event:
            self.drop_after_next_event = False
            await self.drop()
        return message_id

    async def redeliver(self) -> None:
        """Feishu's redelivery of what was not answered 200, on the open connection."""
        socket = self._socket
        if socket is not None and not socket.closed:
            for frames in list(self.unanswered.values()):
                for frame in frames:
                    await socket.send_bytes(encode(frame))

    async def drop(self) -> None:
        socket = self._socket
        if socket is not None:
            self._socket = None
            await socket.close()

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
            return web.json_response(
                {"code": 99991663, "msg": "Invalid access token for authorization."}, status=400
            )
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
        return web.Response(
            body=data,
            content_type=content_type,
            headers={"Content-Disposition": 'attachment; filename="resource.bin"'},
        )

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
        data = {
            "message_id": f"om_sent{next(self._ids):06d}",
            "chat_id": body.get("receive_id") or "oc_group",
            "msg_type": body.get("msg_type"),
        }
        if uuid:
            self.seen_uuids[uuid] = data
        return web.json_response({"code": 0, "msg": "success", "data": data})

    async def create(self, request: web.Request) -> web.Response:
        return await self._send(request, "create", {})

    async def reply(self, request: web.Request) -> web.Response:
        return await self._send(request, "reply", {"replying_to": request.match_info["message_id"]})
