"""``/status``: the admin token, the JSON the page polls (the same figures as /metrics), and the
quarantine's show and replay with their confirmation."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from core.errors import ConfigError
from core.model import RawEnvelope
from core.settings import Settings
from gateway.app import Overrides, create_app
from gateway.keys import STORE
from gateway.publisher import MemoryPublisher
from gateway.status.data import quantile, within
from gateway.status.page import pick_language
from tests.support.schema import validate_event

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
TOKEN = "status-test-admin-token"
KEY = "status-test-api-key-0001"
DESK_KEY = "status-test-desk-key-0001"


def settings_for(tmp_path: Path, **admin: Any) -> Settings:
    return Settings.model_validate({
        "server": {"normalizer_process": False, "public_url": "http://gateway.test"},
        "store": {"path": str(tmp_path / "g.db"), "blob_dir": str(tmp_path / "blobs")},
        "outbox": {"relay": "inline", "poll_interval": 0.05},
        "control": {"enabled": False},
        "tenants": {"acme": {}},
        "inboxes": {"shop": {"tenant": "acme", "name": "Web shop"}},
        "channels": {
            "api": {"inboxes": {"shop": {"keys": [KEY]}}},
            "identity": {"keys": [DESK_KEY]},
        },
        "admin": {"token": TOKEN, **admin},
    })


async def started(make: MakeClient, tmp_path: Path, **admin: Any) -> tuple[Client, MemoryPublisher]:
    bus = MemoryPublisher()
    client = await make(create_app(settings_for(tmp_path, **admin), Overrides(publisher=bus)))
    return client, bus


async def sign_in(client: Client) -> str:
    """Sign in through the form; the page's CSRF token."""
    response = await client.post("/status/login", data={"token": TOKEN}, allow_redirects=False)
    assert response.status == 303, await response.text()
    assert response.headers["Location"].startswith("/status")
    cookie = response.cookies["tg_status"]
    assert TOKEN not in cookie.value
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/status"
    page = await client.get("/status")
    assert page.status == 200
    match = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', await page.text())
    assert match is not None
    return match.group(1)


async def post_api(client: Client, text: str, key: str = KEY) -> int:
    body = {"customer": {"email": "ada@example.com"}, "text": text}
    response = await client.post("/api/v1/messages", json=body, headers={"Authorization": f"Bearer {key}"})
    return response.status


async def summary(client: Client) -> dict[str, Any]:
    response = await client.get("/status/api/summary")
    assert response.status == 200
    return dict(await response.json())


async def test_without_the_token_the_page_redirects_to_the_login_and_the_api_says_401(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client, _ = await started(aiohttp_client, tmp_path, auth_failures_burst=3)
    page = await client.get("/status", allow_redirects=False)
    assert page.status == 303
    assert page.headers["Location"].startswith("/status/login")
    for path in ("/status/api/summary", "/status/api/quarantine/qua_x", "/status/api/quarantine/qua_x/raw"):
        response = await client.get(path)
        assert response.status == 401, path
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # A desk key is not the admin token.
    desk = await client.get("/status/api/summary", headers={"Authorization": f"Bearer {DESK_KEY}"})
    assert desk.status in (401, 429)
    # A forged cookie is no session.
    client.session.cookie_jar.update_cookies({"tg_status": "9999999999.abc.def"})
    assert (await client.get("/status", allow_redirects=False)).status == 303

    wrong = await client.post("/status/login", data={"token": "not-the-token"}, allow_redirects=False)
    assert wrong.status in (401, 429)
    assert "not the admin token" in await wrong.text() or wrong.status == 429
    statuses = [
        (await client.post("/status/login", data={"token": f"guess-{i}"}, allow_redirects=False)).status
        for i in range(4)
    ]
    assert statuses[-1] == 429  # guessing is slowed to the limiter's rate


async def test_the_bearer_token_opens_the_api_for_scripts(aiohttp_client: MakeClient, tmp_path: Path) -> None:
    client, _ = await started(aiohttp_client, tmp_path)
    response = await client.get("/status/api/summary", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200
    assert (await response.json())["broker"]["relay_mode"] == "inline"


async def test_the_json_reads_the_same_figures_as_metrics(aiohttp_client: MakeClient, tmp_path: Path) -> None:
    client, bus = await started(aiohttp_client, tmp_path)
    await sign_in(client)
    before = await summary(client)
    [api] = [c for c in before["channels"] if c["name"] == "api"]
    [shop] = [row for row in api["inboxes"] if row["inbox"] == "shop"]
    assert shop["name"] == "Web shop"
    assert sum(shop["minutes"]["stored"]) == 0
    assert shop["last_message_at"] is None
    assert api["deadline"] == 30.0
    assert set(api["refusals"]) == {"signature", "auth", "size", "rate_limit", "malformed"}

    assert await post_api(client, "first") == 202
    assert await post_api(client, "second") == 202
    assert await post_api(client, "wrong key", key="not-a-key-at-all") == 401
    async with asyncio.timeout(10), bus.changed:
        await bus.changed.wait_for(lambda: len(bus.published) >= 2)

    after = await summary(client)
    [api] = [c for c in after["channels"] if c["name"] == "api"]
    rows = {row["inbox"]: row for row in api["inboxes"]}
    assert sum(rows["shop"]["minutes"]["stored"]) == 2
    # This minute's bar is the last (the previous one when a minute turned meanwhile).
    assert sum(rows["shop"]["minutes"]["stored"][-2:]) == 2
    assert rows["shop"]["last_message_at"] is not None
    # The wrong key is refused before an inbox is known: the "" row, reason auth.
    assert rows[""]["refusals"]["auth"] == 1
    assert api["refusals"]["auth"] == 1

    metrics = await (await client.get("/metrics")).text()
    for outcome in ("accepted", "rejected"):
        count = api["totals"][outcome]
        assert f'ticketgate_messages_total{{channel="api",outcome="{outcome}"}} {count}.0' in metrics
    assert 'ticketgate_refusals_total{channel="api",inbox="",reason="auth"} 1.0' in metrics
    assert f'ticketgate_ack_latency_seconds_count{{channel="api"}} {api["ack"]["count"]}.0' in metrics
    assert api["ack"]["count"] == 2
    assert api["ack"]["within_deadline"] == 2
    assert api["ack"]["p99"] is not None
    assert api["ack"]["p99"] < 30
    assert after["outbox"]["bound"] == 100_000
    assert after["store"] == {**after["store"], "backend": "sqlite", "ok": True}
    assert after["store"]["size_bytes"] > 0
    assert after["broker"]["connected"] is True
    assert after["broker"]["publish_confirms"] >= 1  # the relay counts a confirm after the bus took it


async def test_the_page_is_one_document_with_no_external_asset(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client, _ = await started(aiohttp_client, tmp_path)
    await sign_in(client)
    page = await client.get("/status")
    text = await page.text()
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'nonce-" in csp
    assert page.headers["Cache-Control"] == "no-store"
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing from elsewhere
    assert '<link' not in text
    initial = re.search(r'<script type="application/json" id="tg-initial">(.*?)</script>', text, re.S)
    assert initial is not None
    assert orjson.loads(initial.group(1))["channels"]


async def test_english_and_chinese_by_accept_language_with_a_switch(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client, _ = await started(aiohttp_client, tmp_path)
    login = await client.get("/status/login", headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"})
    assert "管理令牌" in await login.text()
    await sign_in(client)
    zh = await client.get("/status", headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"})
    assert '<html lang="zh-CN">' in await zh.text()
    switched = await client.get("/status?lang=en", headers={"Accept-Language": "zh-CN"})
    assert '<html lang="en">' in await switched.text()
    # The switch is remembered over the browser's preference.
    again = await client.get("/status", headers={"Accept-Language": "zh-CN"})
    assert '<html lang="en">' in await again.text()
    assert pick_language("fr, zh-Hant;q=0.5, en;q=0.4") == "zh"
    assert pick_language(None) == "en"


async def quarantined(client: Client, body: bytes) -> str:
    envelope = RawEnvelope(
        channel="api", tenant="acme", inbox="shop", body=body, received_at=datetime.now(UTC),
        content_type="application/json", signature_verified=True,
    )
    record = await client.app[STORE].quarantine(envelope, "normalizer error: KeyError: 'customer'")
    return record.id


async def test_show_and_replay_with_the_confirmation(aiohttp_client: MakeClient, tmp_path: Path) -> None:
    client, bus = await started(aiohttp_client, tmp_path)
    csrf = await sign_in(client)
    body = orjson.dumps({"customer": {"email": "grace@example.com"}, "text": "parked <b>message</b>"})
    qid = await quarantined(client, body)

    listed = (await summary(client))["quarantine"]
    assert (listed["held"], listed["total"]) == (1, 1)
    assert listed["items"][0]["id"] == qid

    shown = await client.get(f"/status/api/quarantine/{qid}")
    info = await shown.json()
    assert info["raw_preview"] == body.decode()
    assert info["reason"].startswith("normalizer error")
    assert info["content_type"] == "application/json"
    raw = await client.get(f"/status/api/quarantine/{qid}/raw")
    assert await raw.read() == body
    assert raw.headers["Content-Disposition"].startswith("attachment")
    assert raw.headers["Content-Type"] == "application/octet-stream"

    url = f"/status/api/quarantine/{qid}/replay"
    # With the session cookie but without the page's CSRF token: refused (a cross-site form).
    assert (await client.post(url, json={"confirm": qid})).status == 403
    # Without the confirmation: refused, nothing replayed.
    headers = {"X-CSRF-Token": csrf}
    unconfirmed = await client.post(url, json={}, headers=headers)
    assert unconfirmed.status == 400
    assert (await unconfirmed.json())["error"] == "confirmation_required"
    assert (await client.post(url, json={"confirm": "qua_other"}, headers=headers)).status == 400
    assert (await summary(client))["quarantine"]["held"] == 1

    done = await client.post(url, json={"confirm": qid}, headers=headers)
    assert done.status == 200
    result = await done.json()
    assert result == {**result, "id": qid, "outcome": "accepted", "stored": True}
    async with asyncio.timeout(10), bus.changed:
        await bus.changed.wait_for(lambda: any(m.type == "message.received" for m in bus.published))
    [received] = [validate_event(m.body) for m in bus.published if m.type == "message.received"]
    assert received["message"]["text"] == "parked <b>message</b>"
    after = (await summary(client))["quarantine"]
    assert (after["held"], after["total"]) == (0, 1)
    assert after["items"][0]["state"] == "replayed"
    assert after["items"][0]["replay_result"] == "accepted"
    assert (await client.post("/status/api/quarantine/qua_nope/replay", json={"confirm": "qua_nope"},
                              headers=headers)).status == 404


async def test_a_script_replays_with_the_bearer_token(aiohttp_client: MakeClient, tmp_path: Path) -> None:
    client, _ = await started(aiohttp_client, tmp_path)
    qid = await quarantined(client, b"{not json")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = await client.post(f"/status/api/quarantine/{qid}/replay", json={"confirm": qid}, headers=auth)
    assert response.status == 200
    result = await response.json()
    assert result["stored"] is False
    assert result["outcome"] == "rejected"
    assert (await (await client.get("/status/api/summary", headers=auth)).json())["quarantine"]["held"] == 1


async def test_sign_out_ends_the_session(aiohttp_client: MakeClient, tmp_path: Path) -> None:
    client, _ = await started(aiohttp_client, tmp_path)
    csrf = await sign_in(client)
    out = await client.post("/status/logout", data={"csrf": csrf}, allow_redirects=False)
    assert out.status == 303
    assert (await client.get("/status", allow_redirects=False)).status == 303


async def test_sessions_expire(aiohttp_client: MakeClient, tmp_path: Path) -> None:
    from gateway.status import STATUS_AUTH

    client, _ = await started(aiohttp_client, tmp_path, session_lifetime=60)
    await sign_in(client)
    cookie = client.session.cookie_jar.filter_cookies(client.make_url("/status"))["tg_status"].value
    auth = client.app[STATUS_AUTH]
    assert auth.session_valid(cookie)
    expiry = int(cookie.split(".")[0])
    assert expiry - 70 < datetime.now(UTC).timestamp() < expiry
    forged = f"{expiry + 3600}.{cookie.split('.', 1)[1]}"  # a later expiry breaks the MAC
    assert not auth.session_valid(forged)


async def test_no_token_no_page(aiohttp_client: MakeClient, tmp_path: Path) -> None:
    settings = settings_for(tmp_path).model_copy(update={"admin": settings_for(tmp_path).admin.model_copy(
        update={"token": None})})
    client = await aiohttp_client(create_app(settings, Overrides(publisher=MemoryPublisher())))
    response = await client.get("/status")
    assert response.status == 404
    assert "[admin] token" in (await response.json())["reason"]


def test_the_admin_token_may_not_be_a_desk_key_or_short(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    desk_token = Settings.model_validate({"admin": {"token": DESK_KEY}}).admin
    same = settings.model_copy(update={"admin": desk_token})
    with pytest.raises(ConfigError, match=r"channels\.identity\.keys"):
        create_app(same, Overrides(publisher=MemoryPublisher()))
    with pytest.raises(Exception, match="at least 12"):
        Settings.model_validate({"admin": {"token": "short"}})


def test_quantile_and_deadline_share_follow_prometheus() -> None:
    buckets = [(0.005, 50.0), (0.01, 90.0), (5.0, 99.0), (10.0, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, buckets) == 0.005
    assert quantile(0.7, buckets) == pytest.approx(0.0075)
    assert quantile(0.995, buckets) == pytest.approx(7.5)
    assert quantile(0.5, []) is None
    assert within(5.0, buckets) == (99, 100)
    assert within(7.0, buckets) == (99, 100)  # between bounds: only what surely came in time
    assert within(30.0, buckets) == (100, 100)
    # Past the last finite bound: Prometheus answers that bound.
    assert quantile(1.0, [(1.0, 1.0), (float("inf"), 3.0)]) == 1.0


async def test_replies_waiting_from_the_ledger_and_failed_from_the_dispatcher(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:

    client, _ = await started(aiohttp_client, tmp_path)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    empty = (await (await client.get("/status/api/summary", headers=auth)).json())["replies"]
    assert (empty["waiting"], empty["failed"], empty["oldest_waiting_age"]) == (0, 0, None)

    posted = await client.post(
        "/api/v1/messages", json={"customer": {"email": "ada@example.com"}, "text": "where is it?"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    thread_id = (await posted.json())["thread_id"]
    # A desk's reply: the API inbox has no callback URL, so the dispatcher fails it for good.
    desk = {"Authorization": f"Bearer {DESK_KEY}"}
    command = {"command_id": "cmd-1", "tenant": "acme", "text": "on its way"}
    requested = await client.post(f"/api/v1/threads/{thread_id}/replies", json=command, headers=desk)
    assert requested.status in (201, 202), await requested.text()

    async def failed() -> dict[str, Any]:
        while True:
            replies: dict[str, Any] = (await (await client.get("/status/api/summary", headers=auth)).json())[
                "replies"
            ]
            # The summary reads the ledger (waiting) and the metrics (failed) one after the
            # other: a poll between the two can see the failure counted and the reply still
            # waiting, so wait for both.
            if replies["failed"] and not replies["waiting"]:
                return replies
            await asyncio.sleep(0.05)  # the dispatcher runs in the app: poll its outcome

    async with asyncio.timeout(10):
        replies = await failed()
    assert replies["failed"] == 1
    assert replies["waiting"] == 0
    [(reason, count)] = replies["failed_by_reason"].items()
    assert count == 1
    assert reason == "recipient_unreachable", replies
    # Failed while resolving (no channel could reach the customer): channel "", as /metrics has it.
    assert replies["failed_by_channel"] == {"": 1}
    metrics = await (await client.get("/metrics")).text()
    assert 'ticketgate_replies_failed_total{channel="",reason="recipient_unreachable"} 1.0' in metrics



async def test_replies_waiting_are_the_ledgers_unfinished_commands(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    from dedupe.engine import new_id
    from gateway.store.replies import ReplyRequest

    # No dispatcher on this instance: what desks asked for waits in the ledger.
    settings = settings_for(tmp_path).model_copy(update={"replies": Settings.model_validate(
        {"replies": {"enabled": False}}).replies})
    client = await aiohttp_client(create_app(settings, Overrides(publisher=MemoryPublisher())))
    posted = await client.post(
        "/api/v1/messages", json={"customer": {"email": "ada@example.com"}, "text": "where is it?"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    thread_id = (await posted.json())["thread_id"]
    for n in (1, 2):
        await client.app[STORE].reply_request(ReplyRequest(
            reply_id=new_id("rpl"), tenant="acme", command_id=f"cmd-{n}", thread_id=thread_id,
            fingerprint=f"fp:{n}", command={"text": f"answer {n}"},
        ))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    replies = (await (await client.get("/status/api/summary", headers=auth)).json())["replies"]
    assert replies["waiting"] == replies["pending"] == 2
    assert 0 <= replies["oldest_waiting_age"] < 60


async def test_a_hostile_reason_cannot_close_the_pages_script(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client, _ = await started(aiohttp_client, tmp_path)
    await sign_in(client)
    envelope = RawEnvelope(
        channel="api", tenant="acme", inbox="shop", body=b"x", received_at=datetime.now(UTC),
        signature_verified=True,
    )
    hostile = "</script><script>alert(document.cookie)</script>"
    await client.app[STORE].quarantine(envelope, f"normalizer error: {hostile}")
    text = await (await client.get("/status")).text()
    assert hostile not in text
    initial = re.search(r'<script type="application/json" id="tg-initial">(.*?)</script>', text, re.S)
    assert initial is not None
    assert hostile in orjson.loads(initial.group(1))["quarantine"]["items"][0]["reason"]


@pytest.mark.integration
async def test_on_postgresql_the_page_reads_the_shared_store(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    from tests.support.postgres import store_table

    with store_table("postgresql") as table:
        base = settings_for(tmp_path)
        dsn = Settings.model_validate({"store": table}).store.dsn
        settings = base.model_copy(update={"store": base.store.model_copy(
            update={"backend": "postgresql", "dsn": dsn}
        )})
        client = await aiohttp_client(create_app(settings, Overrides(publisher=MemoryPublisher())))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        qid = await quarantined(client, orjson.dumps({"customer": {"email": "pg@example.com"}, "text": "pg"}))
        before = await (await client.get("/status/api/summary", headers=auth)).json()
        assert before["store"]["backend"] == "postgresql"
        assert before["store"]["ok"] is True
        assert before["store"]["size_bytes"] is None
        assert before["store"]["address"].startswith("postgresql ")
        assert before["quarantine"]["held"] == 1
        url = f"/status/api/quarantine/{qid}/replay"
        replayed = await client.post(url, json={"confirm": qid}, headers=auth)
        assert (await replayed.json())["stored"] is True
        after = await (await client.get("/status/api/summary", headers=auth)).json()
        assert after["quarantine"]["held"] == 0
        assert after["replies"]["waiting"] == 0
        await client.close()


def test_a_session_holds_on_every_instance_with_the_token_and_ends_with_a_new_token() -> None:
    from core.settings import AdminSettings, ServerSettings
    from gateway.status.auth import AdminAuth

    server = ServerSettings()
    one = AdminAuth(AdminSettings.model_validate({"token": TOKEN}), server)
    other_instance = AdminAuth(AdminSettings.model_validate({"token": TOKEN}), server)
    rotated = AdminAuth(AdminSettings.model_validate({"token": TOKEN + "-rotated"}), server)
    session = one.new_session()
    assert other_instance.session_valid(session)
    assert other_instance.csrf_token(session) == one.csrf_token(session)
    assert not rotated.session_valid(session)
    assert not one.session_valid(session.replace(".", "..", 1))
    assert not one.session_valid("")


async def test_odd_sign_in_bodies_are_a_wrong_token_not_an_error(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client, _ = await started(aiohttp_client, tmp_path)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for body in (b"x" * 10_000, b"&".join(b"a=%d" % i for i in range(50)), b"token=%ff%fe"):
        response = await client.post("/status/login", data=body, headers=form, allow_redirects=False)
        assert response.status in (401, 429), body[:20]
    assert (await client.post("/status/logout", data=b"y" * 10_000, headers=form,
                              allow_redirects=False)).status == 303


async def test_a_quarantined_message_whose_raw_bytes_are_gone_is_a_clear_503(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client, _ = await started(aiohttp_client, tmp_path)
    qid = await quarantined(client, b"x" * (300 * 1024))  # past store.inline_raw_max: a blob file
    for path in (tmp_path / "blobs").rglob("*"):
        if path.is_file():
            path.unlink()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for url in (f"/status/api/quarantine/{qid}", f"/status/api/quarantine/{qid}/raw"):
        response = await client.get(url, headers=auth)
        assert response.status == 503
        assert "missing" in (await response.json())["reason"]
    replay = await client.post(f"/status/api/quarantine/{qid}/replay", json={"confirm": qid}, headers=auth)
    assert replay.status == 503
    assert "missing" in (await replay.json())["reason"]
