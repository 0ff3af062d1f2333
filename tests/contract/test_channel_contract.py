"""The channel contract (``core/channel.py``), held against every installed channel.

Each case runs for every name in ``Registry.installed()``; a channel registered without a probe
fails here with what to add. The mutation that makes each case fail is in README.md beside this file.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from core.channel import ChannelDescriptor
from gateway.channels import Registry
from tests.contract.kit import ChannelProbe, Gateway, StoreMode, probe_for, running

REGISTRY = Registry.installed()


@dataclass(frozen=True, slots=True, kw_only=True)
class Channel:
    descriptor: ChannelDescriptor
    probe: ChannelProbe
    tmp_path: Path

    def running(self, mode: StoreMode = StoreMode.OK) -> AbstractAsyncContextManager[Gateway]:
        return running(self.descriptor, self.probe, self.tmp_path, mode)


@pytest.fixture(params=REGISTRY.names())
def channel(request: pytest.FixtureRequest, tmp_path: Path) -> Channel:
    descriptor = REGISTRY.get(request.param)
    try:
        probe = probe_for(descriptor)
    except LookupError as exc:
        pytest.fail(str(exc))
    assert probe.answer_within <= descriptor.deadline, "the probe allows more than the channel's deadline"
    return Channel(descriptor=descriptor, probe=probe, tmp_path=tmp_path)


async def test_forged_is_refused_before_anything_is_parsed(channel: Channel) -> None:
    probe = channel.probe
    async with channel.running() as gw:
        answer = await probe.send(gw, probe.forged(1))
        await probe.settle(gw)
        # The forged body is unparseable too: a channel that parsed first would answer its parse error.
        assert answer.kind == "refused", answer
        assert answer.status in probe.refusal_statuses, answer
        assert gw.ingested == []
        assert gw.normalized == []
        assert await gw.outbox() == []
        # Counted where /metrics shows it: a refusal by reason, and an outcome "rejected".
        assert gw.refusals() in ({"signature": 1.0}, {"auth": 1.0}), gw.refusals()
        assert gw.rejected() == 1.0


async def test_a_redelivered_message_makes_one_event(channel: Channel) -> None:
    probe = channel.probe
    async with channel.running() as gw:
        for _ in range(2):
            answer = await probe.send(gw, probe.valid(1))
            assert answer.kind == "accepted", answer
            await probe.settle(gw)
        answers = await asyncio.gather(*(probe.send(gw, probe.valid(2)) for _ in range(3)))
        assert [a.kind for a in answers] == ["accepted"] * 3, answers
        await probe.settle(gw)
        rows = await gw.outbox()
        assert len(rows) == 2, [row.event_id for row in rows]
        assert len(gw.normalized) >= 2  # the real normalizer ran: the events are not an accident


async def test_the_event_has_the_text_and_its_language(channel: Channel) -> None:
    # Each channel's own normalizer leaves language to the shared step (normalizers.content.finish).
    probe = channel.probe
    question = "请问我的订单什么时候发货？"
    async with channel.running() as gw:
        answer = await probe.send(gw, probe.valid(1, question))
        assert answer.kind == "accepted", answer
        await probe.settle(gw)
        [row] = await gw.outbox()
        message = orjson.loads(row.body)["message"]
        assert question in message["text"]
        assert message["language"] == "zh"


async def test_an_oversized_delivery_is_refused(channel: Channel) -> None:
    probe = channel.probe
    async with channel.running() as gw:
        answer = await probe.send(gw, probe.oversized())
        await probe.settle(gw)
        assert answer.kind == "refused", answer
        assert answer.status in (413, 552), answer
        assert gw.ingested == []
        assert gw.refusals() == {"size": 1.0}
        assert gw.rejected() == 1.0


async def test_a_failing_store_gets_the_providers_retry(channel: Channel) -> None:
    probe = channel.probe
    async with channel.running(StoreMode.FAILING) as gw:
        answer = await probe.send(gw, probe.valid(1))
        await probe.settle(gw)
        assert answer.kind == "retry", answer
        assert await gw.outbox() == []


async def test_malformed_content_is_refused_or_quarantined_never_a_crash(channel: Channel) -> None:
    probe = channel.probe
    async with channel.running() as gw:
        answer = await probe.send(gw, probe.malformed())
        await probe.settle(gw)
        assert await gw.outbox() == []
        if answer.kind == "accepted":
            quarantined = await gw.quarantined()
            assert len(quarantined) == 1, answer
            assert quarantined[0].reason
        else:
            assert answer.kind == "refused", answer
            assert 400 <= answer.status < 500 or answer.status >= 550, answer


async def test_a_slow_store_is_answered_within_the_deadline(channel: Channel) -> None:
    probe = channel.probe
    async with channel.running(StoreMode.SLOW) as gw:
        started = time.monotonic()
        async with asyncio.timeout(probe.answer_within):
            answer = await probe.send(gw, probe.valid(1))
        assert time.monotonic() - started < channel.descriptor.deadline
        assert answer.kind == "retry", answer
        assert await gw.outbox() == []
