"""Error answers read as the gateway's JSON errors, not as aiohttp's text or pydantic's internals."""

from __future__ import annotations

import orjson
import pytest

from tests.hostile.kit import API_KEY, Gateway

JSON = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


async def test_an_unknown_path_is_a_json_404(sqlite_gateway: Gateway) -> None:
    response = await sqlite_gateway.client.get("/no/such/path")
    assert response.status == 404
    assert response.content_type == "application/json"
    assert (await response.json())["error"] == "not_found"


async def test_a_wrong_method_is_a_json_405_with_allow(sqlite_gateway: Gateway) -> None:
    response = await sqlite_gateway.client.get("/api/v1/messages")
    assert response.status == 405
    assert response.content_type == "application/json"
    assert (await response.json())["error"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


async def test_a_401_keeps_its_challenge_and_says_why_in_json(sqlite_gateway: Gateway) -> None:
    response = await sqlite_gateway.client.get(f"/blobs/{'0' * 64}")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="ticketgate-blobs"'
    assert await response.json() == {
        "error": "unauthorized", "reason": "the blob token is required: Authorization: Bearer <key>"
    }


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "body: must be a JSON object"),
        ({"customer": "alice", "text": "hi"}, "customer: must be a JSON object"),
        ({"customer": {"email": "alice"}, "text": "hi"}, "customer.email: not an email address"),
        ({"customer": {"email": "a@b.example"}, "text": "hi", "colour": 1}, "colour: not a known field"),
        ({"text": "hi"}, "customer: required"),
        (
            {"customer": {"name": "A"}, "text": "hi"},
            "customer: give at least one of email, phone or external_id",
        ),
    ],
)
async def test_api_schema_errors_read_as_sentences(
    sqlite_gateway: Gateway, body: object, reason: str
) -> None:
    response = await sqlite_gateway.client.post("/api/v1/messages", data=orjson.dumps(body), headers=JSON)
    assert response.status == 422
    assert (await response.json())["reason"] == reason
