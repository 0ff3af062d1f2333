"""Reading secrets out of settings: one rule for every channel (unset and empty are the same)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from core.errors import ConfigError
from core.settings import Settings, revealed, revealed_all


def test_revealed_is_the_value_or_empty() -> None:
    assert revealed(SecretStr("s3cret")) == "s3cret"
    assert revealed(None) == ""


def test_revealed_all_keeps_the_set_secrets_in_order() -> None:
    # A current secret and its predecessor during a rotation; an empty one must never become a key.
    assert revealed_all(SecretStr("new"), None, SecretStr(""), SecretStr("old")) == ("new", "old")
    assert revealed_all(None) == ()


def test_required_names_the_setting_and_why() -> None:
    settings = Settings(source="/etc/ticketgate.toml")
    assert settings.required(SecretStr("x"), key="channels.line.inboxes.a.channel_secret", why="w") == "x"
    for missing in (None, SecretStr("")):
        with pytest.raises(ConfigError) as raised:
            settings.required(missing, key="channels.line.inboxes.a.channel_secret",
                              why="webhooks cannot be verified")
        assert raised.value.key == "channels.line.inboxes.a.channel_secret"
        assert raised.value.file == "/etc/ticketgate.toml"
        assert "is required (webhooks cannot be verified without it)" in str(raised.value)
