"""What the web-chat tests share: settings, a session token, and a socket client that speaks the
widget's protocol."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from connectors.webchat import tokens
from core.settings import Settings

SESSION_SECRET = "test-chat-session-secret"
IDENTITY_SECRET = "test-chat-hmac-secret"
ORIGIN = "https://shop.example"


def chat_table(**channel: Any) -> dict[str, Any]:
    inbox = channel.pop("inbox", {})
    return {
        "session_secret": SESSION_SECRET,
        "ingest_timeout": 1.0,
        **channel,
        "inboxes": {
            "demo": {
                "identity_secret": IDENTITY_SECRET,
                "allowed_origins": [ORIGIN],
                "demo_page": True,
                **inbox,
            }
        },
    }


def settings_for(tmp_path: Path, *, channels: Mapping[str, Any] | None = None, **chat: Any) -> Settings:
    return Settings.model_validate(
        {
            "server": {"normalizer_process": False, "public_url": "http://gateway.test"},
            "store": {"path": str(tmp_path / "chat.db"), "blob_dir": str(tmp_path / "blobs")},
            "outbox": {"relay": "inline", "poll_interval": 0.05},
            "control": {"enabled": False},
            "tenants": {"demo": {}},
            "inboxes": {"demo": {"tenant": "demo"}},
            "channels": {"webchat": chat_table(**chat), **(channels or {})},
        }
    )


def token_for(
    session: str = "s-test-0001",
    *,
    user_id: str | None = None,
    email: str | None = None,
    issued: float = 1_900_000_000.0,
) -> str:
    return tokens.mint(
        SESSION_SECRET.encode(),
        tokens.Session(inbox="demo", session=session, issued=issued, user_id=user_id, email=email),
    )


class ChatSocket:
    """One widget's socket: hello, then frames in and out."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}

    async def send(self, frame: Mapping[str, Any]) -> None:
        await self.ws.send_bytes(orjson.dumps(frame))

    async def receive(self, timeout: float = 10.0) -> dict[str, Any]:
        message = await self.ws.receive(timeout=timeout)
        assert message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), message
        frame: dict[str, Any] = orjson.loads(message.data)
        return frame

    async def until(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.receive()
                if frame.get("type") == kind:
                    return frame

    async def hello(
        self, token: str | None = None, identity: Mapping[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        await self.send(
            {
                "type": "hello",
                "token": token,
                "lang": "en",
                **extra,
                **({"identity": dict(identity)} if identity else {}),
            }
        )
        self.welcome = await self.until("welcome")
        return self.welcome

    async def say(self, client_id: str, text: str) -> dict[str, Any]:
        await self.send(
            {"type": "message", "client_id": client_id, "text": text, "sent_at": "2026-12-05T08:00:00Z"}
        )
        async with asyncio.timeout(10):
            while True:
                frame = await self.receive()
                if frame.get("client_id") == client_id and frame["type"] in ("ack", "error"):
                    return frame

    async def close(self) -> None:
        await self.ws.close()
