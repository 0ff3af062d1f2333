"""A local server that answers like DingTalk: the access token, the Stream gateway (connections/open
and the WebSocket speaking the Stream protocol: pings, callbacks redelivered until acknowledged,
disconnects), the robot file download, the directory, the robot send APIs and session webhooks."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

APP_KEY, APP_SECRET = "dingfakeappkey01", "fake-dingtalk-app-secret"
TOPIC = "/v1.0/im/bot/messages/get"
Scripted = tuple[int, dict[str, Any], dict[str, str]]


@dataclass
class FakeDingTalk:
    base: str = ""
    staff: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    sent: list[dict[str, Any]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    scripted: dict[str, list[Scripted]] = field(default_factory=dict)
    acks: list[dict[str, Any]] = field(default_factory=list)
    unacked: dict[str, dict[str, Any]] = field(default_factory=dict)
    connections: int = 0
    tokens_issued: int = 0
    # Close the socket right after sending the next callback (before its acknowledgement can arrive).
    drop_after_next_callback: bool = False
    closing: bool = False
    _socket: web.WebSocketResponse | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1.0/oauth2/accessToken", self.token)
        app.router.add_post("/v1.0/gateway/connections/open", self.open)
        app.router.add_get("/connect", self.connect)
        app.router.add_post("/v1.0/robot/messageFiles/download", self.download)
        app.router.add_get("/files/{code}", self.file)
        app.router.add_post("/topapi/v2/user/get", self.user)
        app.router.add_post("/v1.0/robot/oToMessages/batchSend", self.one_to_one)
        app.router.add_post("/v1.0/robot/groupMessages/send", self.group)
        app.router.add_post("/robot/sendBySession", self.session)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, app: web.Application) -> None:
        self.closing = True
        await self.drop()

    def script(self, name: str, *answers: Scripted) -> None:
        self.scripted.setdefault(name, []).extend(answers)

    def _scripted(self, name: str) -> web.Response | None:
        self.calls[name] += 1
        queue = self.scripted.get(name)
        if queue:
            status, body, headers = queue.pop(0)
            return web.json_response(body, status=status, headers=headers)
        return None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Any, within: float = 10.0) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(predicate)

    # -- tokens -------------------------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        if (s := self._scripted("token")) is not None:
            return s
        body = await request.json()
        if body.get("appKey") != APP_KEY or body.get("appSecret") != APP_SECRET:
            return web.json_response({"code": "invalidClientIdOrSecret", "message": "bad secret"}, status=400)
        self.tokens_issued += 1
        return web.json_response({"accessToken": f"dt-fake-{self.tokens_issued}", "expireIn": 7200})

    def _authorized(self, request: web.Request) -> bool:
        token = request.headers.get("x-acs-dingtalk-access-token") or request.query.get("access_token", "")
        return token.startswith("dt-fake-")

    # -- Stream -------------------------------------------------------------------------------------

    async def open(self, request: web.Request) -> web.Response:
        if (s := self._scripted("open")) is not None:
            return s
        body = await request.json()
        if body.get("clientId") != APP_KEY or body.get("clientSecret") != APP_SECRET:
            return web.json_response({"code": "invalidClientIdOrSecret", "message": "bad"}, status=401)
        assert body["subscriptions"] == [{"type": "CALLBACK", "topic": TOPIC}]
        endpoint = self.base.replace("http://", "ws://") + "/connect"
        return web.json_response({"endpoint": endpoint, "ticket": f"ticket-{next(self._ids)}"})

    async def connect(self, request: web.Request) -> web.WebSocketResponse:
        if self.closing or not request.query.get("ticket", "").startswith("ticket-"):
            raise web.HTTPUnauthorized()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._socket = ws
        self.connections += 1
        await self._notify()
        for frame in list(self.unacked.values()):  # DingTalk redelivers what was not acknowledged
            await ws.send_str(orjson.dumps(frame).decode())
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            answer = orjson.loads(message.data)
            self.acks.append(answer)
            message_id = answer.get("headers", {}).get("messageId")
            if answer.get("code") == 200:
                self.unacked.pop(message_id, None)
            await self._notify()
        if self._socket is ws:
            self._socket = None
        await self._notify()
        return ws

    async def callback(self, robot: dict[str, Any]) -> str:
        """Send one robot message as a CALLBACK frame; it stays due until acknowledged."""
        message_id = f"stream-msg-{next(self._ids)}"
        frame = {
            "specVersion": "1.0",
            "type": "CALLBACK",
            "headers": {
                "appId": "app",
                "connectionId": "c",
                "contentType": "application/json",
                "messageId": message_id,
                "time": "1764921600000",
                "topic": TOPIC,
            },
            "data": orjson.dumps(robot).decode(),
        }
        self.unacked[message_id] = frame
        await self.system("", frame=frame)
        if self.drop_after_next_callback:
            self.drop_after_next_callback = False
            await self.drop()
        return message_id

    async def system(self, topic: str, *, frame: dict[str, Any] | None = None) -> str:
        message_id = f"sys-{next(self._ids)}"
        frame = frame or {
            "specVersion": "1.0",
            "type": "SYSTEM",
            "headers": {
                "contentType": "application/json",
                "messageId": message_id,
                "topic": topic,
                "time": "1764921600000",
            },
            "data": orjson.dumps({"opaque": topic}).decode(),
        }
        ws = self._socket
        if ws is not None and not ws.closed:
            await ws.send_str(orjson.dumps(frame).decode())
        return message_id

    async def redeliver(self) -> None:
        """DingTalk's redelivery of what was not acknowledged, on the open connection."""
        ws = self._socket
        if ws is not None and not ws.closed:
            for frame in list(self.unacked.values()):
                await ws.send_str(orjson.dumps(frame).decode())

    async def drop(self) -> None:
        ws = self._socket
        if ws is not None:
            self._socket = None
            await ws.close()

    # -- files, directory, sending ------------------------------------------------------------------

    async def download(self, request: web.Request) -> web.Response:
        if (s := self._scripted("download")) is not None:
            return s
        if not self._authorized(request):
            return web.json_response({"code": "InvalidAuthentication", "message": "token"}, status=401)
        body = await request.json()
        if body.get("downloadCode") not in self.files:
            return web.json_response({"code": "resource.not.found", "message": "unknown code"}, status=400)
        return web.json_response(
            {"downloadUrl": f"{self.base}/files/{body['downloadCode'].replace('/', '_')}"}
        )

    async def file(self, request: web.Request) -> web.Response:
        for code, (data, content_type) in self.files.items():
            if code.replace("/", "_") == request.match_info["code"]:
                return web.Response(body=data, content_type=content_type)
        raise web.HTTPNotFound()

    async def user(self, request: web.Request) -> web.Response:
        if (s := self._scripted("user")) is not None:
            return s
        if not self._authorized(request):
            return web.json_response({"errcode": 40014, "errmsg": "invalid access_token"})
        body = await request.json()
        user = self.staff.get(body.get("userid"))
        if user is None:
            return web.json_response({"errcode": 60121, "errmsg": "user not found"})
        return web.json_response({"errcode": 0, "errmsg": "ok", "result": user})

    async def _send(self, request: web.Request, name: str) -> web.Response:
        if (s := self._scripted(name)) is not None:
            return s
        if not self._authorized(request):
            return web.json_response({"code": "InvalidAuthentication", "message": "token"}, status=401)
        self.sent.append({**await request.json(), "api": name})
        return web.json_response({"processQueryKey": f"pqk-{next(self._ids)}"})

    async def one_to_one(self, request: web.Request) -> web.Response:
        return await self._send(request, "batchSend")

    async def group(self, request: web.Request) -> web.Response:
        return await self._send(request, "groupSend")

    async def session(self, request: web.Request) -> web.Response:
        if (s := self._scripted("session")) is not None:
            return s
        self.sent.append({**await request.json(), "api": "session", "session": request.query.get("session")})
        return web.json_response({"errcode": 0, "errmsg": "ok"})
