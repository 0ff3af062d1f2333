"""The web-form channel through aiohttp's test client: every answer, and that rejects store nothing."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from connectors.form import FormConnector
from core.errors import ConfigError
from core.model import IngestResult, Outcome, Placement
from core.settings import Settings
from tests.connectors.form.fake_ingest import ACCEPTED, FakeIngest
from tests.support.channels import set_up

SITE = "https://shop.example.com"
FETCH = {"Origin": SITE, "Accept": "application/json"}
Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def make_settings(**form: Any) -> Settings:
    channel: dict[str, Any] = {
        "max_attachments": 2,
        "max_attachment_bytes": 1000,
        "max_total_attachment_bytes": 1500,
        "rate_limit_burst": 50,
        "inboxes": {
            "support": {"title": "Acme support", "title_zh": "Acme 客服", "allowed_origins": [SITE]},
            "kiosk": {"allow_missing_origin": True},
        },
        **form,
    }
    return Settings.model_validate({
        "server": {"max_body_bytes": 20_000, "trusted_proxies": ["10.0.0.0/8", "127.0.0.1"]},
        "tenants": {"acme": {}},
        "inboxes": {"support": {"tenant": "acme"}, "kiosk": {"tenant": "acme", "name": "Kiosk"}},
        "channels": {"form": channel},
    })


@pytest.fixture
def ingest() -> FakeIngest:
    return FakeIngest()


@pytest.fixture
def client_for(aiohttp_client: MakeClient, ingest: FakeIngest) -> Callable[..., Awaitable[Client]]:
    async def make(**form: Any) -> Client:
        settings = make_settings(**form)
        connector = FormConnector.from_settings(settings)
        assert connector is not None
        app = web.Application()
        set_up(app, connector, ingest, settings=settings)
        return await aiohttp_client(app)
    return make


@pytest.fixture
async def client(client_for: Callable[..., Awaitable[Client]]) -> Client:
    return await client_for()


def multipart(**fields: str) -> aiohttp.FormData:
    data = aiohttp.FormData(charset="utf-8")
    for name, value in fields.items():
        data.add_field(name, value)
    return data


VALID = {
    "name": "Li Wei", "email": "li@example.com", "subject": "Refund", "message": "Please refund order 42."
}


# -- the page ----------------------------------------------------------------------------------------

async def test_form_page_is_accessible_english(client: Client) -> None:
    response = await client.get("/forms/support", headers={"Accept-Language": "en-GB,en;q=0.9"})
    assert response.status == 200
    page = await response.text()
    assert "<title>Acme support</title>" in page
    assert '<html lang="en">' in page
    for field in ("name", "email", "phone", "subject", "message", "attachments"):
        assert f'<label for="tg-{field}">' in page
        assert f'id="tg-{field}" name="{field}"' in page
    assert 'name="message" rows="8" required' in page
    assert 'type="file" multiple' in page
    assert 'enctype="multipart/form-data"' in page
    assert 'name="website" type="text" tabindex="-1"' in page  # the honeypot, hidden from people
    assert "<script" not in re.sub(r"<!--.*?-->", "", page, flags=re.S)  # works without JavaScript
    csp = response.headers["Content-Security-Policy"]
    assert f"frame-ancestors 'self' {SITE}" in csp
    assert "form-action 'self'" in csp


@pytest.mark.parametrize("accept", ["zh-CN,zh;q=0.9,en;q=0.8", "zh-TW", "en;q=0.5, zh-Hans"])
async def test_form_page_speaks_chinese_when_asked(client: Client, accept: str) -> None:
    page = await (await client.get("/forms/support", headers={"Accept-Language": accept})).text()
    assert '<html lang="zh-CN">' in page
    assert "Acme 客服" in page
    assert "留言内容" in page
    assert "电子邮箱" in page
    assert "提交" in page


async def test_lang_query_overrides_accept_language(client: Client) -> None:
    page = await (await client.get("/forms/kiosk?lang=zh", headers={"Accept-Language": "en"})).text()
    assert "留言内容" in page
    assert "<title>Kiosk</title>" in page


async def test_unknown_inbox_is_404(client: Client) -> None:
    assert (await client.get("/forms/nope")).status == 404
    assert (await client.post("/forms/nope", data={"message": "x"})).status == 404


async def test_embed_script_is_served(client: Client) -> None:
    response = await client.get("/forms/support/embed.js")
    assert response.status == 200
    assert response.content_type == "application/javascript"
    assert "iframe" in await response.text()


# -- happy paths -----------------------------------------------------------------------------------

async def test_browser_multipart_post_stores_and_thanks(client: Client, ingest: FakeIngest) -> None:
    data = multipart(**VALID, phone="138 0013 8000", website="")
    data.add_field("attachments", b"%PDF-1.4 tiny", filename="receipt.pdf", content_type="application/pdf")
    data.add_field("attachments", b"", filename="", content_type="application/octet-stream")  # empty input
    host = f"http://{client.server.host}:{client.server.port}"
    response = await client.post("/forms/support", data=data, headers={
        "Origin": host, "Cookie": "session=secret", "Authorization": "Basic eDp5", "Accept-Language": "zh-CN",
    })
    assert response.status == 200
    page = await response.text()
    assert 'id="tg-thanks"' in page
    assert "谢谢" in page
    assert ingest.calls == 1
    envelope = ingest.envelopes[0]
    assert (envelope.channel, envelope.tenant, envelope.inbox) == ("form", "acme", "support")
    assert envelope.content_type is not None
    assert envelope.content_type.startswith("multipart/form-data")
    assert b"%PDF-1.4 tiny" in envelope.body
    assert len(envelope.body) == int(envelope.headers["content-length"])
    assert "cookie" not in envelope.headers
    assert "authorization" not in envelope.headers
    assert envelope.signature_verified is False
    assert envelope.remote == "127.0.0.1"
    assert envelope.meta["accept_language"] == "zh-CN"
    (message,) = ingest.messages[0]
    assert [(i.kind, i.value, i.verified) for i in message.identities] == [
        ("email", "li@example.com", False), ("phone", "+8613800138000", False)
    ]
    assert [(a.name, a.content_type, a.data) for a in message.attachments] == [
        ("receipt.pdf", "application/pdf", b"%PDF-1.4 tiny")
    ]


async def test_fetch_urlencoded_chinese_gets_json_and_cors(client: Client, ingest: FakeIngest) -> None:
    response = await client.post(
        "/forms/support",
        data={"name": "张三", "phone": "13800138000", "message": "我要投诉，订单号 123456789012345678"},
        headers=FETCH,
    )
    assert response.status == 202
    assert await response.json() == {"message_id": "m-1", "thread_id": "t-1", "status": "accepted"}
    assert response.headers["Access-Control-Allow-Origin"] == SITE
    (message,) = ingest.messages[0]
    assert message.text == "我要投诉，订单号 123456789012345678"
    assert message.display_name == "张三"


async def test_json_body_and_duplicate(client: Client, ingest: FakeIngest) -> None:
    ingest.result = IngestResult(outcome=Outcome.DUPLICATE, placements=ACCEPTED.placements)
    response = await client.post("/forms/support", json=VALID, headers=FETCH)
    assert response.status == 200
    assert (await response.json())["status"] == "duplicate"
    assert ingest.envelopes[0].content_type == "application/json"


async def test_referer_stands_in_for_a_missing_origin(client: Client, ingest: FakeIngest) -> None:
    response = await client.post("/forms/support", data=VALID, headers={"Referer": f"{SITE}/contact?x=1"})
    assert response.status == 200
    assert ingest.calls == 1


async def test_inbox_may_accept_posts_without_origin(client: Client, ingest: FakeIngest) -> None:
    response = await client.post("/forms/kiosk", data=VALID)
    assert response.status == 200
    assert ingest.calls == 1


async def test_trusted_proxy_forwarded_for_is_the_client(client: Client, ingest: FakeIngest) -> None:
    await client.post("/forms/kiosk", data=VALID, headers={"X-Forwarded-For": "198.51.100.7, 10.1.2.3"})
    assert ingest.envelopes[0].remote == "198.51.100.7"


# -- rejections: a reason, the right status, nothing stored ----------------------------------------

async def test_wrong_origin_is_403(client: Client, ingest: FakeIngest) -> None:
    response = await client.post("/forms/support", data=VALID, headers={"Origin": "https://evil.example"})
    assert response.status == 403
    assert "cannot be sent from this page" in await response.text()
    json_response = await client.post(
        "/forms/support", data=VALID, headers={"Origin": "https://evil.example", "Accept": "application/json"}
    )
    assert json_response.status == 403
    assert (await json_response.json())["error"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in json_response.headers
    assert ingest.calls == 0


async def test_missing_origin_is_403_unless_the_inbox_allows_it(client: Client, ingest: FakeIngest) -> None:
    response = await client.post("/forms/support", data=VALID, headers={"Accept": "application/json"})
    assert response.status == 403
    assert "no Origin or Referer" in (await response.json())["reason"]
    assert ingest.calls == 0


async def test_honeypot_looks_like_success_but_stores_nothing(
    client: Client, ingest: FakeIngest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connectors.form")
    bot = {**VALID, "website": "http://spam"}
    response = await client.post("/forms/support", data=bot, headers={"Origin": SITE})
    assert response.status == 200
    assert 'id="tg-thanks"' in await response.text()
    json_response = await client.post(
        "/forms/support", data={**VALID, "website": "x"}, headers=FETCH
    )
    assert json_response.status == 202
    assert (await json_response.json())["status"] == "accepted"
    assert ingest.calls == 0
    assert "honeypot" in caplog.text
    assert "refund" not in caplog.text.lower()


async def test_missing_fields_rerender_the_form_with_errors(client: Client, ingest: FakeIngest) -> None:
    response = await client.post(
        "/forms/support", data={"name": "<Li>", "subject": "Hello", "message": "  "}, headers={"Origin": SITE}
    )
    assert response.status == 400
    page = await response.text()
    assert 'id="tg-message-error"' in page
    assert "Please fill in this field." in page
    assert 'aria-describedby="tg-message-error"' in page
    assert 'id="tg-contact-error"' in page
    assert "email address or a phone number" in page
    assert 'value="&lt;Li&gt;"' in page
    assert 'value="Hello"' in page
    assert ingest.calls == 0


async def test_missing_fields_as_json_name_the_fields(client: Client, ingest: FakeIngest) -> None:
    response = await client.post(
        "/forms/support", json={"email": "not-an-address", "message": "hi"},
        headers=FETCH,
    )
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_fields"
    assert body["fields"] == {"email": "invalid"}
    assert "email: invalid" in body["reason"]
    assert ingest.calls == 0


async def test_malformed_json_is_400(client: Client, ingest: FakeIngest) -> None:
    response = await client.post(
        "/forms/support", data=b"{nope", headers={"Origin": SITE, "Content-Type": "application/json",
                                                   "Accept": "application/json"},
    )
    assert response.status == 400
    assert (await response.json())["error"] == "malformed"
    assert ingest.calls == 0


async def test_unsupported_content_type_is_415(client: Client, ingest: FakeIngest) -> None:
    response = await client.post(
        "/forms/support", data=b"message=hi", headers={"Origin": SITE, "Content-Type": "text/plain"}
    )
    assert response.status == 415
    assert ingest.calls == 0


async def test_oversized_body_is_413(client: Client, ingest: FakeIngest) -> None:
    response = await client.post(
        "/forms/support", data={**VALID, "message": "x" * 25_000}, headers=FETCH
    )
    assert response.status == 413
    assert "limit is 20000" in (await response.json())["reason"]
    assert ingest.calls == 0


@pytest.mark.parametrize(("sizes", "status", "error"), [
    ([10, 10, 10], 400, "Too many files: at most 2."),
    ([1001], 413, "at most 1000 bytes each"),
    ([900, 900], 413, "1.46 KB in total"),
])
async def test_attachment_bounds(
    client: Client, ingest: FakeIngest, sizes: list[int], status: int, error: str
) -> None:
    data = multipart(**VALID)
    for index, size in enumerate(sizes):
        data.add_field("attachments", b"a" * size, filename=f"f{index}.bin")
    response = await client.post("/forms/support", data=data, headers={"Origin": SITE})
    assert response.status == status
    page = await response.text()
    assert 'id="tg-attachments-error"' in page
    assert error in page
    assert ingest.calls == 0


async def test_rate_limit_is_429_with_retry_after(
    client_for: Callable[..., Awaitable[Client]], ingest: FakeIngest
) -> None:
    client = await client_for(rate_limit_burst=2, rate_limit_per_minute=1)
    statuses = [
        (await client.post("/forms/kiosk", data=VALID, headers={"Accept": "application/json"})).status
        for _ in range(3)
    ]
    assert statuses == [202, 202, 429]
    response = await client.post("/forms/kiosk", data=VALID, headers={"Accept": "application/json"})
    assert int(response.headers["Retry-After"]) >= 1
    assert (await response.json())["error"] == "rate_limited"
    assert ingest.calls == 2


async def test_retry_is_503_and_keeps_the_text(client: Client, ingest: FakeIngest) -> None:
    ingest.result = IngestResult(outcome=Outcome.RETRY, reason="backlog full", retry_after=7.2)
    response = await client.post("/forms/support", data=VALID, headers={"Origin": SITE})
    assert response.status == 503
    assert response.headers["Retry-After"] == "8"
    page = await response.text()
    assert "Please refund order 42." in page
    assert "could not save your message" in page
    json_response = await client.post("/forms/support", data=VALID, headers=FETCH)
    assert json_response.status == 503
    assert json_response.headers["Retry-After"] == "8"
    assert (await json_response.json())["error"] == "unavailable"


async def test_pipeline_rejection_uses_its_status(client: Client, ingest: FakeIngest) -> None:
    ingest.result = IngestResult(outcome=Outcome.REJECTED, reason="not ours", status=422)
    response = await client.post("/forms/support", data=VALID, headers=FETCH)
    assert response.status == 422
    assert await response.json() == {"error": "rejected", "reason": "not ours"}


async def test_quarantined_is_still_a_success(client: Client, ingest: FakeIngest) -> None:
    ingest.result = IngestResult(outcome=Outcome.QUARANTINED, quarantine_id="q-1")
    response = await client.post("/forms/support", data=VALID, headers={"Origin": SITE})
    assert response.status == 200
    assert 'id="tg-thanks"' in await response.text()


# -- CORS preflight --------------------------------------------------------------------------------

async def test_preflight_for_an_allowed_origin(client: Client) -> None:
    response = await client.options("/forms/support", headers={
        "Origin": SITE, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    })
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == SITE
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in response.headers["Access-Control-Allow-Headers"]


async def test_preflight_for_another_origin_is_refused(client: Client) -> None:
    response = await client.options("/forms/support", headers={"Origin": "https://evil.example"})
    assert response.status == 403
    assert "Access-Control-Allow-Origin" not in response.headers


# -- configuration ---------------------------------------------------------------------------------

def test_absent_or_disabled_channel_is_none() -> None:
    assert FormConnector.from_settings(Settings()) is None
    assert FormConnector.from_settings(make_settings(enabled=False)) is None


def test_inbox_must_exist() -> None:
    settings = make_settings(inboxes={"sales": {}})
    with pytest.raises(ConfigError, match=r"channels\.form\.inboxes\.sales"):
        FormConnector.from_settings(settings)


def test_origins_must_be_origins() -> None:
    with pytest.raises(ConfigError, match="allowed_origins"):
        FormConnector.from_settings(make_settings(inboxes={"support": {"allowed_origins": ["https://x.com/page"]}}))


def test_placements_ids_are_what_the_json_answer_shows() -> None:
    # Guard for the fake: the answer's ids come from the first placement.
    assert ACCEPTED.placements[0] == Placement(
        message_id="m-1", thread_id="t-1", customer_id="c-1", sequence=1, is_new_thread=True
    )


async def test_browser_helper_names_what_the_page_has(client: Client) -> None:
    from connectors.form import browser

    base = f"http://{client.server.host}:{client.server.port}"
    url = browser.form_url(base, "support", lang="zh")
    assert url == f"{base}/forms/support?lang=zh"
    page = await (await client.get("/forms/support?lang=zh")).text()
    for selector in (*browser.sample_input(), browser.SUBMIT, browser.HONEYPOT):
        assert f'id="{selector[1:]}"' in page
    # What a browser without JavaScript sends: the inputs as multipart, to the page's own URL.
    fields = {selector.removeprefix("#tg-"): value for selector, value in browser.sample_input().items()}
    data = multipart(**fields)
    response = await client.post("/forms/support", data=data, headers={"Origin": base})
    assert f'id="{browser.THANKS[1:]}"' in await response.text()
