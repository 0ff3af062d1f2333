"""``[channels.dingtalk]``: one DingTalk (钉钉) robot per inbox, over Stream mode or the HTTP callback
at ``POST /dingtalk/{inbox}``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.settings import ChannelSettings, Duration, Secret

MiB = 1024 * 1024


class DingTalkInboxSettings(ChannelSettings):
    """``[channels.dingtalk.inboxes.<inbox id>]``: the robot (of an internal app) of that inbox."""

    # "stream": the gateway opens DingTalk's Stream connection (no public URL needed);
    # "http": DingTalk POSTs each message to /dingtalk/<inbox>, signed with the app secret.
    mode: Literal["stream", "http"] = "stream"
    # Developer console -> the app -> Credentials: Client ID (AppKey) and Client Secret (AppSecret).
    app_key: str = ""
    app_secret: Secret | None = None
    # The secret being replaced during a rotation (HTTP mode): both verify until it is removed.
    previous_app_secret: Secret | None = None
    # The robot's code (robotCode); the app key when empty (the usual case for an app's robot).
    robot_code: str = ""
    # Fetch pictures, files, audio and video through the robot file download API after the answer.
    fetch_media: bool = True
    # Link the employee's work email from the directory (topapi/v2/user/get) as a verified identity.
    directory_emails: bool = True


class DingTalkSettings(ChannelSettings):
    """``[channels.dingtalk]``."""

    # The new API (tokens, Stream gateway, robot send and file download) and the old one (directory).
    api_base: str = "https://api.dingtalk.com"
    oapi_base: str = "https://oapi.dingtalk.com"
    max_body_bytes: int = Field(1 * MiB, gt=0)
    # DingTalk's rule for the HTTP callback: a timestamp more than an hour off is not DingTalk's.
    replay_window: Duration = Field(3600.0, gt=0)
    ingest_timeout: Duration = 2.0
    directory_timeout: Duration = 0.5
    directory_ttl: Duration = 86400.0
    api_timeout: Duration = 15.0
    # Stream mode: WebSocket heartbeat (a silent socket is replaced) and the reconnect backoff.
    stream_heartbeat: Duration = Field(20.0, gt=0)
    stream_first_backoff: Duration = Field(1.0, gt=0)
    stream_max_backoff: Duration = Field(60.0, gt=0)
    media_max_bytes: int = Field(100 * MiB, gt=0)
    media_concurrency: int = Field(4, ge=1, le=32)
    media_retry_for: Duration = 86400.0
    media_first_backoff: Duration = 10.0
    media_max_backoff: Duration = 3600.0
    # Replies per second per robot (DingTalk allows 20 messages a minute per group).
    send_rate: float = Field(1.0, gt=0)
    inboxes: dict[str, DingTalkInboxSettings] = Field(min_length=1)
