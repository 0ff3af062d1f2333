"""Slack test helpers: signed Events API requests and callbacks shaped as Slack sends them."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import orjson
from slack_sdk.signature import SignatureVerifier

TEAM, OTHER_TEAM, BOT_USER, APP = "T0TICKETS", "T0PARTNER", "U0BOT", "A0TICKETS"


def signed_headers(secret: str, body: bytes, *, at: float | None = None) -> dict[str, str]:
    """The headers Slack sends: ``X-Slack-Request-Timestamp`` and the ``v0=`` signature over both."""
    timestamp = str(int(at if at is not None else time.time()))
    try:
        signature = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body)
    except UnicodeDecodeError:  # the SDK signs text; Slack's algorithm is over the raw bytes
        digest = hmac.new(secret.encode(), b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256)
        signature = f"v0={digest.hexdigest()}"
    assert signature is not None
    return {
        "Content-Type": "application/json",
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": signature,
    }


def callback(event: dict[str, Any], *, event_id: str, team: str = TEAM, **more: Any) -> dict[str, Any]:
    return {
        "token": "legacy-verification-token",
        "team_id": team,
        "api_app_id": APP,
        "event": event,
        "type": "event_callback",
        "event_id": event_id,
        "event_time": 1_764_900_000,
        "authorizations": [
            {"enterprise_id": None, "team_id": team, "user_id": BOT_USER, "is_bot": True,
             "is_enterprise_install": False},
        ],
        "is_ext_shared_channel": False,
        **more,
    }


def dm(n: int, text: str | None = None, **event: Any) -> dict[str, Any]:
    """A direct message to the app from user ``n``."""
    ts = f"1764900{n:03d}.{n:06d}"
    message = {
        "type": "message", "channel": f"D0{n:08d}", "channel_type": "im", "user": f"U0{n:08d}",
        "team": TEAM, "text": text if text is not None else f"message {n}", "ts": ts, "event_ts": ts,
        **event,
    }
    return callback(message, event_id=f"Ev0{n:08d}")


def body(value: dict[str, Any]) -> bytes:
    return orjson.dumps(value)
