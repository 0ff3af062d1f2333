"""Feishu's long connection: the protobuf frame against hand-computed bytes, and the gateway's
client against a local WebSocket server speaking the protocol (pings, events in parts, answers
only after the commit, a connection dropped mid-event)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.feishu.frame import CONTROL, DATA, Frame, FrameError, decode, encode
from gateway.app import Overrides, create_app
from gateway.publisher import MemoryPublisher
from gateway.store import build_store
from tests.connectors.feishu.fake_feishu import FakeFeishu
from tests.connectors.feishu.kit import event
from tests.connectors.feishu.test_feishu_app import published, settings_for
from tests.contract.kit import ContractStore, StoreMode

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def test_a_ping_frame_has_the_bytes_pbbp2_gives_it() -> None:
    # SeqID=0 (08 00), LogID=0 (10 00), service=7 (18 07), method=0 (20 00),
    # headers[0] = {key "type", value "ping"}: 2a 0c (0a 04 "type" 12 04 "ping").
    ping = Frame(service=7, method=CONTROL, headers=[("type", "ping")])
    expected = bytes.fromhex("0800100018072000") + bytes.fromhex("2a0c0a0474797065120470696e67")
    assert encode(ping) == expected
    assert decode(expected) == ping


def test_a_data_frame_survives_the_round_trip_and_garbage_is_refused() -> None:
    frame = Frame(
        seq_id=300,
        log_id=2**40,
        service=-1,
        method=DATA,
        headers=[("type", "event"), ("sum", "2")],
        payload="事件".encode(),
        payload_type="json",
        log_id_new="abc",
    )
    assert decode(encode(frame)) == frame
    with pytest.raises(FrameError):
        decode(b"\x08\xff")  # a truncated varint


@pytest.fixture
async def feishu(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeFeishu:
    fake = FakeFeishu()
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


def ws_settings(tmp_path: Path, feishu: FakeFeishu) -> Any:
    return settings_for(
        tmp_path,
        feishu.base,
        {"ws_first_backoff": 0.05, "ws_max_backoff": 0.2},
        mode="ws",
        verification_token="",
        encrypt_key="",
        previous_encrypt_key="",
        fetch_media=False,
        directory_emails=False,
    )


def answered(feishu: FakeFeishu, message_id: str) -> bool:
    return message_id not in feishu.unanswered


async def test_events_in_parts_are_answered_after_the_commit_and_pings_flow(
    aiohttp_client: MakeClient, tmp_path: Path, feishu: FakeFeishu
) -> None:
    bus = MemoryPublisher()
    await aiohttp_client(create_app(ws_settings(tmp_path, feishu), Overrides(publisher=bus)))
    await feishu.wait_for(lambda: feishu.connections == 1 and feishu.pings >= 1)
    first = await feishu.push_event(event(31, "over the long connection", token="t"), parts=3)
    await feishu.wait_for(lambda: answered(feishu, first))
    [received] = await published(bus, 1)
    assert received["message"]["text"] == "over the long connection"
    [answer] = feishu.answers
    assert orjson.loads(answer.payload)["code"] == 200
    assert answer.header("message_id") == first
    assert answer.header("biz_rt") is not None


async def test_a_connection_dropped_mid_event_loses_and_duplicates_nothing(
    aiohttp_client: MakeClient, tmp_path: Path, feishu: FakeFeishu
) -> None:
    bus = MemoryPublisher()
    client = await aiohttp_client(create_app(ws_settings(tmp_path, feishu), Overrides(publisher=bus)))
    await feishu.wait_for(lambda: feishu.connections == 1)
    feishu.drop_after_next_event = True
    cut = await feishu.push_event(event(41, "cut mid-event", token="t"), parts=2)
    await feishu.wait_for(lambda: feishu.connections >= 2 and answered(feishu, cut))
    after = await feishu.push_event(event(42, "sentinel", token="t"))
    await feishu.wait_for(lambda: answered(feishu, after))
    events = await published(bus, 2)
    await asyncio.sleep(0.2)
    assert [e["message"]["text"] for e in events] == ["cut mid-event", "sentinel"]
    assert len(bus.published) == 2
    metrics = await (await client.get("/metrics")).text()
    counted = 'ticketgate_channel_events_total{channel="feishu",event="ws_reconnect",inbox="it-desk"} 1.0'
    assert counted in metrics


async def test_an_event_the_store_cannot_take_is_answered_500_and_stored_once_when_delivered_again(
    aiohttp_client: MakeClient, tmp_path: Path, feishu: FakeFeishu
) -> None:
    bus = MemoryPublisher()
    settings = ws_settings(tmp_path, feishu)
    store = ContractStore(build_store(settings), StoreMode.FAILING, stall=0.0)
    await aiohttp_client(create_app(settings, Overrides(publisher=bus, store=store)))  # type: ignore[arg-type]
    await feishu.wait_for(lambda: feishu.connections == 1)
    pending = await feishu.push_event(event(61, "while the store is down", token="t"))
    await feishu.wait_for(lambda: len(feishu.answers) == 1)
    assert orjson.loads(feishu.answers[0].payload)["code"] == 500
    assert pending in feishu.unanswered
    store.mode = StoreMode.OK
    await feishu.redeliver()
    await feishu.wait_for(lambda: answered(feishu, pending))
    [received] = await published(bus, 1)
    assert received["message"]["text"] == "while the store is down"
