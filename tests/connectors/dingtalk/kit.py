"""DingTalk test helpers: robot messages as DingTalk sends them, and the HTTP callback's signature."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from connectors.dingtalk.bot import sign

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "dingtalk"
CORP, STAFF = "ding9f50b15bccd16741", "manager4821"


def robot(
    n: int,
    text: str | None = None,
    *,
    fixture: str = "text_single",
    webhook_base: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((FIXTURES / f"{fixture}.json").read_bytes())
    data["msgId"] = f"msg{n:08d}=="
    if text is not None:
        data["text"] = {"content": text}
    if webhook_base is not None:
        data["sessionWebhook"] = f"{webhook_base}/robot/sendBySession?session=s{n}"
        data["sessionWebhookExpiredTime"] = int(time.time() * 1000) + 90 * 60 * 1000
    data.update(fields)
    return data


def signed_headers(secret: str, *, at: float | None = None) -> dict[str, str]:
    timestamp = str(int((at if at is not None else time.time()) * 1000))
    return {"Content-Type": "application/json", "timestamp": timestamp, "sign": sign(timestamp, secret)}
