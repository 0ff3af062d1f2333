"""POST/GET /api/v1/threads/{id}/replies: the reply command over HTTP, with the desk API's keys
and tenancy (the queue's twin is tested in tests/gateway/test_replies.py and end to end)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from core.settings import ReplySettings
from gateway.desk import DeskApi
from gateway.reply_commands import ReplyIntake
from gateway.store.sqlite import SQLiteStore
from tests.gateway.desk.test_desk_api import (
    DESK_KEY,
    GLOBEX_KEY,
    accept,
    auth,
    email,
    make_settings,
    msg,
    store,
)

Client = TestClient[web.Request, web.Application]
_ = store  # the fixture


async def replies_client(
    aiohttp_client: Callable[..., Awaitable[Client]], store: SQLiteStore, woken: list[int]
) -> Client:
    desk = DeskApi.from_settings(make_settings())
    assert desk is not None
    app = web.Application()
    intake = ReplyIntake(settings=ReplySettings(max_attachments=2), wake=lambda: woken.append(1))
    desk.setup(app, store, replies=intake)
    return await aiohttp_client(app)


async def post(client: Client, thread_id: str, body: dict[str, Any], key: str = DESK_KEY) -> tuple[int, Any]:
    async with client.post(f"/api/v1/threads/{thread_id}/replies", json=body, headers=auth(key)) as resp:
        return resp.status, await resp.json()


async def test_a_reply_is_stored_answered_202_and_repeats_change_nothing(
    aiohttp_client: Callable[..., Awaitable[Client]], store: SQLiteStore
) -> None:
    woken: list[int] = []
    client = await replies_client(aiohttp_client, store, woken)
    placed = await accept(store, msg("m1", email("ada@example.com")))
    status, first = await post(
        client, placed.thread_id, {"command_id": "c1", "text": "Hello", "agent_name": "Bo"}
    )
    assert status == 202
    assert (first["status"], first["tenant"], first["thread_id"], first["attempts"]) == (
        "pending",
        "acme",
        placed.thread_id,
        0,
    )
    assert first["reply_id"].startswith("rpl_")
    assert woken == [1]
    status, again = await post(
        client, placed.thread_id, {"command_id": "c1", "text": "Hello", "agent_name": "Bo"}
    )
    assert (status, again["reply_id"]) == (202, first["reply_id"])
    assert woken == [1]  # nothing new to send
    status, conflict = await post(client, placed.thread_id, {"command_id": "c1", "text": "Other"})
    assert (status, conflict["error"]) == (409, "conflict")
    async with client.get(f"/api/v1/threads/{placed.thread_id}/replies", headers=auth()) as resp:
        listed = await resp.json()
    assert [r["command_id"] for r in listed["replies"]] == ["c1"]


async def test_tenancy_and_bad_commands(
    aiohttp_client: Callable[..., Awaitable[Client]], store: SQLiteStore
) -> None:
    client = await replies_client(aiohttp_client, store, [])
    acme = await accept(store, msg("m1", email("ada@example.com")))
    globex = await accept(store, msg("g1", email("gus@example.com"), tenant="globex", inbox="g"))
    # A tenant's key speaks for its tenant: its own thread yes, another tenant's is unknown.
    status, ok = await post(client, globex.thread_id, {"command_id": "g-1", "text": "Hi"}, key=GLOBEX_KEY)
    assert (status, ok["tenant"]) == (202, "globex")
    assert (await post(client, acme.thread_id, {"command_id": "g-2", "text": "Hi"}, key=GLOBEX_KEY))[0] == 404
    assert (await post(client, acme.thread_id, {"command_id": "x", "text": "Hi", "tenant": "globex"}))[
        0
    ] == 404
    assert (await post(client, "thr_nope", {"command_id": "x", "text": "Hi"}))[0] == 404
    # The path names the thread; a body naming another is refused, as are empty and oversized commands.
    status, wrong = await post(
        client, acme.thread_id, {"command_id": "x", "text": "Hi", "thread_id": globex.thread_id}
    )
    assert (status, wrong["error"]) == (422, "invalid_request")
    status, empty = await post(client, acme.thread_id, {"command_id": "x", "text": "  "})
    assert status == 422
    assert "text, html or attachments" in empty["reason"]
    three = [{"name": f"{n}.pdf", "url": f"https://files.example/{n}.pdf"} for n in range(3)]
    assert (await post(client, acme.thread_id, {"command_id": "x", "attachments": three}))[0] == 422
    plain = [{"name": "a.pdf", "url": "http://files.example/a.pdf"}]
    assert (await post(client, acme.thread_id, {"command_id": "x", "attachments": plain}))[0] == 422
    async with client.post(
        f"/api/v1/threads/{acme.thread_id}/replies",
        data=b"{",
        headers={**auth(), "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
    assert await store.reply_list(acme.thread_id) == []
