"""A local HTTP server that answers like the WeChat / WeCom server APIs (documented JSON and error codes).

Endpoints: ``GET /cgi-bin/token`` (Official Account), ``GET /cgi-bin/gettoken`` (WeCom),
``GET /cgi-bin/media/get``, ``GET /cgi-bin/user/info`` and ``POST /cgi-bin/kf/sync_msg``. Tests
script failures by queueing JSON answers (``fail_next``), expire every token (``expire_tokens``),
and read what was asked.
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
        return app

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
