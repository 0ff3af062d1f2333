"""A local server that answers like X's API (DM send) and its DM media hosts, errors included."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# (status, JSON body, headers) answered before the real answer.
Scripted = tuple[int, dict[str, Any], dict[str, str]]


@dataclass
class FakeX:
    """Answers like api.x.com for one account's OAuth 1.0a credentials, and serves DM media."""

    consumer_key: str
    token: str
    media: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # path -> (bytes, type)
    media_errors: dict[str, list[Scripted]] = field(default_factory=dict)
    send_errors: list[Scripted] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/2/dm_conversations/with/{participant}/messages", self._send)
        app.router.add_get("/media/{path:.+}", self._media)
        return app

    def _signed(self, request: web.Request) -> bool:
        value = request.headers.get("Authorization", "")
        return (value.startswith("OAuth ") and f'oauth_consumer_key="{self.consumer_key}"' in value
                and f'oauth_token="{self.token}"' in value and "oauth_signature=" in value)

    async def _send(self, request: web.Request) -> web.Response:
        self.calls["send"] += 1
        if not self._signed(request):
            return web.json_response({"title": "Unauthorized", "type": "about:blank", "status": 401,
                                      "detail": "Unauthorized"}, status=401)
        if self.send_errors:
            status, body, headers = self.send_errors.pop(0)
            return web.json_response(body, status=status, headers=headers)
        payload = await request.json()
        participant = request.match_info["participant"]
        event_id = str(1_864_100_000_000_000_000 + len(self.sent))
        self.sent.append({"participant": participant, **payload})
        return web.json_response(
            {"data": {"dm_conversation_id": f"{participant}-1432107654321098752", "dm_event_id": event_id}},
            status=201,
        )

    async def _media(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        self.calls["media"] += 1
        errors = self.media_errors.get(path)
        if errors:
            status, body, headers = errors.pop(0)
            return web.json_response(body, status=status, headers=headers)
        if path.startswith("ton/") and not self._signed(request):
            return web.json_response({"errors": [{"code": 32, "message": "Could not authenticate you."}]},
                                     status=401)
        if path not in self.media:
            missing = {"errors": [{"code": 34, "message": "Sorry, that page does not exist."}]}
            return web.json_response(missing, status=404)
        data, content_type = self.media[path]
        return web.Response(body=data, content_type=content_type)


def too_many_requests(*, retry_after: str | None = None, reset: int | None = None) -> Scripted:
    headers: dict[str, str] = {}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    if reset is not None:
        headers["x-rate-limit-reset"] = str(reset)
    return 429, {"title": "Too Many Requests", "detail": "Too Many Requests", "type": "about:blank",
                 "status": 429}, headers


def forbidden() -> Scripted:
    return 403, {"title": "Forbidden", "type": "about:blank", "status": 403,
                 "detail": "You are not permitted to send a DM to this user."}, {}


def server_error() -> Scripted:
    return 503, {"title": "Service Unavailable", "detail": "Service Unavailable", "status": 503}, {}
