"""``[channels.slack]``: one Slack app installation (a workspace) per inbox, answered at
``POST /slack/{inbox}/events`` (Events API) or reached over Socket Mode."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from core.settings import ChannelSettings, Duration, Secret
from normalizers.slack import Policy

MiB = 1024 * 1024
DEFAULT_API_BASE = "https://slack.com/api"
CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")


class SlackInboxSettings(ChannelSettings):
    """``[channels.slack.inboxes.<inbox id>]``: the app installation that receives for that inbox."""

    # "events": Slack POSTs to /slack/<inbox>/events, signed with the signing secret.
    # "socket": the gateway opens a Socket Mode WebSocket with the app-level token (no public URL).
    mode: Literal["events", "socket"] = "events"
    # Basic Information -> App Credentials -> Signing Secret. Required for mode = "events".
    signing_secret: Secret | None = None
    # The secret being replaced during a rotation: both verify until it is removed.
    previous_signing_secret: Secret | None = None
    # OAuth & Permissions -> Bot User OAuth Token (xoxb-...): users.info, files, chat.postMessage.
    bot_token: Secret | None = None
    # Basic Information -> App-Level Tokens (xapp-..., scope connections:write). Required for "socket".
    app_token: Secret | None = None
    # Channel ids (C.../G...) whose messages are tickets; ["*"] for every channel the app is in.
    channels: list[str] = Field(default_factory=list)
    # Direct messages (and group DMs) to the app are tickets.
    direct_messages: bool = True
    # @mentions of the app are tickets in any channel.
    mentions: bool = True
    # Fetch the files of messages with the bot token (files:read) after the answer.
    fetch_files: bool = True
    # Ask users.info for the author's profile email (users:read, users:read.email) and name.
    profile_emails: bool = True
    # Replies to a direct message go into a Slack thread under the customer's message (channels always do).
    dm_replies_in_thread: bool = False

    @field_validator("channels")
    @classmethod
    def _channel_ids(cls, value: list[str]) -> list[str]:
        for item in value:
            if item != "*" and not CHANNEL_ID.match(item):
                raise ValueError(f"{item!r} is not a Slack channel id (C..., G...) or \"*\"")
        return value


class SlackSettings(ChannelSettings):
    """``[channels.slack]``."""

    # The Web API (users.info, files.info, chat.postMessage, apps.connections.open); tests point it
    # at a local server.
    api_base: str = DEFAULT_API_BASE
    # Hosts whose file URLs get the bot token (files are never downloaded from anywhere else).
    file_hosts: list[str] = Field(default_factory=lambda: ["files.slack.com"])
    # An Events API callback is a few KiB.
    max_body_bytes: int = Field(1 * MiB, gt=0)
    # Slack gives up after 3 s and retries; the store and the profile lookup share this budget.
    ingest_timeout: Duration = 2.0
    profile_timeout: Duration = 0.5
    # How long a looked-up profile (or "no email for this user") is reused.
    profile_ttl: Duration = 86400.0
    api_timeout: Duration = 15.0
    media_max_bytes: int = Field(100 * MiB, gt=0)
    media_concurrency: int = Field(4, ge=1, le=32)
    media_retry_for: Duration = 86400.0
    media_first_backoff: Duration = 10.0
    media_max_backoff: Duration = 3600.0
    # Socket Mode: ping interval of the WebSocket (seconds); a silent socket is replaced.
    socket_ping_interval: Duration = 10.0
    inboxes: dict[str, SlackInboxSettings] = Field(min_length=1)

    @model_validator(mode="after")
    def _within_slack(self) -> SlackSettings:
        if self.ingest_timeout <= 0 or self.ingest_timeout + self.profile_timeout > 2.7:
            raise ValueError(
                "ingest_timeout + profile_timeout must stay within 2.7 s: Slack retries a callback it has "
                "no answer for in 3 s"
            )
        return self


def policy_of(config: SlackInboxSettings) -> Policy:
    """Which conversations of this installation become tickets."""
    return Policy(
        channels=frozenset(c for c in config.channels if c != "*"),
        all_channels="*" in config.channels,
        direct_messages=config.direct_messages,
        mentions=config.mentions,
    )
