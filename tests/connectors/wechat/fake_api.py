"""A local HTTP server that answers like the WeChat / WeCom server APIs (documented JSON and error codes).

Endpoints: ``GET /cgi-bin/token`` and ``POST /cgi-bin/stable_token`` (Official Account),
``GET /cgi-bin/gettoken`` (WeCom), ``GET /cgi-bin/media/get``, ``GET /cgi-bin/user/info``,
``POST /cgi-bin/kf/sync_msg``, and the way back: ``POST /cgi-bin/message/custom/send`` (Official
Account customer-service message), ``POST /cgi-bin/message/send`` (WeCom app),
``POST /cgi-bin/kf/send_msg`` (微信客服, idempotent by ``msgid``), ``POST /cgi-bin/media/upload``
and ``POST /cgi-bin/media/uploadimg``. Tests script failures by queueing JSON answers
(``fail_next``), expire every token (``expire_tokens``), and read what was asked and sent.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

APP_ID, APP_SECRET = "wx0123456789abcdef", "oa-app-secret"
# A second Official Account of the same brand (same Open Platform account, so the same unionids).
APP_ID_2, APP_SECRET_2 = "wxfedcba9876543210", "oa-app-secret-2"
CORP_ID, CORP_SECRET = "ww0123456789abcdef", "corp-secret"


@dataclass
class FakeMedia:
    data: bytes
    content_type: str
    filename: str | None = None


@dataclass
class FakeWeChatApi:
    media: dict[str, FakeMedia] = field(default_factory=dict)
    # Official Account videos answer {"video_url": ...}; the bytes are served from /video/{id}.
    videos: dict[str, bytes] = field(default_factory=dict)
    kf_messages: list[dict[str, Any]] = field(default_factory=list)
    # (app id, openid) -> the user-info fields beyond openid (e.g. {"unionid": ...}); others: 40003
    users: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # When set, user/info answers only once it is set (to show the callback does not wait for it).
    user_info_gate: asyncio.Event | None = None
    token_apps: dict[str, str] = field(default_factory=dict)
    token_fetches: int = 0
    valid_tokens: set[str] = field(default_factory=set)
    # endpoint name ("token", "media", "user_info", "sync_msg") -> queued JSON answers given
    # before the real one
    failures: dict[str, deque[dict[str, Any]]] = field(default_factory=lambda: defaultdict(deque))
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    media_served: asyncio.Event = field(default_factory=asyncio.Event)
    base_url: str = ""
    # Serve every sync_msg from the first message, as after a lost cursor: idempotency must absorb it.
    ignore_cursor: bool = False
    # stable_token: the token each app id is handed out while it is valid
    stable: dict[str, str] = field(default_factory=dict)
    # what the way back delivered: (endpoint, body) of every accepted send, in order
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # uploaded media: media_id -> (type, file name, content type, bytes)
    uploads: dict[str, tuple[str, str, str, bytes]] = field(default_factory=dict)
    # WeCom message/send: userids the corp does not have (answered in "invaliduser", errcode 0)
    unknown_users: set[str] = field(default_factory=set)
    kf_msgids: dict[str, str] = field(default_factory=dict)
    # When set, kf/send_msg takes the message and then waits for it before answering (a crash of
    # the caller between WeChat's acceptance and its own commit).
    kf_answer_gate: asyncio.Event | None = None
    send_received: asyncio.Event = field(default_factory=asyncio.Event)

    def fail_next(self, endpoint: str, *answers: dict[str, Any]) -> None:
        self.failures[endpoint].extend(answers)

    def expire_tokens(self) -> None:
        self.valid_tokens.clear()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/cgi-bin/token", self._token)
        app.router.add_get("/cgi-bin/gettoken", self._gettoken)
        app.router.add_get("/cgi-bin/media/get", self._media)
        app.router.add_get("/cgi-bin/user/info", self._user_info)
        app.router.add_post("/cgi-bin/kf/sync_msg", self._sync_msg)
        app.router.add_get("/video/{id}", self._video)
        app.router.add_post("/cgi-bin/stable_token", self._stable_token)
        app.router.add_post("/cgi-bin/message/custom/send", self._custom_send)
        app.router.add_post("/cgi-bin/message/send", self._message_send)
        app.router.add_post("/cgi-bin/kf/send_msg", self._kf_send)
        app.router.add_post("/cgi-bin/media/upload", self._upload)
        app.router.add_post("/cgi-bin/media/uploadimg", self._uploadimg)
        return app

    def stable_calls(self) -> list[dict[str, Any]]:
        return [body for name, body in self.calls if name == "stable_token"]

    async def _stable_token(self, request: web.Request) -> web.Response:
        """``POST /cgi-bin/stable_token``: the same token while it is valid; ``force_refresh`` hands
        out a new one and the old one stops working."""
        body = await request.json()
        self.calls.append(("stable_token", {k: v for k, v in body.items() if k != "secret"}))
        if (scripted := self._scripted("token")) is not None:
            return scripted
        secrets = {APP_ID: APP_SECRET, APP_ID_2: APP_SECRET_2}
        app_id = body.get("appid")
        if body.get("grant_type") != "client_credential" or app_id not in secrets:
            return web.json_response({"errcode": 40013, "errmsg": "invalid appid"})
        if body.get("secret") != secrets[app_id]:
            return web.json_response({"errcode": 40125, "errmsg": "invalid appsecret"})
        current = self.stable.get(app_id)
        if current in self.valid_tokens and not body.get("force_refresh"):
            return web.json_response({"access_token": current, "expires_in": 7000})
        if current is not None:
            self.valid_tokens.discard(current)
        answer = self._new_token(app_id)
        self.stable[app_id] = f"ACCESS_TOKEN_{self.token_fetches}"
        return answer

    async def _sending(
        self, request: web.Request, endpoint: str
    ) -> tuple[dict[str, Any], web.Response | None]:
        body = await request.json()
        self.calls.append((endpoint, body))
        if (refused := self._token_error(request)) is not None:
            return body, refused
        if (scripted := self._scripted(endpoint)) is not None:
            return body, scripted
        for kind in ("image", "voice", "video", "file"):
            media_id = body.get(kind, {}).get("media_id") if isinstance(body.get(kind), dict) else None
            if media_id is not None and media_id not in self.uploads:
                return body, web.json_response({"errcode": 40007, "errmsg": "invalid media_id"})
        return body, None

    def _delivered(self, endpoint: str, body: dict[str, Any]) -> None:
        self.sent.append((endpoint, body))
        self.send_received.set()

    async def _custom_send(self, request: web.Request) -> web.Response:
        body, refused = await self._sending(request, "custom_send")
        if refused is not None:
            return refused
        if not str(body.get("touser", "")).startswith("o"):
            return web.json_response({"errcode": 40003, "errmsg": "invalid openid"})
        self._delivered("custom_send", body)
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def _message_send(self, request: web.Request) -> web.Response:
        body, refused = await self._sending(request, "message_send")
        if refused is not None:
            return refused
        users = str(body.get("touser", "")).split("|")
        invalid = [u for u in users if u in self.unknown_users]
        if len(invalid) == len(users):
            return web.json_response({"errcode": 81013, "errmsg": "user & party & tag all invalid"})
        self._delivered("message_send", body)
        msgid = f"wecom-msg-{len(self.sent)}"
        return web.json_response(
            {"errcode": 0, "errmsg": "ok", "invaliduser": "|".join(invalid), "msgid": msgid}
        )

    async def _kf_send(self, request: web.Request) -> web.Response:
        body, refused = await self._sending(request, "kf_send")
        if refused is not None:
            return refused
        msgid = body.get("msgid")
        if msgid is not None and (len(msgid) > 32 or not all(c.isalnum() or c in "_-" for c in msgid)):
            return web.json_response({"errcode": 40058, "errmsg": "msgid exceed max length"})
        if msgid is not None and msgid in self.kf_msgids:
            # The same msgid again: WeChat keeps one message per msgid.
            return web.json_response({"errcode": 0, "errmsg": "ok", "msgid": msgid})
        msgid = msgid or f"kf-msg-{len(self.sent) + 1}"
        self.kf_msgids[msgid] = body.get("touser", "")
        self._delivered("kf_send", body)
        if self.kf_answer_gate is not None:
            await self.kf_answer_gate.wait()
        return web.json_response({"errcode": 0, "errmsg": "ok", "msgid": msgid})

    async def _upload(self, request: web.Request) -> web.Response:
        self.calls.append(("upload", dict(request.query)))
        if (refused := self._token_error(request)) is not None:
            return refused
        if (scripted := self._scripted("upload")) is not None:
            return scripted
        kind = request.query.get("type", "")
        if kind not in ("image", "voice", "video", "file", "thumb"):
            return web.json_response({"errcode": 40004, "errmsg": "invalid media type"})
        form = await request.post()
        part = form.get("media")
        if not isinstance(part, web.FileField):
            return web.json_response({"errcode": 41005, "errmsg": "media data missing"})
        data = part.file.read()
        media_id = f"MEDIA_{len(self.uploads) + 1}"
        self.uploads[media_id] = (kind, part.filename, part.content_type, data)
        return web.json_response({"errcode": 0, "type": kind, "media_id": media_id, "created_at": 1})

    async def _uploadimg(self, request: web.Request) -> web.Response:
        self.calls.append(("uploadimg", dict(request.query)))
        if (refused := self._token_error(request)) is not None:
            return refused
        form = await request.post()
        part = form.get("media")
        if not isinstance(part, web.FileField):
            return web.json_response({"errcode": 41005, "errmsg": "media data missing"})
        name = f"IMG_{len(self.uploads) + 1}"
        self.uploads[name] = ("uploadimg", part.filename, part.content_type, part.file.read())
        return web.json_response({"url": f"http://mmbiz.qpic.cn/mmbiz/{name}/0"})

    def _scripted(self, endpoint: str) -> web.Response | None:
        queue = self.failures.get(endpoint)
        if queue:
            # WeChat serves its JSON errors as text/plain.
            return web.Response(body=orjson.dumps(queue.popleft()), content_type="text/plain")
        return None

    def _new_token(self, app_id: str = "") -> web.Response:
        self.token_fetches += 1
        token = f"ACCESS_TOKEN_{self.token_fetches}"
        self.valid_tokens.add(token)
        self.token_apps[token] = app_id
        return web.json_response({"access_token": token, "expires_in": 7200})

    async def _token(self, request: web.Request) -> web.Response:
        q = request.query
        self.calls.append(("token", dict(q)))
        if (scripted := self._scripted("token")) is not None:
            return scripted
        secrets = {APP_ID: APP_SECRET, APP_ID_2: APP_SECRET_2}
        if q.get("grant_type") != "client_credential" or q.get("appid") not in secrets:
            return web.json_response({"errcode": 40013, "errmsg": "invalid appid"})
        if q.get("secret") != secrets[q["appid"]]:
            return web.json_response({"errcode": 40125, "errmsg": "invalid appsecret"})
        return self._new_token(q["appid"])

    async def _gettoken(self, request: web.Request) -> web.Response:
        q = request.query
        self.calls.append(("gettoken", dict(q)))
        if (scripted := self._scripted("token")) is not None:
            return scripted
        if q.get("corpid") != CORP_ID or q.get("corpsecret") != CORP_SECRET:
            return web.json_response({"errcode": 40001, "errmsg": "invalid credential"})
        return self._new_token()

    def _token_error(self, request: web.Request) -> web.Response | None:
        token = request.query.get("access_token", "")
        if token not in self.valid_tokens:
            code = 42001 if token.startswith("ACCESS_TOKEN_") else 40014
            return web.json_response({"errcode": code, "errmsg": "access_token expired"})
        return None

    async def _media(self, request: web.Request) -> web.Response:
        self.calls.append(("media", dict(request.query)))
        if (refused := self._token_error(request)) is not None:
            return refused
        if (scripted := self._scripted("media")) is not None:
            return scripted
        media_id = request.query.get("media_id", "")
        if media_id in self.videos:
            return web.json_response({"video_url": f"{self.base_url}/video/{media_id}"})
        media = self.media.get(media_id)
        if media is None:
            return web.Response(
                body=orjson.dumps({"errcode": 40007, "errmsg": "invalid media_id"}), content_type="text/plain"
            )
        headers = (
            {"Content-Disposition": f'attachment; filename="{media.filename}"'} if media.filename else {}
        )
        self.media_served.set()
        return web.Response(body=media.data, content_type=media.content_type, headers=headers)

    async def _user_info(self, request: web.Request) -> web.Response:
        """``GET /cgi-bin/user/info``: a follower's profile; ``unionid`` only when the account is
        bound to an Open Platform account (``users`` says so)."""
        self.calls.append(("user_info", dict(request.query)))
        if self.user_info_gate is not None:
            await self.user_info_gate.wait()
        if (refused := self._token_error(request)) is not None:
            return refused
        if (scripted := self._scripted("user_info")) is not None:
            return scripted
        app_id = self.token_apps.get(request.query["access_token"], "")
        openid = request.query.get("openid", "")
        user = self.users.get((app_id, openid))
        if user is None:
            return web.json_response({"errcode": 40003, "errmsg": "invalid openid"})
        return web.json_response(
            {"subscribe": 1, "openid": openid, "language": request.query.get("lang", "en"), **user}
        )

    async def _video(self, request: web.Request) -> web.Response:
        return web.Response(body=self.videos[request.match_info["id"]], content_type="video/mp4")

    async def _sync_msg(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("sync_msg", body))
        if (refused := self._token_error(request)) is not None:
            return refused
        if (scripted := self._scripted("sync_msg")) is not None:
            return scripted
        start = 0 if self.ignore_cursor else int(body.get("cursor") or 0)
        limit = int(body.get("limit", 1000))
        wanted = [
            m for m in self.kf_messages if not body.get("open_kfid") or m["open_kfid"] == body["open_kfid"]
        ]
        page = wanted[start : start + limit]
        end = start + len(page)
        return web.json_response(
            {
                "errcode": 0,
                "errmsg": "ok",
                "next_cursor": str(end),
                "has_more": 1 if end < len(wanted) else 0,
                "msg_list": page,
            }
        )
