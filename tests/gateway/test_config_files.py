"""The shipped configuration files stay valid as the code moves."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from core.settings import load_settings
from gateway.cli import cmd_check_config, main

CONFIG = Path(__file__).resolve().parents[2] / "config"

# Every secret the example reads from the environment.
EXAMPLE_ENV = {
    "TICKETGATE_BLOB_TOKEN": "blob-token-for-tests",
    "TICKETGATE_ADMIN_TOKEN": "admin-token-for-tests",
    "TICKETGATE_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/",
    "TICKETGATE_API_KEY_ACME": "an-api-key-long-enough",
    "WECHAT_ACME_TOKEN": "token",
    "WECHAT_ACME_AES_KEY": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    "WECOM_HELPDESK_TOKEN": "token",
    "WECOM_HELPDESK_AES_KEY": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    "SMTP_RELAY_PASSWORD": "relay-password",
    "IMAP_SUPPORT_PASSWORD": "imap-password",
    "WECHAT_ACME_APP_SECRET": "app-secret",
    "WECOM_HELPDESK_SECRET": "corp-secret",
    "WECHAT_KF_SECRET": "kf-secret",
    "WECHAT_KF_TOKEN": "kf-token",
    "WECHAT_KF_AES_KEY": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    "TICKETGATE_DESK_KEY": "desk-key-for-tests",
    "TICKETGATE_DESK_KEY_ACME": "acme-desk-key-for-tests",
    "TELEGRAM_ACME_BOT_TOKEN": "123456789:telegram-bot-token-for-tests",
    "TELEGRAM_ACME_SECRET_TOKEN": "telegram-secret-for-tests",
    "META_ACME_APP_SECRET": "meta-app-secret-for-tests",
    "META_ACME_VERIFY_TOKEN": "meta-verify-for-tests",
    "WHATSAPP_ACME_TOKEN": "whatsapp-token-for-tests",
    "MESSENGER_ACME_PAGE_TOKEN": "messenger-token-for-tests",
    "INSTAGRAM_ACME_TOKEN": "instagram-token-for-tests",
    "LINE_ACME_CHANNEL_SECRET": "line-channel-secret-for-tests",
    "LINE_ACME_CHANNEL_ACCESS_TOKEN": "line-channel-access-token-for-tests",
    "X_ACME_CONSUMER_KEY": "x-consumer-key-for-tests",
    "X_ACME_CONSUMER_SECRET": "x-consumer-secret-for-tests",
    "X_ACME_ACCESS_TOKEN": "1432107654321098752-x-access-token-for-tests",
    "X_ACME_ACCESS_TOKEN_SECRET": "x-access-token-secret-for-tests",
    "SLACK_ACME_SIGNING_SECRET": "slack-signing-secret-for-tests",
    "SLACK_ACME_BOT_TOKEN": "xoxb-slack-bot-token-for-tests",
    "FEISHU_ACME_APP_SECRET": "feishu-app-secret-for-tests",
    "FEISHU_ACME_VERIFICATION_TOKEN": "feishu-verification-token-for-tests",
    "FEISHU_ACME_ENCRYPT_KEY": "feishu-encrypt-key-for-tests",
    "DINGTALK_ACME_APP_SECRET": "dingtalk-app-secret-for-tests",
    "TICKETGATE_PG_DSN": "postgresql://ticketgate@127.0.0.1:5432/ticketgate",
    "SMARTHOST_PASSWORD": "smarthost-password-for-tests",
    "WEBCHAT_SESSION_SECRET": "webchat-session-secret-for-tests",
    "WEBCHAT_ACME_IDENTITY_SECRET": "webchat-identity-secret-for-tests",
    "MINIPROGRAM_TOKEN": "miniprogram-token",
    "MINIPROGRAM_AES_KEY": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    "MINIPROGRAM_APP_SECRET": "miniprogram-app-secret",
    "DOUYIN_CLIENT_SECRET": "douyin-client-secret-for-tests",
    "DOUYIN_ACCESS_TOKEN": "act.douyin-access-token-for-tests",
    "WEIBO_APP_SECRET": "weibo-app-secret-for-tests",
    "WEIBO_ACCESS_TOKEN": "2.00weibo-access-token-for-tests",
}


@pytest.mark.parametrize(
    "name", ["ticketgate.dev.toml", "ticketgate.example.toml", "ticketgate.replica.toml"]
)
def test_shipped_configs_pass_check_config(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(key, value)
    out = io.StringIO()

    class Args:
        config = str(CONFIG / name)

    assert cmd_check_config(Args(), out=out) == 0  # type: ignore[arg-type]
    assert "OK" in out.getvalue()


def test_check_config_names_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nport = "eighty"\n')
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "server.port" in err


def test_a_missing_secret_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_TOKEN", raising=False)
    path = tmp_path / "t.toml"
    path.write_text(
        '[tenants.t]\n[inboxes.i]\ntenant = "t"\n[channels.api.inboxes.i]\nkeys = [{ env = "NOPE_TOKEN" }]\n'
    )
    assert main(["check-config", "--config", str(path)]) == 2


def test_environment_overrides_any_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKETGATE__SERVER__PORT", "9123")
    monkeypatch.setenv("TICKETGATE__BROKER__QUEUES", '[{ name = "q", bindings = ["a.#"] }]')
    settings = load_settings(CONFIG / "ticketgate.dev.toml")
    assert settings.server.port == 9123
    assert settings.broker.queues[0].bindings == ("a.#",)


def test_secrets_never_appear_in_repr() -> None:
    settings = load_settings(CONFIG / "ticketgate.dev.toml")
    text = repr(settings)
    assert "dev-api-key" not in text
    assert "devtoken" not in text
    assert "guest:guest" not in text
    assert "dev-telegram-secret" not in text
