"""The pywa corpus (real WhatsApp Cloud API webhook bodies and a signature vector) through the real
application; skipped when ``shared/corpora/pywa`` is absent. The figures are printed by
``bench/conformance_whatsapp.py``; here every body must be answered 200 without a quarantine, the
vector must verify, its tampered twin must be refused before parsing, and every one of pywa's
predicates must hold on our output."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from core.settings import Settings
from gateway.app import Overrides, create_app
from gateway.publisher import MemoryPublisher
from tests.connectors.meta.probe import sign
from tests.support.corpora import CORPORA
from tests.support.schema import validate_event

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
PYWA = CORPORA / "pywa"
pytestmark = pytest.mark.skipif(not PYWA.is_dir(), reason=f"no pywa corpus at {PYWA}")
SECRET = "corpus-app-secret"


def settings_for(tmp_path: Path, secret: str) -> Settings:
    return Settings.model_validate(
        {
            "server": {"normalizer_process": False},
            "store": {"path": str(tmp_path / "pywa.db"), "blob_dir": str(tmp_path / "blobs")},
            "outbox": {"relay": "inline", "poll_interval": 0.05},
            "control": {"enabled": False},
            "tenants": {"acme": {}},
            "inboxes": {"support": {"tenant": "acme"}},
            "channels": {
                "meta": {"apps": {"acme": {"app_secret": secret, "verify_token": "v"}}},
                "whatsapp": {
                    "api_base": "http://127.0.0.1:9",
                    "echoes": "record",
                    "inboxes": {"support": {"app": "acme", "access_token": "t", "fetch_media": False}},
                },
            },
        }
    )


def bodies() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((PYWA / "whatsapp_cloud_updates_pywa").glob("*.json")):
        found += [(f"{path.stem}[{key}]", body) for key, body in json.loads(path.read_text()).items()]
    return found


async def test_every_body_is_answered_and_none_is_quarantined(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    bus = MemoryPublisher()
    app = create_app(settings_for(tmp_path, SECRET), Overrides(publisher=bus))
    client = await aiohttp_client(app)
    samples = bodies()
    assert len(samples) >= 70
    for name, body in samples:
        raw = json.dumps(body).encode()
        response = await client.post(
            "/meta/acme", data=raw, headers={"X-Hub-Signature-256": sign(raw, SECRET)}
        )
        assert response.status == 200, name
    await asyncio.sleep(0.5)
    assert bus.published
    # pywa's samples reuse ids ("wamid.xyzxyz") for different content: the gateway keeps the first
    # and quarantines the others as key reuse, as it would a real provider doing so. Nothing else.
    for message in bus.published:
        event = validate_event(message.body)
        if event["type"] == "message.quarantined":
            assert "idempotency key reused" in json.dumps(event), event


async def test_the_signature_vector_verifies_and_its_tampered_twin_is_refused(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    vectors = json.loads((PYWA / "signature_vectors.json").read_text())["vectors"]
    [valid] = [v for v in vectors if v["expect"] == "valid"]
    [tampered] = [v for v in vectors if v["expect"] == "invalid"]
    bus = MemoryPublisher()
    client = await aiohttp_client(
        create_app(settings_for(tmp_path, valid["app_secret"]), Overrides(publisher=bus))
    )
    refused = await client.post(
        "/meta/acme",
        data=tampered["raw_body"].encode(),
        headers={"X-Hub-Signature-256": tampered["expected_signature"]},
    )
    assert refused.status == 401
    accepted = await client.post(
        "/meta/acme",
        data=valid["raw_body"].encode(),
        headers={"X-Hub-Signature-256": valid["expected_signature"]},
    )
    assert accepted.status == 200
    async with asyncio.timeout(10), bus.changed:
        await bus.changed.wait_for(lambda: len(bus.published) >= 1)
    [event] = [validate_event(m.body) for m in bus.published]
    assert event["message"]["text"] == "Hey there! I am using PyWa."
    assert {"kind": "phone", "value": "+972544401243", "verified": True} in event["customer"]["identities"]


def test_every_pywa_predicate_holds_on_our_output(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.conformance_whatsapp import main

    assert main(CORPORA) == 0
    out = capsys.readouterr().out
    assert "disagreements:" not in out, out
    assert "signature vectors: 2/2" in out
