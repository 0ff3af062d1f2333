"""The API channel through aiohttp's test client: auth, idempotency, validation, bounds, answers."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from connectors.api import ApiConnector
from core.errors import ConfigError
from core.model import IngestResult, Outcome
from core.settings import Settings
from tests.connectors.form.fake_ingest import ACCEPTED, FakeIngest
from tests.support.channels import set_up

Client = TestClient[web.Request, web.Application]
KEY_OLD, KEY_NEW = "old-key-0123456789abcdef", "new-key-0123456789abcdef"
KEY_CC = "callcenter-key-0123456789"
BODY: dict[str, Any] = {
    "customer": {
        "email": "Li.Wei@Example.com", "phone": "13800138000", "external_id": "u-42", "name": "李伟"
    },
    "subject": "退款",
    "text": "订单号 123456789012345678 请退款",
    "sent_at": "2026-11-22T08:30:00+08:00",
}


def make_settings(**api: Any) -> Settings:
    channel: dict[str, Any] = {
        "max_body_bytes": 4000,
        "max_attachments": 2,
        "max_attachment_bytes": 100,
        "max_total_attachment_bytes": 150,
        "inboxes": {
            "app": {"keys": [KEY_OLD, KEY_NEW]},
            "callcenter": {"keys": [KEY_CC], "trust_identities": True},
        },
        **api,
    }
    return Settings.model_validate({
        "tenants": {"acme": {}},
        "inboxes": {"app": {"tenant": "acme"}, "callcenter": {"tenant": "acme"}},
        "channels": {"api": channel},
    })


def auth(key: str = KEY_NEW) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def ingest() -> FakeIngest:
    return FakeIngest()


@pytest.fixture
def client_for(
    aiohttp_client: Callable[..., Awaitable[Client]], ingest: FakeIngest
) -> Callable[..., Awaitable[Client]]:
    async def make(**api: Any) -> Client:
        settings = make_settings(**api)
        connector = ApiConnector.from_settings(settings)
        assert connector is not None
        app = web.Application()
        set_up(app, connector, ingest, settings=settings)
        return await aiohttp_client(app)
    return make


@pytest.fixture
async def client(client_for: Callable[..., Awaitable[Client]]) -> Client:
    return await client_for()


async def test_accepted_is_202_with_ids(client: Client, ingest: FakeIngest) -> None:
    response = await client.post("/api/v1/messages", json=BODY, headers={**auth(KEY_OLD), "Cookie": "a=b"})
    assert response.status == 202
    assert await response.json() == {"message_id": "m-1", "thread_id": "t-1", "status": "accepted"}
    envelope = ingest.envelopes[0]
    assert (envelope.channel, envelope.tenant, envelope.inbox) == ("api", "acme", "app")
    assert envelope.signature_verified is True
    assert "authorization" not in envelope.headers
    assert "cookie" not in envelope.headers
    (message,) = ingest.messages[0]
    assert [(i.kind, i.value, i.verified) for i in message.identities] == [
        ("external", "app:u-42", True),
        ("email", "li.wei@example.com", False),
        ("phone", "+8613800138000", False),
    ]


async def test_the_key_decides_the_inbox_and_trust(client: Client, ingest: FakeIngest) -> None:
    assert (await client.post("/api/v1/messages", json=BODY, headers=auth(KEY_CC))).status == 202
    (message,) = ingest.messages[0]
    assert message.inbox == "callcenter"
    assert all(i.verified for i in message.identities)


async def test_idempotency_key_repeat_is_200_duplicate(client: Client, ingest: FakeIngest) -> None:
    headers = {**auth(), "Idempotency-Key": "req-7f3a"}
    await client.post("/api/v1/messages", json=BODY, headers=headers)
    ingest.result = IngestResult(outcome=Outcome.DUPLICATE, placements=ACCEPTED.placements)
    response = await client.post("/api/v1/messages", json=BODY, headers=headers)
    assert response.status == 200
    assert await response.json() == {"message_id": "m-1", "thread_id": "t-1", "status": "duplicate"}
    first, second = (messages[0] for messages in ingest.messages)
    assert first.dedupe_key == second.dedupe_key == "req-7f3a"
    assert first.message_id() == second.message_id()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0123456789abcdef"},
                                     {"Authorization": f"Basic {KEY_NEW}"}])
async def test_missing_or_wrong_key_is_401(
    client: Client, ingest: FakeIngest, headers: dict[str, str]
) -> None:
    response = await client.post("/api/v1/messages", json=BODY, headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await response.json())["error"] == "unauthorized"
    assert ingest.calls == 0


async def test_repeated_auth_failures_are_rate_limited(
    client_for: Callable[..., Awaitable[Client]], ingest: FakeIngest
) -> None:
    client = await client_for(auth_failures_burst=2, auth_failures_per_minute=1)
    wrong = auth("x" * 20)
    statuses = [(await client.post("/api/v1/messages", json=BODY, headers=wrong)).status for _ in range(3)]
    assert statuses == [401, 401, 429]
    assert (await client.post("/api/v1/messages", json=BODY, headers=auth())).status == 202


async def test_over_the_rate_limit_is_429(
    client_for: Callable[..., Awaitable[Client]], ingest: FakeIngest
) -> None:
    client = await client_for(rate_limit_burst=1, rate_limit_per_minute=1)
    assert (await client.post("/api/v1/messages", json=BODY, headers=auth())).status == 202
    response = await client.post("/api/v1/messages", json=BODY, headers=auth())
    assert response.status == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert ingest.calls == 1
    # Another inbox has its own bucket.
    assert (await client.post("/api/v1/messages", json=BODY, headers=auth(KEY_CC))).status == 202


async def test_malformed_json_is_400(client: Client, ingest: FakeIngest) -> None:
    response = await client.post(
        "/api/v1/messages", data=b'{"customer":', headers={**auth(), "Content-Type": "application/json"}
    )
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_json"
    assert ingest.calls == 0


@pytest.mark.parametrize(("body", "field"), [
    ({**BODY, "customer": {"name": "nobody"}}, "customer"),
    ({**BODY, "customer": {"email": "not-an-email"}}, "customer.email"),
    ({**BODY, "customer": {"phone": "12"}}, "customer.phone"),
    ({**BODY, "sent_at": "2026-11-22T08:30:00"}, "sent_at"),  # RFC 3339 needs a time zone
    ({**BODY, "kind": "fax"}, "kind"),
    ({**BODY, "kind": "call_record"}, "body"),
    ({**BODY, "colour": "red"}, "colour"),
    ({**BODY, "attachments": [{"name": "a", "data_base64": "!!"}]}, "attachments.0.data_base64"),
    # Accepted by b64decode(validate=True), but not what was meant: surplus padding, stray low bits.
    ({**BODY, "attachments": [{"name": "a", "data_base64": "YWJj="}]}, "attachments.0.data_base64"),
    ({**BODY, "attachments": [{"name": "a", "data_base64": "YR=="}]}, "attachments.0.data_base64"),
    ({"customer": {"external_id": "u"}}, "body"),
])
async def test_schema_errors_are_422_naming_the_field(
    client: Client, ingest: FakeIngest, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/api/v1/messages", json=body, headers=auth())
    assert response.status == 422
    answer = await response.json()
    assert answer["error"] == "invalid_request"
    assert answer["reason"].startswith(f"{field}:")
    assert ingest.calls == 0


async def test_call_record_fields_travel_in_extra(client: Client, ingest: FakeIngest) -> None:
    body = {
        "customer": {"phone": "+8613800138000"}, "kind": "call_record", "external_id": "call-1",
        "call": {"direction": "inbound", "duration_seconds": 93, "from_number": "+8613800138000",
                 "recording_url": "https://pbx.example.com/r/1.mp3"},
    }
    assert (await client.post("/api/v1/messages", json=body, headers=auth(KEY_CC))).status == 202
    (message,) = ingest.messages[0]
    assert message.kind == "call_record"
    assert message.external_id == "call-1"
    assert message.extra == {"call": {"direction": "inbound", "duration_seconds": 93.0,
                                      "from_number": "+8613800138000",
                                      "recording_url": "https://pbx.example.com/r/1.mp3"}}


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "é"])
async def test_bad_idempotency_key_is_400(client: Client, ingest: FakeIngest, key: str) -> None:
    response = await client.post("/api/v1/messages", json=BODY, headers={**auth(), "Idempotency-Key": key})
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_idempotency_key"
    assert ingest.calls == 0


async def test_not_json_is_415(client: Client, ingest: FakeIngest) -> None:
    response = await client.post("/api/v1/messages", data=b"text=hi", headers=auth())
    assert response.status == 415
    assert ingest.calls == 0


async def test_oversized_body_is_413(client: Client, ingest: FakeIngest) -> None:
    response = await client.post("/api/v1/messages", json={**BODY, "text": "x" * 5000}, headers=auth())
    assert response.status == 413
    assert "4000" in (await response.json())["reason"]
    assert ingest.calls == 0


@pytest.mark.parametrize(("sizes", "reason"), [
    ([1, 1, 1], "at most 2 allowed"), ([101], "each may be at most 100"), ([80, 80], "150 bytes in total"),
])
async def test_attachment_bounds_are_413(
    client: Client, ingest: FakeIngest, sizes: list[int], reason: str
) -> None:
    attachments = [
        {"name": f"f{i}", "data_base64": base64.b64encode(b"a" * n).decode()} for i, n in enumerate(sizes)
    ]
    body = {**BODY, "attachments": attachments}
    response = await client.post("/api/v1/messages", json=body, headers=auth())
    assert response.status == 413
    assert reason in (await response.json())["reason"]
    assert ingest.calls == 0


async def test_attachments_arrive_decoded(client: Client, ingest: FakeIngest) -> None:
    data = base64.b64encode(b"hi").decode()
    attachment = {"name": "r.txt", "content_type": "text/plain", "data_base64": data}
    await client.post("/api/v1/messages", json={**BODY, "attachments": [attachment]}, headers=auth())
    (message,) = ingest.messages[0]
    assert [(a.name, a.content_type, a.data) for a in message.attachments] == [("r.txt", "text/plain", b"hi")]


async def test_retry_is_503_with_retry_after(client: Client, ingest: FakeIngest) -> None:
    ingest.result = IngestResult(outcome=Outcome.RETRY, reason="backlog full", retry_after=2.5)
    response = await client.post("/api/v1/messages", json=BODY, headers=auth())
    assert response.status == 503
    assert response.headers["Retry-After"] == "3"
    assert await response.json() == {"error": "unavailable", "reason": "backlog full"}


async def test_rejected_uses_the_pipeline_status(client: Client, ingest: FakeIngest) -> None:
    ingest.result = IngestResult(outcome=Outcome.REJECTED, reason="unknown inbox", status=409)
    response = await client.post("/api/v1/messages", json=BODY, headers=auth())
    assert response.status == 409
    assert await response.json() == {"error": "rejected", "reason": "unknown inbox"}


async def test_openapi_is_served(client: Client) -> None:
    response = await client.get("/api/v1/openapi.yaml")
    assert response.status == 200
    text = await response.text()
    assert text.startswith("openapi: 3.1.0")
    assert "/messages:" in text


def test_configuration_fails_closed() -> None:
    assert ApiConnector.from_settings(Settings()) is None
    with pytest.raises(ConfigError, match="at least 8"):
        ApiConnector.from_settings(make_settings(inboxes={"app": {"keys": ["short"]}}))
    with pytest.raises(ConfigError, match="used twice"):
        ApiConnector.from_settings(
            make_settings(inboxes={"app": {"keys": [KEY_CC]}, "callcenter": {"keys": [KEY_CC]}})
        )
    with pytest.raises(ConfigError, match="keys"):
        ApiConnector.from_settings(make_settings(inboxes={"app": {"keys": []}}))
    with pytest.raises(ConfigError, match="not in"):
        ApiConnector.from_settings(make_settings(inboxes={"sales": {"keys": [KEY_CC]}}))

