"""A local server that answers like LINE's Messaging API and content API, errors included, and the
in-memory context the LINE tests set the channel up on."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web

from core.channel import DeliveryStatus, ReplyFailure, SenderSpec
from tests.connectors.telegram.context import MemoryContext

# (status, JSON body, headers) answered before the real answer.
Scripted = tuple[int, dict[str, Any], dict[str, str]]


@dataclass
class SenderContext(MemoryContext):
    """:class:`MemoryContext` that also keeps the sender a channel registers."""

    senders: list[SenderSpec] = field(default_factory=list)
    deliveries: list[tuple[str, str]] = field(default_factory=list)

    def add_sender(self, spec: SenderSpec) -> None:
        self.senders.append(spec)

    async def report_delivery(
        self, provider_message_id: str, status: DeliveryStatus, *, at: datetime | None = None,
        reason: ReplyFailure | None = None, detail: str | None = None,
    ) -> bool:
        self.deliveries.append((provider_message_id, status))
        return True


@dataclass
class FakeLine:
    """Answers like api.line.me and api-data.line.me for one channel access token."""

    token: str
    contents: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    content_errors: dict[str, list[Scripted]] = field(default_factory=dict)
    send_errors: list[Scripted] = field(default_factory=list)
    valid_reply_tokens: set[str] = field(default_factory=set)
    # Push requests by retry key, as LINE remembers them (a repeat is 409).
    accepted: dict[str, str] = field(default_factory=dict)
    sent: list[dict[str, Any]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ids: int = 470_000_000_000

    async def wait(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(predicate)

    async def _answered(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/bot/message/{id}/content", self._content)
        app.router.add_post("/v2/bot/message/{call}", self._send)
        return app

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    @staticmethod
    def _error(scripted: Scripted) -> web.Response:
        status, body, headers = scripted
        return web.json_response(body, status=status, headers=headers)

    async def _content(self, request: web.Request) -> web.StreamResponse:
        self.calls["content"] += 1
        try:
            if not self._authorized(request):
                return web.json_response({"message": "Authentication failed"}, status=401)
            message_id = request.match_info["id"]
            errors = self.content_errors.get(message_id)
            if errors:
                return self._error(errors.pop(0))
            if message_id not in self.contents:
                return web.json_response({"message": "Not found"}, status=404)
            data, content_type = self.contents[message_id]
            return web.Response(body=data, content_type=content_type)
        finally:
            await self._answered()

    async def _send(self, request: web.Request) -> web.Response:
        call = request.match_info["call"]
        self.calls[call] += 1
        try:
            if not self._authorized(request):
                return web.json_response({"message": "Authentication failed. Confirm that the access token "
                                                     "in the authorization header is valid."}, status=401)
            if self.send_errors:
                return self._error(self.send_errors.pop(0))
            payload = await request.json()
            request_id = f"req-{len(self.sent) + len(self.accepted) + 1}"
            if call == "reply":
                token = payload.get("replyToken")
                if token not in self.valid_reply_tokens:
                    return web.json_response({"message": "Invalid reply token"}, status=400)
                self.valid_reply_tokens.discard(token)
            elif call == "push":
                key = request.headers.get("X-Line-Retry-Key")
                if key is not None and key in self.accepted:
                    return web.json_response(
                        {"message": "The retry key is already accepted"}, status=409,
                        headers={"x-line-accepted-request-id": self.accepted[key],
                                 "x-line-request-id": request_id},
                    )
                if key is not None:
                    self.accepted[key] = request_id
            else:
                return web.json_response({"message": "Not found"}, status=404)
            messages = payload["messages"]
            if any(len(m.get("text", "")) > 5000 for m in messages) or len(messages) > 5:
                return web.json_response({"message": "The request body has 1 error(s)",
                                          "details": [{"message": "Length must be between 0 and 5000",
                                                       "property": "messages[0].text"}]}, status=400)
            self.sent.append({"call": call, **payload})
            ids = []
            for _ in payload["messages"]:
                self._ids += 1
                ids.append({"id": str(self._ids), "quoteToken": f"qt{self._ids}"})
            return web.json_response({"sentMessages": ids}, headers={"x-line-request-id": request_id})
        finally:
            await self._answered()


def rate_limited(retry_after: str | None = None) -> Scripted:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return 429, {"message": "The API rate limit has been exceeded. Try again later."}, headers


def monthly_limit() -> Scripted:
    return 429, {"message": "You have reached your monthly limit."}, {}


def server_error() -> Scripted:
    return 500, {"message": "Internal server error"}, {}


def preparing() -> Scripted:
    return 202, {}, {}
