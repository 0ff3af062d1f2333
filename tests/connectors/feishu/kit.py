"""Feishu test helpers: events encrypted and signed as Feishu sends them."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import orjson

from connectors.feishu.crypto import encrypt, signature

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "feishu"
APP_ID, TENANT_KEY = "cli_a1b2c3d4e5f60001", "2ca1d211f64f6438"
EMPLOYEE = "ou_84aad35d084aa403a838cf73ee18467"


def event(
    n: int, text: str | None = None, *, token: str, fixture: str = "text_p2p", **message: Any
) -> dict[str, Any]:
    """The fixture with message id, event id and text of message ``n``."""
    data: dict[str, Any] = orjson.loads((FIXTURES / f"{fixture}.json").read_bytes())
    data["header"]["token"] = token
    data["header"]["event_id"] = f"ev-{n:08d}-{secrets.token_hex(4)}"
    msg = data["event"]["message"]
    msg["message_id"] = f"om_{n:032d}"
    if text is not None:
        msg["content"] = orjson.dumps({"text": text}).decode()
    msg.update(message)
    return data


def sealed(plain: dict[str, Any] | bytes, key: str) -> bytes:
    """``{"encrypt": ...}`` of the callback."""
    raw = plain if isinstance(plain, bytes) else orjson.dumps(plain)
    return orjson.dumps({"encrypt": encrypt(raw, key)})


def signed_headers(
    key: str, body: bytes, *, at: float | None = None, nonce: str | None = None
) -> dict[str, str]:
    timestamp = str(int(at if at is not None else time.time()))
    nonce = nonce if nonce is not None else secrets.token_hex(8)
    return {
        "Content-Type": "application/json",
        "X-Lark-Request-Timestamp": timestamp,
        "X-Lark-Request-Nonce": nonce,
        "X-Lark-Signature": signature(timestamp, nonce, key, body),
    }
