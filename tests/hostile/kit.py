"""A whole gateway for attacker-input tests: every HTTP channel, the desk API and SMTP, on one store.

The gateway is :func:`gateway.app.create_app` (real channel contexts, pipeline, store, inline relay
to an in-memory publisher), served on a real port, so a test can send bytes no HTTP client library
would (:func:`raw_http`) and talk SMTP with a real client. The store is SQLite or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.wechat.security import CallbackSecurity, signature
from core.settings import Settings
from gateway.app import Overrides, create_app
from gateway.publisher import MemoryPublisher
from gateway.store import build_store
from gateway.store.base import Store

Client = TestClient[web.Request, web.Application]
TENANT = INBOX = "demo"
DOUYIN_SECRET, WEIBO_SECRET = "hostile-douyin-secret", "hostile-weibo-secret"
API_KEY = "hostile-api-key-0123456789"
DESK_KEY = "hostile-desk-key-0123456789"
TG_SECRET = "hostile-telegram-secret"
WX_TOKEN, WX_AES = "hostile-token", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
WX_APP = "wx0123456789abcdef"
MAILBOX = "support@demo.example"
BLOB_TOKEN = "hostile-blob-token-0123456789"
FORM_ORIGIN = "https://shop.example"
FORM_LIMIT = 64 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_for(tmp_path: Path, store: Mapping[str, Any], smtp_port: int) -> Settings:
    return Settings.model_validate({
        "server": {
            "normalizer_process": False, "public_url": "http://gateway.test", "blob_token": BLOB_TOKEN,
            "blob_auth_failures_burst": 3,
        },
        "store": {"path": str(tmp_path / "gateway.db"), "blob_dir": str(tmp_path / "blobs"), **store},
        "outbox": {"relay": "inline", "poll_interval": 0.05},
        "control": {"enabled": False},
        "tenants": {TENANT: {}},
        "inboxes": {INBOX: {"tenant": TENANT}},
        "channels": {
            "api": {"inboxes": {INBOX: {"keys": [API_KEY]}}, "auth_failures_burst": 3},
            "identity": {"keys": [DESK_KEY], "auth_failures_burst": 3},
            "form": {
                "max_body_bytes": FORM_LIMIT, "rate_limit_burst": 1000,
                "inboxes": {INBOX: {"allowed_origins": [FORM_ORIGIN]}},
            },
            "telegram": {"inboxes": {INBOX: {
                "bot_token": "123456:hostile-bot-token", "secret_token": TG_SECRET, "fetch_media": False,
            }}},
            "wechat": {"accounts": {INBOX: {
                "inbox": INBOX, "token": WX_TOKEN, "encoding_aes_key": WX_AES, "app_id": WX_APP,
            }}},
            "douyin": {"apps": {INBOX: {
                "inbox": INBOX, "client_key": "awhostile", "client_secret": DOUYIN_SECRET,
            }}},
            "weibo": {"accounts": {INBOX: {"inbox": INBOX, "app_secret": WEIBO_SECRET}}},
            "email": {
                "smtp": {"host": "127.0.0.1", "port": smtp_port},
                "inboxes": {INBOX: {"addresses": [MAILBOX]}},
            },
        },
    })


@dataclass(slots=True, kw_only=True)
class Gateway:
    client: Client
    store: Store
    bus: MemoryPublisher
    smtp_port: int

    @property
    def port(self) -> int:
        port = self.client.port
        assert port is not None
        return port

    async def raw_http(self, head: bytes, body: bytes = b"", *, chunked: bool = False) -> tuple[int, bytes]:
        """Send ``head`` (request line and headers, CRLF-separated, no final blank line) and ``body``
        as they are (``chunked``: in 8 KiB chunks, without Content-Length); the answer's status and
        body."""
        if chunked:
            pieces = [body[i : i + 8192] for i in range(0, len(body), 8192)]
            framing = b"\r\nTransfer-Encoding: chunked"
            body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
        else:
            framing = f"\r\nContent-Length: {len(body)}".encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(head + framing + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        status_line, _, rest = answer.partition(b"\r\n")
        return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]

    async def events(self, count: int) -> list[dict[str, Any]]:
        """The first ``count`` events published (waiting for them)."""
        async with asyncio.timeout(10), self.bus.changed:
            await self.bus.changed.wait_for(lambda: len(self.bus.published) >= count)
        return [orjson.loads(m.body) for m in self.bus.published]


@asynccontextmanager
async def running(tmp_path: Path, store: Mapping[str, Any]) -> AsyncIterator[Gateway]:
    smtp_port = free_port()
    settings = settings_for(tmp_path, store, smtp_port)
    real = build_store(settings)
    bus = MemoryPublisher()
    client: Client = TestClient(TestServer(create_app(settings, Overrides(store=real, publisher=bus))))
    await client.start_server()
    try:
        yield Gateway(client=client, store=real, bus=bus, smtp_port=smtp_port)
    finally:
        await client.close()


def api_message(**fields: Any) -> bytes:
    return orjson.dumps({"customer": {"email": "alice@customer.example"}, "text": "hello", **fields})


WECHAT = CallbackSecurity(
    flavor="official_account", receive_id=WX_APP, tokens=(WX_TOKEN,), aes_keys=(WX_AES,)
)


def wechat_callback(plaintext: str) -> tuple[str, bytes]:
    """A signed, encrypted Official Account callback carrying ``plaintext``: (path with query, body)."""
    encrypt = WECHAT.encrypt(plaintext)
    timestamp, nonce = str(int(time.time())), "nonce"
    query = (
        f"msg_signature={signature(WX_TOKEN, timestamp, nonce, encrypt)}"
        f"&timestamp={timestamp}&nonce={nonce}&encrypt_type=aes"
    )
    body = f"<xml><ToUserName>x</ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    return f"/wechat/{INBOX}?{query}", body.encode()
