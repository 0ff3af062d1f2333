"""Fail closed: a Meta channel without its app, app secret, verify token or token refuses to start,
naming the key; and the signature check itself (rotation, algorithm, forms of the header)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from connectors.meta import INSTAGRAM, MESSENGER, WHATSAPP
from connectors.meta.hub import MetaApp
from core.errors import ConfigError
from core.settings import Settings


def settings(meta: dict[str, Any] | None, **channels: Any) -> Settings:
    tables: dict[str, Any] = dict(channels)
    if meta is not None:
        tables["meta"] = meta
    return Settings.model_validate(
        {
            "tenants": {"acme": {}},
            "inboxes": {"support": {"tenant": "acme"}, "sales": {"tenant": "acme"}},
            "channels": tables,
        }
    )


APPS = {"apps": {"acme": {"app_secret": "s", "verify_token": "v"}}}
INBOX = {"app": "acme", "access_token": "t"}


@pytest.mark.parametrize(
    ("meta", "table", "key"),
    [
        (None, {"inboxes": {"support": INBOX}}, "channels.meta"),
        (
            {"apps": {"acme": {"verify_token": "v"}}},
            {"inboxes": {"support": INBOX}},
            "channels.meta.apps.acme.app_secret",
        ),
        (
            {"apps": {"acme": {"app_secret": "s"}}},
            {"inboxes": {"support": INBOX}},
            "channels.meta.apps.acme.verify_token",
        ),
        (APPS, {"inboxes": {"support": {**INBOX, "app": "other"}}}, "channels.{name}.inboxes.support.app"),
        (APPS, {"inboxes": {"support": {"app": "acme"}}}, "channels.{name}.inboxes.support.access_token"),
    ],
)
@pytest.mark.parametrize("descriptor", [WHATSAPP, MESSENGER, INSTAGRAM], ids=lambda d: d.name)
def test_a_missing_secret_or_app_refuses_to_start(meta: Any, table: Any, key: str, descriptor: Any) -> None:
    with pytest.raises(ConfigError) as refused:
        descriptor.connector.from_settings(settings(meta, **{descriptor.name: table}))
    assert refused.value.key == key.format(name=descriptor.name)


def test_two_inboxes_cannot_take_the_same_number() -> None:
    number = {**INBOX, "phone_number_id": "1065"}
    with pytest.raises(ConfigError) as refused:
        WHATSAPP.connector.from_settings(
            settings(APPS, whatsapp={"inboxes": {"support": number, "sales": number}})
        )
    assert refused.value.key == "channels.whatsapp.inboxes.sales.phone_number_id"


def test_the_signature_check() -> None:
    app = MetaApp(name="acme", secrets=(b"new", b"old"), verify_digest=hashlib.sha256(b"v").digest())
    body = b'{"object":"page","entry":[]}'

    def header(secret: bytes, algorithm: str = "sha256", digest: Any = hashlib.sha256) -> str:
        return f"{algorithm}=" + hmac.new(secret, body, digest).hexdigest()

    assert app.signed(header(b"new"), body)
    assert app.signed(header(b"old"), body)  # during a rotation
    assert app.signed(header(b"new").upper().replace("SHA256=", "sha256="), body)  # hex in capitals
    assert not app.signed(header(b"other"), body)
    assert not app.signed(header(b"new"), body + b" ")
    assert not app.signed(header(b"new", "sha1", hashlib.sha1), body)  # the client does not choose
    assert not app.signed(header(b"new", "sha1"), body)  # nor relabel it
    assert not app.signed(None, body)
    assert not app.signed("sha256=", body)
    assert not app.signed("sha256=zz", body)
    assert not app.signed(header(b"new")[:-2], body)
    # Header bytes that are not UTF-8 reach us as surrogate escapes: refused, never an exception.
    assert not app.signed("sha256=\udcff\udcfe", body)
    assert not app.signed("sha256\udcff=" + header(b"new").partition("=")[2], body)
    assert app.verify_token_matches("v")
    assert not app.verify_token_matches("v\udcff")
    assert not app.verify_token_matches("w")
    assert not app.verify_token_matches(None)
