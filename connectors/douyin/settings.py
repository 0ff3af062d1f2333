"""``[channels.douyin]``: Douyin Open Platform (抖音开放平台) apps, each answered at
``POST /douyin/{name}`` and tied to one inbox."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from core.settings import ChannelSettings, Duration, Secret

DEFAULT_API_BASE = "https://open.douyin.com"
# Douyin disconnects after 5 s and retries three times (webhooks/summarize).
DOUYIN_DEADLINE = 5.0
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class DouyinAppSettings(ChannelSettings):
    """``[channels.douyin.apps.<name>]``: one app of the Douyin Open Platform console."""

    inbox: str
    # 控制台 > 应用详情: Client Key (the app's id; open_ids are per app) and Client Secret, which
    # signs every webhook (X-Douyin-Signature).
    client_key: str = Field(min_length=1)
    client_secret: Secret | None = None
    # Accepted alongside during a rotation (the console's secret reset).
    previous_client_secret: Secret | None = None
    # The brand account's access-token (from its authorization of the app, scope
    # im.direct_message; comment replies need item.comment) and its open_id: the way back.
    access_token: Secret | None = None
    account_open_id: str | None = None


class DouyinSettings(ChannelSettings):
    """``[channels.douyin]``."""

    api_base: str = DEFAULT_API_BASE
    max_body_bytes: int = Field(256 * 1024, gt=0)
    ingest_timeout: Duration = 4.0
    api_timeout: Duration = 15.0
    # Replies to a private message are allowed for a while after the user's last message; Douyin
    # enforces it (the send is refused after), the gateway fails late replies before calling.
    reply_window: Duration = 48 * 3600.0
    send_rate: float = Field(5.0, gt=0)
    apps: dict[str, DouyinAppSettings] = Field(min_length=1)

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("ingest_timeout")
    @classmethod
    def _under_deadline(cls, value: float) -> float:
        if not 0 < value < DOUYIN_DEADLINE:
            raise ValueError(f"must be more than 0 and less than Douyin's {DOUYIN_DEADLINE:g} s")
        return value

    @model_validator(mode="after")
    def _names(self) -> DouyinSettings:
        for name in self.apps:
            if not _NAME.match(name):
                raise ValueError(f"name {name!r} must match {_NAME.pattern} (it is part of the URL)")
        return self
