"""Feishu through the real application: context, pipeline, SQLite store and relay, with a local
server answering like the Feishu Open API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.feishu.connector import challenge_body
from core.errors import ConfigError
from core.settings import Settings
from gateway.app import Overrides, create_app
from gateway.publisher import MemoryPublisher
from tests.connectors.feishu.fake_feishu import APP_SECRET, FakeFeishu
from tests.connectors.feishu.kit import APP_ID, EMPLOYEE, FIXTURES, event, sealed, signed_headers
from tests.support.schema import validate_event

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
TOKEN, KEY, OLD_KEY = "app-test-token", "app-test-encrypt-key", "app-test-old-encrypt-key"
URL = "/feishu/it-desk"


def settings_for(tmp_path: Path, api_base: str, table: dict[str, Any] | None = None, **app: Any) -> Settings:
    return Settings.model_validate(
        {
            "server": {"normalizer_process": False, "public_url": "http://gateway.test"},
            "store": {"path": str(tmp_path / "feishu.db"), "blob_dir": str(tmp_path / "blobs")},
            "outbox": {"relay": "inline", "poll_interval": 0.05},
            "control": {"enabled": False},
            "tenants": {"acme": {}},
            "inboxes": {"it-desk": {"tenant": "acme"}},
            "channels": {
                "feishu": {
                    **(table or {}),
                    "inboxes": {
                        "it-desk": {
                            "api_base": api_base,
                            "app_id": APP_ID,
                            "app_secret": APP_SECRET,
                            "verification_token": TOKEN,
                            "encrypt_key": KEY,
                            "previous_encrypt_key": OLD_KEY,
                            **app,
                        }
                    },
                }
            },
        }
    )


@pytest.fixture
async def feishu(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeFeishu:
    fake = FakeFeishu()
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


async def published(bus: MemoryPublisher, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(10), bus.changed:
        await bus.changed.wait_for(lambda: len(bus.published) >= count)
    return [validate_event(m.body) for m in bus.published]


async def post(
    client: Client,
    body: bytes,
    *,
    key: str = KEY,
    at: float | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    sent = {**signed_headers(key, body, at=at), **(headers or {})}
    response = await client.post(URL, data=body, headers=sent)
    await response.release()
    return response.status


async def gateway(aiohttp_client: MakeClient, settings: Settings, bus: MemoryPublisher) -> Client:
    return await aiohttp_client(create_app(settings, Overrides(publisher=bus)))


async def test_the_url_verification_challenge_is_answered_only_with_the_right_token(
    aiohttp_client: MakeClient, tmp_path: Path, feishu: FakeFeishu
) -> None:
    client = await gateway(aiohttp_client, settings_for(tmp_path, feishu.base), MemoryPublisher())
    # Feishu sends the challenge unsigned, encrypted with the encrypt key.
    challenge = sealed(challenge_body("ajls384kdjx98XX", TOKEN), KEY)
    response = await client.post(URL, data=challenge, headers={"Content-Type": "application/json"})
    assert response.status == 200
    assert await response.json() == {"challenge": "ajls384kdjx98XX"}
    wrong = sealed(challenge_body("ajls384kdjx98XX", "guessed-token"), KEY)
    assert (await client.post(URL, data=wrong)).status == 401
    other_key = sealed(challenge_body("ajls384kdjx98XX", TOKEN), "guessed-key")
    assert (await client.post(URL, data=other_key)).status == 401


async def test_forged_stale_unsigned_and_wrong_token_requests_are_refused_before_decrypting(
    aiohttp_client: MakeClient, tmp_path: Path, feishu: FakeFeishu
) -> None:
    bus = MemoryPublisher()
    client = await gateway(
        aiohttp_client, settings_for(tmp_path, feishu.base, directory_emails=False, fetch_media=False), bus
    )
    body = sealed(event(1, "forged", token=TOKEN), KEY)
    assert await post(client, body, key="guessed-key") == 401
    assert await post(client, body, at=time.time() - 301) == 401  # outside the 5-minute window
    assert await post(client, body, at=time.time() + 301) == 401
    assert (await client.post(URL, data=body, headers={"Content-Type": "application/json"})).status == 401
    assert await post(client, body + b" ", headers=signed_headers(KEY, body)) == 401  # tampered
    # Bytes that neither parse nor decrypt, signed with a wrong key: 401 (a handler that decrypted or
    # parsed first would answer 400).
    assert await post(client, b'{"encrypt": "!!!', key="guessed-key") == 401
    # Signed and encrypted, but with another app's verification token.
    assert await post(client, sealed(event(2, "other app", token="other-token"), KEY)) == 401
    # The sentinel: signed with the previous key (a rotation) is accepted.
    assert await post(client, sealed(event(3, "sentinel", token=TOKEN), OLD_KEY), key=OLD_KEY) == 200
    [only] = await published(bus, 1)
    assert only["message"]["text"] == "sentinel"
    metrics = await (await client.get("/metrics")).text()
    assert 'ticketgate_refusals_total{channel="feishu",inbox="it-desk",reason="signature"} 7.0' in metrics


async def test_concurrent_redeliveries_are_one_event_and_the_directory_email_is_linked(
    aiohttp_client: MakeClient, tmp_path: Path, feishu: FakeFeishu
) -> None:
    feishu.users[EMPLOYEE] = {
        "open_id": EMPLOYEE,
        "name": "Wang Fang",
        "email": "wang.fang@example.com",
        "enterprise_email": "Wang.Fang@corp.example",
    }
    bus = MemoryPublisher()
    client = await gateway(aiohttp_client, settings_for(tmp_path, feishu.base, fetch_media=False), bus)
    data = event(7, "VPN is down", token=TOKEN)
    bodies = []
    for n in range(3):  # Feishu's retries: new event envelope, new signature, same message
        copy = orjson.loads(orjson.dumps(data))
        copy["header"]["event_id"] = f"retry-{n}"
        bodies.append(sealed(copy, KEY))
    statuses = await asyncio.gather(*(post(client, b) for b in bodies))
    assert statuses == [200, 200, 200]
    assert await post(client, sealed(event(8, "and my mail too", token=TOKEN), KEY)) == 200
    first, second = await published(bus, 2)
    await asyncio.sleep(0.2)
    assert len(bus.published) == 2
    assert first["message"]["external_id"] == data["event"]["message"]["message_id"]
    assert first["message"]["extra"]["chat_type"] == "p2p"
    assert {"kind": "feishu_open_id", "value": f"{APP_ID}:{EMPLOYEE}", "verified": True} in first["customer"][
        "identities"
    ]
    email = {"kind": "email", "value": "wang.fang@corp.example", "verified": True}
    assert email in second["customer"]["identities"]
    assert second["customer"]["id"] == first["customer"]["id"]
    assert second["thread"]["id"] == first["thread"]["id"]
    assert feishu.calls["user"] == 1  # cached
    assert feishu.tokens_issued == 1


async def test_images_are_fetched_through_the_message_resource_api_into_the_blob_store(
    aiohttp_client: MakeClient, tmp_path: Path, feishu: FakeFeishu
) -> None:
    data = event(9, None, token=TOKEN, fixture="image")
    message_id = data["event"]["message"]["message_id"]
    key = "img_v2_7c4b5e7f-4b47-4b30-b8f1-d2e4b9b2e3ag"
    feishu.resources[(message_id, key)] = (b"\x89PNG bytes", "image/png")
    bus = MemoryPublisher()
    settings = settings_for(tmp_path, feishu.base, directory_emails=False)
    client = await gateway(aiohttp_client, settings, bus)
    assert await post(client, sealed(data, KEY)) == 200
    [received] = await published(bus, 1)
    [media] = received["message"]["media"]
    path = media["url"].removeprefix("http://gateway.test")
    async with asyncio.timeout(10):
        while (served := await client.get(path)).status == 202:
            await served.release()
            await asyncio.sleep(0.05)
    assert served.status == 200
    assert await served.read() == b"\x89PNG bytes"
    assert feishu.calls["resource"] == 1


async def test_a_group_message_not_for_the_bot_and_other_events_store_nothing_but_answer_200(
    aiohttp_client: MakeClient, tmp_path: Path, feishu: FakeFeishu
) -> None:
    bus = MemoryPublisher()
    settings = settings_for(
        tmp_path,
        feishu.base,
        directory_emails=False,
        fetch_media=False,
        bot_open_id="ou_bot0000000000000000000000000001",
    )
    client = await gateway(aiohttp_client, settings, bus)
    for n, fixture in enumerate(("group_without_mention", "app_sender", "bot_added", "text_group_mention")):
        if fixture == "bot_added":
            data = orjson.loads((FIXTURES / "bot_added.json").read_bytes())
            data["header"]["token"] = TOKEN
        else:
            data = event(20 + n, None, token=TOKEN, fixture=fixture)
        assert await post(client, sealed(data, KEY)) == 200, fixture
    [only] = await published(bus, 1)
    assert only["message"]["text"].startswith("@IT Helpdesk the printer")


def test_an_app_without_an_encrypt_key_refuses_to_start(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, "http://127.0.0.1:9", encrypt_key="", previous_encrypt_key="")
    with pytest.raises(ConfigError, match="encrypt_key"):
        create_app(settings)


def test_lark_apps_use_the_international_host_and_ws_apps_need_no_key(tmp_path: Path) -> None:
    from connectors.feishu import FeishuConnector

    settings = settings_for(tmp_path, "", host="lark")
    connector = FeishuConnector.from_settings(settings)
    assert connector is not None
    assert connector.apps["it-desk"].api_base == "https://open.larksuite.com"
    ws = settings_for(tmp_path, "", mode="ws", verification_token="", encrypt_key="", previous_encrypt_key="")
    made = FeishuConnector.from_settings(ws)
    assert made is not None
    assert made.describe_endpoints("http://gw")[0].kind == "socket"
    with pytest.raises(ConfigError, match="app_secret"):
        FeishuConnector.from_settings(
            settings_for(tmp_path, "", mode="ws", app_secret="", fetch_media=False, directory_emails=False)
        )
