"""Settings of the WeChat Official Account (``[channels.wechat]``), WeCom (``[channels.wecom]``) and
WeChat Customer Service (``[channels.wechat_kf]``) tables."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from core.settings import ChannelSettings, Duration, Secret

# Names appear in the callback URL path (``/wechat/{name}``), so they stay URL-safe.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# WeChat gives up after 5 s; the ingest timeout must leave room to write the answer.
WECHAT_DEADLINE = 5.0
OFFICIAL_ACCOUNT_API = "https://api.weixin.qq.com"
WECOM_API = "https://qyapi.weixin.qq.com"

Mode = Literal["safe", "compatible", "plaintext"]


def _check_aes_key(value: SecretStr | None) -> SecretStr | None:
    """An EncodingAESKey is 43 base64 characters naming a 32-byte AES key."""
    if value is None:
        return None
    raw = value.get_secret_value()
    try:
        key = base64.b64decode(raw + "=", validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("an EncodingAESKey is 43 characters of base64") from None
    if len(raw) != 43 or len(key) != 32:
        raise ValueError("an EncodingAESKey is 43 characters of base64")
    return value


class _Credentials(ChannelSettings):
    inbox: str
    # Secrets are optional here only so that a missing one is reported by name (fail closed)
    # in :func:`connectors.wechat.app` rather than as a generic validation error.
    token: Secret | None = None
    encoding_aes_key: Secret | None = None
    # Accepted alongside the current ones while a rotation is under way.
    previous_token: Secret | None = None
    previous_encoding_aes_key: Secret | None = None
    replay_window: Duration = 300.0

    @field_validator("encoding_aes_key", "previous_encoding_aes_key")
    @classmethod
    def _aes_key(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_aes_key(value)


def _check_api_base(value: str) -> str:
    if not value.startswith(("https://", "http://")):
        raise ValueError("must be an http(s) URL")
    return value.rstrip("/")


class WeChatAccountSettings(_Credentials):
    """``[channels.wechat.accounts.<name>]``: one Official Account."""

    app_id: str = Field(min_length=1)
    # The AppSecret: with it, images, voice, video and files are fetched into the blob store.
    app_secret: Secret | None = None
    api_base: str = OFFICIAL_ACCOUNT_API
    # With app_secret: ask the user-info API for the unionid of senders whose messages carry none,
    # and link it to their customer (connectors.wechat.unionid).
    fetch_unionid: bool = False

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        return _check_api_base(value)
    mode: Mode = "safe"
    # Plaintext deliveries carry a signature that does not cover the body: opt in explicitly.
    allow_plaintext: bool = False

    @model_validator(mode="after")
    def _plaintext_needs_opt_in(self) -> WeChatAccountSettings:
        if self.mode == "plaintext" and not self.allow_plaintext:
            raise ValueError(
                "mode 'plaintext' needs allow_plaintext = true (its signature does not cover the body)"
            )
        return self


class WeComAppSettings(_Credentials):
    """``[channels.wecom.apps.<name>]``: one WeCom self-built application."""

    corp_id: str = Field(min_length=1)
    agent_id: int
    # The application's Secret: with it, media are fetched into the blob store.
    corp_secret: Secret | None = None
    api_base: str = WECOM_API

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        return _check_api_base(value)


class WeChatKfAppSettings(_Credentials):
    """``[channels.wechat_kf.apps.<name>]``: WeChat Customer Service (微信客服) of one corp.

    The callback (``/wechat_kf/{name}``) is WeCom-style (``msg_signature``, AES with the corp id);
    it only announces messages, which are pulled with ``sync_msg`` using ``secret``.
    """

    corp_id: str = Field(min_length=1)
    # The 微信客服 Secret (or that of a self-built app allowed to use the KF API): required.
    secret: Secret | None = None
    api_base: str = WECOM_API
    # Customer service accounts synced at start-up even before a callback names them.
    open_kfids: tuple[str, ...] = ()

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        return _check_api_base(value)


class MiniProgramAppSettings(_Credentials):
    """``[channels.miniprogram.apps.<name>]``: the customer-service message push of one Mini Program
    (小程序客服消息), set in the Mini Program admin under 开发 > 开发管理 > 消息推送."""

    app_id: str = Field(min_length=1)
    # The Mini Program's AppSecret: images are fetched and replies sent with it.
    app_secret: Secret | None = None
    api_base: str = OFFICIAL_ACCOUNT_API
    # The 数据格式 chosen in the console. Both are accepted whatever is set (the body tells them
    # apart); the setting documents what the console says and picks the format of test tools.
    data_format: Literal["json", "xml"] = "json"
    mode: Mode = "safe"
    allow_plaintext: bool = False

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        return _check_api_base(value)

    @model_validator(mode="after")
    def _plaintext_needs_opt_in(self) -> MiniProgramAppSettings:
        if self.mode == "plaintext" and not self.allow_plaintext:
            raise ValueError(
                "mode 'plaintext' needs allow_plaintext = true (its signature does not cover the body)"
            )
        return self


class _ChannelTable(ChannelSettings):
    # Bounds the raw POST body; the decrypted XML is always smaller than the body.
    max_body_bytes: int = Field(256 * 1024, gt=0)
    # Time given to the store before answering 503; WeChat's own deadline is 5 s.
    ingest_timeout: Duration = 4.5
    # Media fetching (only for accounts with a secret): parallel downloads, size bound, how long
    # to keep retrying (WeChat keeps temporary media for 3 days), and the timeout of one API call.
    media_concurrency: int = Field(4, gt=0, le=64)
    media_max_bytes: int = Field(20 * 1024 * 1024, gt=0)
    media_retry_for: Duration = 3 * 86400.0
    api_timeout: Duration = 15.0

    @field_validator("ingest_timeout")
    @classmethod
    def _under_deadline(cls, value: float) -> float:
        if not 0 < value < WECHAT_DEADLINE:
            raise ValueError(f"must be more than 0 and less than WeChat's {WECHAT_DEADLINE:g} s deadline")
        return value


def _check_names(names: list[str]) -> None:
    for name in names:
        if not _NAME.match(name):
            raise ValueError(f"name {name!r} must match {_NAME.pattern} (it is part of the URL)")


class WeChatSettings(_ChannelTable):
    """``[channels.wechat]``."""

    accounts: dict[str, WeChatAccountSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> WeChatSettings:
        _check_names(list(self.accounts))
        return self


class WeComSettings(_ChannelTable):
    """``[channels.wecom]``."""

    apps: dict[str, WeComAppSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> WeComSettings:
        _check_names(list(self.apps))
        return self


class WeChatKfSettings(_ChannelTable):
    """``[channels.wechat_kf]``."""

    apps: dict[str, WeChatKfAppSettings] = Field(default_factory=dict)
    # A sync of every known customer service account this often, in case a callback was lost.
    poll_interval: Duration = 300.0
    # Messages asked for per sync_msg page (WeChat allows 1..1000).
    sync_limit: int = Field(1000, gt=0, le=1000)

    @model_validator(mode="after")
    def _names(self) -> WeChatKfSettings:
        _check_names(list(self.apps))
        return self


class MiniProgramSettings(_ChannelTable):
    """``[channels.miniprogram]``."""

    apps: dict[str, MiniProgramAppSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> MiniProgramSettings:
        _check_names(list(self.apps))
        return self
