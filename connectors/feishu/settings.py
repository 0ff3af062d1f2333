"""``[channels.feishu]``: one Feishu (飞书) or Lark app per inbox, answered at ``POST /feishu/{inbox}``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.settings import ChannelSettings, Duration, Secret

MiB = 1024 * 1024
HOSTS = {"feishu": "https://open.feishu.cn", "lark": "https://open.larksuite.com"}


class FeishuInboxSettings(ChannelSettings):
    """``[channels.feishu.inboxes.<inbox id>]``: the custom app that receives for that inbox."""

    # "http": Feishu POSTs events to /feishu/<inbox>; "ws": the gateway opens Feishu's long
    # connection (长连接) with the App ID and Secret (no public URL needed).
    mode: Literal["http", "ws"] = "http"
    # "feishu" (open.feishu.cn) or "lark" (open.larksuite.com, the international edition).
    host: Literal["feishu", "lark"] = "feishu"
    # The Open API base; empty for the host's. Tests point it at a local server.
    api_base: str = ""
    # Credentials & Basic Info -> App ID (cli_...) and App Secret: tenant_access_token for the APIs.
    app_id: str = ""
    app_secret: Secret | None = None
    # Events & Callbacks -> Encryption Strategy: the Verification Token and the Encrypt Key.
    verification_token: Secret | None = None
    encrypt_key: Secret | None = None
    # The keys being replaced during a rotation: both verify until these are removed.
    previous_verification_token: Secret | None = None
    previous_encrypt_key: Secret | None = None
    # The bot's own open_id: group messages that do not mention it are not tickets.
    bot_open_id: str = ""
    # Fetch images and files through the message-resource API after the answer.
    fetch_media: bool = True
    # Link the employee's work email from the contact API (contact:user.email:readonly) to the
    # customer as a verified identity: the tenant's directory vouches for its employees' addresses.
    directory_emails: bool = True
    # Replies to a group message go into its Feishu thread (reply_in_thread).
    reply_in_thread: bool = True


class FeishuSettings(ChannelSettings):
    """``[channels.feishu]``."""

    max_body_bytes: int = Field(1 * MiB, gt=0)
    # X-Lark-Request-Timestamp must be within this many seconds of the gateway's clock.
    replay_window: Duration = Field(300.0, gt=0)
    # Feishu retries a callback without a 200 within 3 s.
    ingest_timeout: Duration = 2.0
    directory_timeout: Duration = 0.5
    directory_ttl: Duration = 86400.0
    api_timeout: Duration = 15.0
    media_max_bytes: int = Field(100 * MiB, gt=0)
    media_concurrency: int = Field(4, ge=1, le=32)
    media_retry_for: Duration = 86400.0
    media_first_backoff: Duration = 10.0
    media_max_backoff: Duration = 3600.0
    # Long connection: ping interval until Feishu's ClientConfig says otherwise; reconnect backoff.
    ws_ping_interval: Duration = Field(120.0, gt=0)
    ws_first_backoff: Duration = Field(1.0, gt=0)
    ws_max_backoff: Duration = Field(60.0, gt=0)
    # Feishu allows 5 messages per second per bot to one chat; 50/s per app overall.
    send_rate: float = Field(5.0, gt=0)
    inboxes: dict[str, FeishuInboxSettings] = Field(min_length=1)

    @model_validator(mode="after")
    def _within_feishu(self) -> FeishuSettings:
        if self.ingest_timeout <= 0 or self.ingest_timeout + self.directory_timeout > 2.7:
            raise ValueError("ingest_timeout + directory_timeout must stay within 2.7 s: Feishu retries a "
                             "callback it has no answer for in 3 s")
        return self
