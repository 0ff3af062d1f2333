"""``[channels.weibo]``: Weibo fan-service accounts (微博粉丝服务平台), each answered at
``/weibo/{name}`` and tied to one inbox."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from core.settings import ChannelSettings, Duration, Secret

DEFAULT_API_BASE = "https://m.api.weibo.com"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class WeiboAccountSettings(ChannelSettings):
    """``[channels.weibo.accounts.<name>]``: one verified account in developer mode."""

    inbox: str
    # 管理中心 > 粉丝服务 > 高级功能 > 开发模式: the APPKEY entered there; its App Secret signs
    # every push (SHA-1 of the sorted app secret, timestamp and nonce).
    app_secret: Secret | None = None
    previous_app_secret: Secret | None = None
    # The fan-service access token shown on the developer-mode page: the way back.
    access_token: Secret | None = None
    # Seconds a push's signed timestamp may differ from our clock.
    replay_window: Duration = 300.0


class WeiboSettings(ChannelSettings):
    """``[channels.weibo]``."""

    api_base: str = DEFAULT_API_BASE
    max_body_bytes: int = Field(256 * 1024, gt=0)
    ingest_timeout: Duration = 4.0
    api_timeout: Duration = 15.0
    # Weibo lets an account answer a fan for 48 hours after the fan's message or event
    # (messages/reply: "within 48 hours"); a mention may be answered once in that time.
    reply_window: Duration = 48 * 3600.0
    send_rate: float = Field(5.0, gt=0)
    accounts: dict[str, WeiboAccountSettings] = Field(min_length=1)

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _names(self) -> WeiboSettings:
        for name in self.accounts:
            if not _NAME.match(name):
                raise ValueError(f"name {name!r} must match {_NAME.pattern} (it is part of the URL)")
        return self
