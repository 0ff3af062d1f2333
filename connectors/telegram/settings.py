"""``[channels.telegram]``: one bot per inbox, each answered at ``POST /telegram/{inbox}``."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from core.settings import ChannelSettings, Duration, Secret

MiB = 1024 * 1024
DEFAULT_API_BASE = "https://api.telegram.org"
# What Telegram accepts as a webhook secret_token: 1-256 of A-Z, a-z, 0-9, _ and -.
SECRET_TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


class TelegramInboxSettings(ChannelSettings):
    """``[channels.telegram.inboxes.<inbox id>]``: the bot that receives for that inbox."""

    # From @BotFather, "123456:ABC-DEF..."; it is also in every Bot API URL, so it is never logged.
    bot_token: Secret | None = None
    # What setWebhook was given as secret_token; Telegram echoes it in X-Telegram-Bot-Api-Secret-Token.
    secret_token: Secret | None = None
    # The token being replaced during a rotation: both are accepted until it is removed.
    previous_secret_token: Secret | None = None
    # "polling": fetch with getUpdates (no public URL needed; the webhook must be deleted by hand).
    mode: Literal["webhook", "polling"] = "webhook"
    # Fetch photos, voice notes, documents ... through getFile after the answer.
    fetch_media: bool = True

    @field_validator("secret_token", "previous_secret_token")
    @classmethod
    def _telegram_accepts(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not SECRET_TOKEN_PATTERN.match(value.get_secret_value()):
            raise ValueError("Telegram accepts 1-256 characters of A-Z, a-z, 0-9, _ and - as a secret token")
        return value


class TelegramSettings(ChannelSettings):
    """``[channels.telegram]``."""

    api_base: str = DEFAULT_API_BASE
    # An update is a few KiB; media travel by file_id, never in the body.
    max_body_bytes: int = Field(1 * MiB, gt=0)
    # Telegram gives up on a webhook call after about a minute and retries; answer well before.
    ingest_timeout: Duration = 8.0
    api_timeout: Duration = 30.0
    # getUpdates long-poll: Telegram holds the request this long when there is nothing new.
    poll_timeout: int = Field(25, ge=0, le=50)
    poll_limit: int = Field(100, ge=1, le=100)
    media_concurrency: int = Field(4, ge=1, le=32)
    # file_ids stay valid, so transient failures are retried for a day before giving up.
    media_retry_for: Duration = 86400.0
    media_first_backoff: Duration = 10.0
    media_max_backoff: Duration = 3600.0
    inboxes: dict[str, TelegramInboxSettings] = Field(min_length=1)
