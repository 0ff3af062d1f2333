"""A local server that answers like Slack: the Web API methods the channel calls (users.info,
files.info, file downloads, chat.postMessage, conversations.open, apps.connections.open) with Slack's
error shapes (``{"ok": false, "error": ...}``, 429 with ``Retry-After``), and a Socket Mode WebSocket
that speaks the envelope protocol (``hello``, ``events_api`` envelopes, acknowledgements by
``envelope_id``, ``disconnect``)."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

BOT_TOKEN, APP_TOKEN = "xoxb-test-bot-token", "xapp-1-test-app-token"


@dataclass
class FakeSlack:
    """Scripted answers per method; everything it was asked is recorded."""

    base: str = ""  # set once served: "http://127.0.0.1:port"
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # id -> (bytes, mimetype)
    # method -> answers to give first, in order: (HTTP status, body, headers)
    errors: dict[str, list[tuple[int, dict[str, Any], dict[str, str]]]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    delays: dict[str, float] = field(default_factory=dict)  # method -> seconds before answering
    answered: Counter[str] = field(default_factory=Counter)
    posted: list[dict[str, Any]] = field(default_factory=list)
    uploaded: dict[str, bytes] = field(default_factory=dict)
    completed: list[dict[str, Any]] = field(default_factory=list)
    # Socket Mode
    to_send: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    acks: list[str] = field(default_factory=list)
    connections: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._method)
        app.router.add_get("/files/{file_id}", self._file)
        app.router.add_get("/link", self._socket)
        app.router.add_post("/upload/{file_id}", self._upload)
        return app

    async def wait(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def fail(self, method: str, error: str, *, status: int = 200, headers: dict[str, str] | None = None,
             times: int = 1) -> None:
        self.errors.setdefault(method, []).extend(
            [(status, {"ok": False, "error": error}, headers or {})] * times
        )

    async def _method(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        self.calls[method] += 1
        await asyncio.sleep(self.delays.get(method, 0.0))
        try:
            return await self._answer(request, method)
        finally:
            self.answered[method] += 1
            await self._notify()

    async def _answer(self, request: web.Request, method: str) -> web.Response:
        args: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            args.update(await request.json())
        elif request.can_read_body:
            args.update(await request.post())
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        wanted = APP_TOKEN if method == "apps.connections.open" else BOT_TOKEN
        if token != wanted:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        scripted = self.errors.get(method)
        if scripted:
            status, body, headers = scripted.pop(0)
            return web.json_response(body, status=status, headers=headers)
        if method == "users.info":
            user = self.users.get(str(args.get("user")))
            if user is None:
                return web.json_response({"ok": False, "error": "user_not_found"})
            return web.json_response({"ok": True, "user": user})
        if method == "files.info":
            file_id = str(args.get("file"))
            if file_id not in self.files:
                return web.json_response({"ok": False, "error": "file_not_found"})
            data, mimetype = self.files[file_id]
            url = f"{self.base}/files/{file_id}"
            return web.json_response({"ok": True, "file": {
                "id": file_id, "name": f"{file_id}.bin", "mimetype": mimetype, "size": len(data),
                "mode": "hosted",
                "url_private": url, "url_private_download": url,
            }})
        if method == "chat.postMessage":
            self.posted.append(args)
            ts = f"1764990000.{next(self._ts):06d}"
            return web.json_response({"ok": True, "channel": args["channel"], "ts": ts,
                                      "message": {"text": args.get("text"), "ts": ts, "bot_id": "B0TICKETS"}})
        if method == "files.getUploadURLExternal":
            file_id = f"F0UP{next(self._ts):06d}"
            upload_url = f"{self.base}/upload/{file_id}"
            return web.json_response({"ok": True, "file_id": file_id, "upload_url": upload_url})
        if method == "files.completeUploadExternal":
            files = args["files"] if isinstance(args["files"], list) else orjson.loads(args["files"])
            self.completed.append({**args, "files": files})
            if any(f["id"] not in self.uploaded for f in files):
                return web.json_response({"ok": False, "error": "file_not_found"})
            shared = [{"id": f["id"], "title": f.get("title")} for f in files]
            return web.json_response({"ok": True, "files": shared})
        if method == "conversations.open":
            return web.json_response({"ok": True, "channel": {"id": f"D0{str(args.get('users'))[2:]}"}})
        if method == "apps.connections.open":
            return web.json_response({"ok": True, "url": f"{self.base.replace('http', 'ws', 1)}/link"})
        return web.json_response({"ok": False, "error": "unknown_method"}, status=404)

    async def _upload(self, request: web.Request) -> web.Response:
        self.uploaded[request.match_info["file_id"]] = await request.read()
        return web.Response(text="OK - 1", content_type="text/plain")

    async def _file(self, request: web.Request) -> web.Response:
        self.calls["download"] += 1
        await self._notify()
        if request.headers.get("Authorization") != f"Bearer {BOT_TOKEN}":
            # What files.slack.com does without a valid token: a redirect to the sign-in page.
            raise web.HTTPFound("https://slack.com/signin")
        found = self.files.get(request.match_info["file_id"])
        if found is None:
            return web.Response(status=404)
        return web.Response(body=found[0], content_type=found[1])

    # --- Socket Mode -------------------------------------------------------------------------------

    def envelope(self, payload: dict[str, Any], **more: Any) -> dict[str, Any]:
        """Queue an ``events_api`` envelope for the connected client; returns it."""
        envelope = {"envelope_id": str(uuid.uuid4()), "payload": payload, "type": "events_api",
                    "accepts_response_payload": False, **more}
        self.to_send.put_nowait(envelope)
        return envelope

    def disconnect(self, reason: str = "refresh_requested") -> None:
        self.to_send.put_nowait({"type": "disconnect", "reason": reason,
                                 "debug_info": {"host": "applink-test"}})

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(autoping=True)
        await socket.prepare(request)
        self.connections += 1
        await socket.send_str(orjson.dumps({
            "type": "hello", "num_connections": 1,
            "debug_info": {"host": "applink-test", "approximate_connection_time": 18060},
            "connection_info": {"app_id": "A0TICKETS"},
        }).decode())
        await self._notify()
        sender = asyncio.ensure_future(self._pump(socket))
        try:
            async for frame in socket:
                if frame.type == WSMsgType.TEXT:
                    answer = orjson.loads(frame.data)
                    if isinstance(answer, dict) and isinstance(answer.get("envelope_id"), str):
                        self.acks.append(answer["envelope_id"])
                        await self._notify()
        finally:
            sender.cancel()
        return socket

    async def _pump(self, socket: web.WebSocketResponse) -> None:
        while not socket.closed:
            message = await self.to_send.get()
            await socket.send_str(orjson.dumps(message).decode())
            if message.get("type") == "disconnect":
                # Slack closes the socket shortly after asking the client to reconnect.
                await asyncio.sleep(0.2)
                await socket.close()
                return
